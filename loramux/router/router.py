"""Pick and weigh experts for a request, LoraRetriever-style.

A request's text is embedded like the experts' cards; the k most similar keys
are its candidates, and those that cover the request are used:
- select:  the best one, weight 1;
- mixture: the top k, each token's LoRA output mixed in every layer with
           weights softmax(similarity / temperature) (the plan's K assignments);
- fusion:  the same weights (rounded to multiples of 0.05), but the experts'
           A and B are averaged into one derived adapter, which the store
           builds once per (experts, weights) and caches.
A candidate covers the request when its similarity beats the request's
similarity to generic prompts by the expert's calibrated margin
(calibration.py), or, with an explicit threshold (--router-threshold or
per request), when its similarity reaches the threshold. None covers it:
the base model answers alone, and the decision says why.

Registrations and deletions reach the router on the engine thread; embedding
cards and calibrating happen on a worker thread (worker.py), and `route`
first waits for the updates submitted before it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from loramux.adapters_store.registry import AdapterRecord
from loramux.config import RouterConfig
from loramux.router.calibration import card_margin, embedded_generic_prompts, generic_similarity
from loramux.router.embedders import Embedder
from loramux.router.index import ExpertIndex, embed_card, key_of
from loramux.router.worker import UpdateWorker

logger = logging.getLogger(__name__)

FUSION_WEIGHT_STEP = 0.05  # fusion weights are rounded to this so one cached fusion serves many requests
UPDATE_WAIT_SECONDS = 120.0  # a request waits at most this long for pending index updates


@dataclass
class RoutingDecision:
    """What the router chose; `experts` are (name, weight, similarity), empty for the base model."""

    strategy: str
    experts: list[tuple[str, float, float]]
    candidates: list[tuple[str, float]]  # the top-k before the rule, (name, similarity)
    threshold: float | None  # the explicit threshold, or None: the calibrated rule decided
    seconds: float
    adapter: str | None = None  # what served it, when that is not the experts themselves (a fusion)
    margin: float | None = None  # the margin setting (calibrated rule)
    generic_similarity: float | None = None  # the request's similarity to generic prompts (calibrated rule)
    required_margins: dict[str, float] = field(default_factory=dict)  # per candidate (calibrated rule)
    reason: str | None = None  # why the base model answers alone

    def lora_mix(self, store) -> tuple:
        """The request's mix, (name, weight, rank_lo, rank_hi) entries; a fusion of several experts is
        built (or found) in `store` (an AdapterStore: call this where the store may be changed)."""
        if self.strategy != "fusion" or len(self.experts) < 2:
            return tuple((name, weight, 0, None) for name, weight, _ in self.experts)
        self.adapter = store.fuse([name for name, _, _ in self.experts], [weight for _, weight, _ in self.experts])
        return ((self.adapter, 1.0, 0, None),)

    def candidate_json(self, name: str, similarity: float) -> dict:
        """One candidate, with its margin and required margin under the calibrated rule."""
        out = {"name": name, "similarity": round(similarity, 6)}
        if self.generic_similarity is not None:
            out["margin"] = round(similarity - self.generic_similarity, 6)
            out["required_margin"] = round(self.required_margins[name], 6)
        return out

    def to_json(self) -> dict:
        """The response's `loramux.router` field."""
        out = {"strategy": self.strategy, "rule": "threshold" if self.threshold is not None else "calibrated",
               "threshold": self.threshold, "base_model": not self.experts,
               "experts": [{"name": n, "weight": round(w, 6), "similarity": round(s, 6)} for n, w, s in self.experts],
               "candidates": [self.candidate_json(n, s) for n, s in self.candidates],
               "latency_ms": round(self.seconds * 1e3, 3)}
        if self.generic_similarity is not None:
            out["margin"] = self.margin
            out["generic_similarity"] = round(self.generic_similarity, 6)
        if self.reason is not None:
            out["reason"] = self.reason
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


def explain_base(decision: RoutingDecision) -> str:
    """Why no expert was used, in words, from the best candidate's numbers."""
    if not decision.candidates:
        return "no routable experts are registered"
    name, sim = decision.candidates[0]
    if decision.threshold is not None:
        return f"the best expert, {name}, has similarity {sim:.3f}, below the threshold {decision.threshold:.3f}"
    generic = decision.generic_similarity
    return (f"no expert covers this prompt: the closest, {name} (similarity {sim:.3f}), beats the prompt's "
            f"similarity to generic requests ({generic:.3f}) by {sim - generic:+.3f}; its calibrated margin is "
            f"{decision.required_margins[name]:.3f}")


class Router:
    def __init__(self, embedder: Embedder, config: RouterConfig, records: dict[str, AdapterRecord]):
        self.embedder = embedder
        self.config = config
        self.index = ExpertIndex()
        self.generic: torch.Tensor | None = None  # [G, D], the embedded calibration set
        self._updates = UpdateWorker()
        self._updates.submit(self._embed_generic_prompts)
        for name, record in list(records.items()):
            self.queue_update(name, record)
        logger.info("router: indexing %d experts with the %s embedder in the background", len(records),
                    embedder.name)

    def _embed_generic_prompts(self) -> None:
        self.generic = embedded_generic_prompts(self.embedder)

    def queue_update(self, name: str, record: AdapterRecord | None) -> None:
        """Re-key and recalibrate one adapter after it was registered or replaced (record), or forget it
        (None), on the update worker. The store's change listener: it runs on the engine thread and returns
        at once."""
        self._updates.submit(lambda: self._apply(name, record))

    def update(self, name: str, record: AdapterRecord | None) -> None:
        """`queue_update`, returning once the change is in the index."""
        self.queue_update(name, record)
        self.wait_for_updates()

    def wait_for_updates(self, timeout: float | None = UPDATE_WAIT_SECONDS) -> bool:
        """True once every update submitted so far is in the index."""
        return self._updates.wait(timeout)

    def _apply(self, name: str, record: AdapterRecord | None) -> None:
        if record is None or record.in_memory:
            self.index.remove(name)
            return
        card = embed_card(self.embedder, record.description, record.examples)
        if card is None:
            logger.warning("adapter %s has no description and no examples: the router will not choose it", name)
            self.index.remove(name)
            return
        self.index.put(name, key_of(card), card_margin(card, self.generic))

    def route(self, text: str, strategy: str | None = None, top_k: int | None = None,
              temperature: float | None = None, threshold: float | None = None) -> RoutingDecision:
        """Choose experts for `text`; per-request settings override the server's defaults."""
        start = time.perf_counter()
        if not self.wait_for_updates():
            logger.warning("routing with %d index updates still pending", self._updates.pending)
        cfg = self.config
        strategy = strategy or cfg.strategy
        k = 1 if strategy == "select" else (top_k or cfg.top_k)
        temperature = temperature or cfg.temperature
        threshold = cfg.threshold if threshold is None else threshold
        query = self.embedder.embed([text])[0]
        found = self.index.search(query, k)
        candidates = [(name, sim) for name, sim, _ in found]
        decision = RoutingDecision(strategy, [], candidates, threshold, 0.0)
        if threshold is not None:
            kept = [(name, sim) for name, sim in candidates if sim >= threshold]
        else:
            decision.margin = cfg.margin
            decision.generic_similarity = generic = float(generic_similarity(query[None], self.generic)[0])
            decision.required_margins = {name: min(cfg.margin, card) for name, _, card in found}
            kept = [(name, sim) for name, sim in candidates if sim - generic >= decision.required_margins[name]]
        weights = softmax_weights([sim for _, sim in kept], temperature) if kept else []
        if strategy == "fusion" and len(kept) > 1:
            weights = rounded_weights(weights)
        decision.experts = [(name, w, sim) for (name, sim), w in zip(kept, weights)]
        if not kept:
            decision.reason = explain_base(decision)
        decision.seconds = time.perf_counter() - start
        return decision
