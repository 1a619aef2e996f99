"""Read and validate PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors).

Everything is checked before anything is stored, and each problem has its
own `AdapterError` code so the server can map it to a clear client error.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from loramux.config import LORA_TARGET_MODULES

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

_KEY = re.compile(
    r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(" + "|".join(LORA_TARGET_MODULES) + r")\.lora_([AB])\.weight$")


class AdapterError(ValueError):
    """An adapter that cannot be served; `code` names the problem for API errors."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class LoraAdapter:
    """A validated adapter. weights[(layer, module)] = (A [r, d_in], B [d_out, r])."""

    rank: int
    alpha: float
    scale: float  # alpha / rank, or alpha / sqrt(rank) with rslora
    target_modules: tuple[str, ...]
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    base_model: str | None

    @property
    def num_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def _check_config(cfg: dict) -> None:
    def refuse(code: str, message: str) -> None:
        raise AdapterError(code, message)

    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        refuse("unsupported_option", f"peft_type {cfg.get('peft_type')!r} is not supported; only LORA")
    if cfg.get("use_dora"):
        refuse("unsupported_option", "DoRA adapters (use_dora) are not supported")
    if cfg.get("bias", "none") != "none":
        refuse("unsupported_option", f"bias={cfg['bias']!r} is not supported; adapters must not train biases")
    if cfg.get("modules_to_save"):
        refuse("unsupported_option", "modules_to_save is not supported (full copies of layers, not LoRA)")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        refuse("unsupported_option", "per-module rank_pattern / alpha_pattern is not supported")
    if cfg.get("fan_in_fan_out"):
        refuse("unsupported_option", "fan_in_fan_out is not supported")
    targets = cfg.get("target_modules")
    if targets is not None and not (isinstance(targets, str) or (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        refuse("invalid_config", f"target_modules must be a string or a list of strings, got {targets!r:.200}")
    if isinstance(targets, list):
        for t in targets:
            if t.split(".")[-1] not in LORA_TARGET_MODULES:
                refuse("unsupported_target", f"target module {t!r} is not supported; "
                                             f"LoRA may target {', '.join(LORA_TARGET_MODULES)}")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        refuse("invalid_config", f"r must be a positive integer, got {r!r:.200}")
    alpha = cfg.get("lora_alpha", r)
    # json.loads accepts NaN and Infinity; a float() of a huge int overflows.
    if (not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0
            or alpha > _MAX_ALPHA or not math.isfinite(alpha)):
        refuse("invalid_config", f"lora_alpha must be a finite positive number, got {alpha!r:.200}")


_MAX_ALPHA = 1e30  # far above any trained alpha; keeps alpha / rank finite in every float type


def _check_representable(layer: int, module: str, a: torch.Tensor, b: torch.Tensor, scale: float,
                         dtype: torch.dtype) -> None:
    """A and B must stay finite once cast to the serving dtype, and so must scale * B (the delta's factor)."""
    limit = torch.finfo(dtype).max
    a_max, b_max = a.abs().max().item(), b.abs().max().item()
    if a_max > limit or b_max > limit or b_max * scale > limit:
        raise AdapterError("unrepresentable_weights",
                           f"layer {layer} {module}: weights (max |A| {a_max:.3g}, max |B| {b_max:.3g}) times the "
                           f"scale {scale:.3g} overflow the serving dtype {str(dtype).removeprefix('torch.')} "
                           f"(max {limit:.3g})")


def parse_peft_adapter(config_bytes: bytes, weights_bytes: bytes,
                       target_shapes: dict[str, tuple[int, int]], num_layers: int,
                       max_rank: int, dtype: torch.dtype = torch.float32) -> LoraAdapter:
    """Validate an adapter against the base model's projection shapes and serving `dtype`; raises AdapterError."""
    try:
        cfg = json.loads(config_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError("invalid_config", f"{CONFIG_FILE} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise AdapterError("invalid_config", f"{CONFIG_FILE} is nested too deeply") from exc
    if not isinstance(cfg, dict):
        raise AdapterError("invalid_config", f"{CONFIG_FILE} must hold a JSON object")
    _check_config(cfg)
    rank, alpha = cfg["r"], float(cfg.get("lora_alpha", cfg["r"]))
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    if rank > max_rank:
        raise AdapterError("rank_too_large", f"adapter rank {rank} exceeds --max-lora-rank {max_rank}")
    try:
        tensors = load_safetensors(weights_bytes)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterError("invalid_weights", f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}") from exc

    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.search(key)
        if m is None:
            what = ("embedding or lm_head LoRA" if "embed" in key or "lm_head" in key else
                    "DoRA magnitude vectors" if "magnitude" in key else
                    "trained biases" if key.endswith(".bias") else "an unknown tensor")
            raise AdapterError("unsupported_option", f"tensor {key!r} ({what}) is not supported")
        layer, module = int(m.group(1)), m.group(2)
        if layer >= num_layers:
            raise AdapterError("shape_mismatch", f"tensor {key!r} names layer {layer}; the base has {num_layers}")
        pairs.setdefault((layer, module), {})[m.group(3)] = tensor
    if not pairs:
        raise AdapterError("invalid_weights", f"{WEIGHTS_FILE} holds no LoRA tensors")

    weights = {}
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError("invalid_weights", f"layer {layer} {module} has lora_{set('AB') - set(ab)} missing")
        a, b = ab["A"], ab["B"]
        d_out, d_in = target_shapes[module]
        if tuple(a.shape) != (rank, d_in) or tuple(b.shape) != (d_out, rank):
            raise AdapterError(
                "shape_mismatch",
                f"layer {layer} {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
                f"model (expected ({rank}, {d_in}) / ({d_out}, {rank})); was it trained for another base model?")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterError("invalid_weights", f"layer {layer} {module}: weights must be floating point")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError("non_finite_weights", f"layer {layer} {module}: weights contain NaN or Inf")
        _check_representable(layer, module, a, b, scale, dtype)
        weights[(layer, module)] = (a, b)

    base_model = cfg.get("base_model_name_or_path")
    return LoraAdapter(rank=rank, alpha=alpha, scale=scale,
                       target_modules=tuple(sorted({m for _, m in weights}, key=LORA_TARGET_MODULES.index)),
                       weights=weights, base_model=base_model if isinstance(base_model, str) else None)
