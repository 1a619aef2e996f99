"""Composite experts (MoLE, MoR, MoRE): format and validation, registry, per-layer gates."""

from loramux.composites.format import COMPOSITE_TYPES, BaseShape, CompositeSpec, parse_composite
from loramux.composites.registry import CompositeOptions, CompositeRecord, CompositeRegistry, CompositeUse

__all__ = ["BaseShape", "COMPOSITE_TYPES", "CompositeOptions", "CompositeRecord", "CompositeRegistry",
           "CompositeSpec", "CompositeUse", "parse_composite"]
