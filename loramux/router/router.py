"""Pick and weigh experts for a request, LoraRetriever-style.

A request's text is embedded like the experts' cards; the k most similar keys
are its candidates, and those at or above the threshold are used:
- select:  the best one, weight 1;
- mixture: the top k, each token's LoRA output mixed in every layer with
           weights softmax(similarity / temperature) (the plan's K assignments);
- fusion:  the same weights (rounded to multiples of 0.05), but the experts'
           A and B are averaged into one derived adapter, which the store
           builds once per (experts, weights) and caches.
No candidate above the threshold: the base model answers alone.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import time
from dataclasses import dataclass

from loramux.adapters_store.registry import AdapterRecord
from loramux.config import RouterConfig
from loramux.router.embedders import Embedder
from loramux.router.index import ExpertIndex, build_key

logger = logging.getLogger(__name__)

FUSION_WEIGHT_STEP = 0.05  # fusion weights are rounded to this so one cached fusion serves many requests


@dataclass
class RoutingDecision:
    """What the router chose; `experts` are (name, weight, similarity), empty for the base model."""

    strategy: str
    experts: list[tuple[str, float, float]]
    candidates: list[tuple[str, float]]  # the top-k before the threshold, (name, similarity)
    threshold: float
    seconds: float
    adapter: str | None = None  # what served it, when that is not the experts themselves (a fusion)

    def lora_mix(self, store) -> tuple:
        """The request's mix, (name, weight, rank_lo, rank_hi) entries; a fusion of several experts is
        built (or found) in `store` (an AdapterStore: call this where the store may be changed)."""
        if self.strategy != "fusion" or len(self.experts) < 2:
            return tuple((name, weight, 0, None) for name, weight, _ in self.experts)
        self.adapter = store.fuse([name for name, _, _ in self.experts], [weight for _, weight, _ in self.experts])
        return ((self.adapter, 1.0, 0, None),)

    def to_json(self) -> dict:
        """The response's `loramux.router` field."""
        out = {"strategy": self.strategy, "threshold": self.threshold,
               "experts": [{"name": n, "weight": round(w, 6), "similarity": round(s, 6)} for n, w, s in self.experts],
               "candidates": [{"name": n, "similarity": round(s, 6)} for n, s in self.candidates],
               "latency_ms": round(self.seconds * 1e3, 3)}
        if self.adapter is not None:
            out["adapter"] = self.adapter
        return out


def rounded_weights(weights: list[float], step: float = FUSION_WEIGHT_STEP) -> list[float]:
    """Weights rounded to multiples of `step` (none below it), then renormalised to sum to 1."""
    rounded = [max(step, round(w / step) * step) for w in weights]
    total = sum(rounded)
    return [w / total for w in rounded]


def softmax_weights(similarities: list[float], temperature: float) -> list[float]:
    """softmax(s / temperature), computed stably; sums to 1."""
    top = max(similarities)
    exps = [math.exp((s - top) / temperature) for s in similarities]
    total = sum(exps)
    return [e / total for e in exps]


class Router:
    def __init__(self, embedder: Embedder, config: RouterConfig, records: dict[str, AdapterRecord]):
        self.embedder = embedder
        self.config = config
        self.index = ExpertIndex()
        # Re-keying runs the embedder: one worker does it in order, off the engine thread (queue_update).
        self._updates = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="loramux-rekey")
        for name, record in records.items():
            self.update(name, record)
        logger.info("router: %d experts indexed with the %s embedder", len(self.index), embedder.name)

    @property
    def threshold(self) -> float:
        """The server's default: --router-threshold, else the embedder's calibrated value."""
        return self.embedder.default_threshold if self.config.threshold is None else self.config.threshold

    def queue_update(self, name: str, record: AdapterRecord | None) -> None:
        """`update` on the router's worker (the store calls this on the engine thread: it must return at once)."""
        self._updates.submit(self.update, name, record)

    def wait_for_updates(self) -> None:
        """Block until every queued update is in the index (an upload answers after its adapter is routable)."""
        self._updates.submit(lambda: None).result()

    def update(self, name: str, record: AdapterRecord | None) -> None:
        """Re-key one adapter after it was registered or replaced (record), or forget it (None)."""
        if record is None or record.fused_from:
            self.index.remove(name)
            return
        key = build_key(self.embedder, record.description, record.examples)
        if key is None:
            logger.warning("adapter %s has no description and no examples: the router will not choose it", name)
            self.index.remove(name)
            return
        self.index.put(name, key)

    def route(self, text: str, strategy: str | None = None, top_k: int | None = None,
              temperature: float | None = None, threshold: float | None = None) -> RoutingDecision:
        """Choose experts for `text`; per-request settings override the server's defaults."""
        start = time.perf_counter()
        cfg = self.config
        strategy = strategy or cfg.strategy
        k = 1 if strategy == "select" else (top_k or cfg.top_k)
        temperature = temperature or cfg.temperature
        threshold = self.threshold if threshold is None else threshold
        candidates = self.index.search(self.embedder.embed([text])[0], k)
        kept = [(name, sim) for name, sim in candidates if sim >= threshold]
        weights = softmax_weights([sim for _, sim in kept], temperature) if kept else []
        if strategy == "fusion" and len(kept) > 1:
            weights = rounded_weights(weights)
        experts = [(name, w, sim) for (name, sim), w in zip(kept, weights)]
        return RoutingDecision(strategy, experts, candidates, threshold, time.perf_counter() - start)
