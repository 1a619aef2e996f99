"""LoraRetriever-style routing: embed the request, find the nearest experts' keys, select or compose them."""

from loramux.router.embedders import Embedder, build_embedder
from loramux.router.calibration import card_margin, generic_similarity, load_prompts
from loramux.router.index import ExpertIndex, embed_card, key_of
from loramux.router.router import Router, RoutingDecision, softmax_weights


def attach_router(engine) -> Router:
    """A router over the engine's adapters and composites, kept up to date as they are registered and deleted."""
    config = engine.config.router
    router = Router(build_embedder(config.embedder, engine, config.embedder_dtype), config, engine.store.records,
                    engine.composites.records)
    engine.store.change_listeners.append(router.queue_update)
    engine.composites.change_listeners.append(router.queue_composite_update)
    return router


__all__ = ["Embedder", "ExpertIndex", "Router", "RoutingDecision", "attach_router", "build_embedder",
           "card_margin", "embed_card", "generic_similarity", "key_of", "load_prompts", "softmax_weights"]
