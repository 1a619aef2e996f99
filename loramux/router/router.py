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

Composite experts (MoLE, MoR, MoRE) with a card are keyed and calibrated like
experts. `select` takes a composite when its card is the best match and
covers the request; the strategies `mole`, `mor` and `more` send the request
to the best-matching composite of that type (or the one named by
`composite`), which covers it when its own card or its best member (MoLE) or
task expert (MoRE) does. A MoRE composite's task is its task named like the
most similar expert.

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
from loramux.composites.format import COMPOSITE_TYPES
from loramux.composites.registry import CompositeRecord
from loramux.config import RouterConfig
from loramux.router.calibration import card_margin, embedded_generic_prompts, generic_similarity
from loramux.router.embedders import Embedder
from loramux.router.index import ADAPTER, ExpertIndex, embed_card, key_of
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
    reason: str | None = None  # why the base model answers alone, or why a composite does
    composite: dict | None = None  # the chosen composite: {"name", "type"} and, for MoRE, "task"

    def lora_mix(self, store) -> tuple:
        """The request's mix, (name, weight, rank_lo, rank_hi) entries; a fusion of several experts is
        built (or found) in `store` (an AdapterStore: call this where the store may be changed); a composite
        is one option entry {"name", "task"?}, which the engine resolves."""
        if self.composite is not None:
            return ({key: value for key, value in self.composite.items() if key != "type"},)
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
        if self.composite is not None:
            out["composite"] = self.composite
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


@dataclass(frozen=True)
class CoverageRule:
    """Whether an expert (or composite) covers a request: its similarity reaches the explicit `threshold`, or
    else beats the request's `generic` similarity by min(`margin`, its card margin)."""

    threshold: float | None
    margin: float
    generic: float | None

    def required_margin(self, card: float) -> float:
        return min(self.margin, card)

    def covers(self, similarity: float, card: float) -> bool:
        if self.threshold is not None:
            return similarity >= self.threshold
        return similarity - self.generic >= self.required_margin(card)


class Router:
    def __init__(self, embedder: Embedder, config: RouterConfig, records: dict[str, AdapterRecord],
                 composites: dict[str, CompositeRecord] | None = None):
        self.embedder = embedder
        self.config = config
        self.index = ExpertIndex()
        self.generic: torch.Tensor | None = None  # [G, D], the embedded calibration set
        self.composites: dict[str, CompositeRecord] = {}  # the routable ones; replaced whole on the update worker
        self._updates = UpdateWorker()
        self._updates.submit(self._embed_generic_prompts)
        for name, record in list(records.items()):
            self.queue_update(name, record)
        for name, composite in list((composites or {}).items()):
            self.queue_composite_update(name, composite)
        logger.info("router: indexing %d experts and %d composites with the %s embedder in the background",
                    len(records), len(composites or {}), embedder.name)

    def _embed_generic_prompts(self) -> None:
        self.generic = embedded_generic_prompts(self.embedder)

    def queue_update(self, name: str, record: AdapterRecord | None) -> None:
        """Re-key and recalibrate one adapter after it was registered or replaced (record), or forget it
        (None), on the update worker. The store's change listener: it runs on the engine thread and returns
        at once."""
        self._updates.submit(lambda: self._apply(name, record))

    def queue_composite_update(self, name: str, record: CompositeRecord | None) -> None:
        """`queue_update` for a composite expert: the composite registry's change listener."""
        self._updates.submit(lambda: self._apply_composite(name, record))

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
        self._put(name, record.description, record.examples, ADAPTER)

    def _apply_composite(self, name: str, record: CompositeRecord | None) -> None:
        if record is None:
            self.index.remove(name)
        else:
            # The record goes in before its key and comes out after it: a key found in the index has its record.
            self.composites = {**self.composites, name: record}
            if self._put(name, record.description, record.examples, record.type):
                return
        self.composites = {n: r for n, r in self.composites.items() if n != name}

    def _put(self, name: str, description: str, examples: list[str], kind: str) -> bool:
        """Key and calibrate one card into the index; False (and a warning) for a card without any text."""
        card = embed_card(self.embedder, description, examples)
        if card is None:
            logger.warning("%s %s has no description and no examples: the router will not choose it",
                           "adapter" if kind == ADAPTER else "composite", name)
            self.index.remove(name)
            return False
        # A composite's card spans several tasks, so its texts sit far from each other's mean and their
        # leave-one-out margin says how broad it is, not how generic: it needs the full setting (docs/router.md).
        self.index.put(name, key_of(card), card_margin(card, self.generic) if kind == ADAPTER else math.inf, kind)
        return True

    def route(self, text: str, strategy: str | None = None, top_k: int | None = None,
              temperature: float | None = None, threshold: float | None = None,
              composite: str | None = None) -> RoutingDecision:
        """Choose experts (or a composite) for `text`; per-request settings override the server's defaults.
        `composite` names the composite a composite strategy uses (its type is then the strategy).

        Raises ValueError when `composite` is not a routable composite or its type is not `strategy`.
        """
        start = time.perf_counter()
        if not self.wait_for_updates():
            logger.warning("routing with %d index updates still pending", self._updates.pending)
        cfg = self.config
        if composite is not None:
            strategy = self._composite_strategy(composite, strategy)
        strategy = strategy or cfg.strategy
        threshold = cfg.threshold if threshold is None else threshold
        query = self.embedder.embed([text])[0]
        generic = None if threshold is not None else float(generic_similarity(query[None], self.generic)[0])
        rule = CoverageRule(threshold, cfg.margin, generic)
        decision = RoutingDecision(strategy, [], [], threshold, 0.0)
        if threshold is None:
            decision.margin, decision.generic_similarity = cfg.margin, generic
        if strategy in COMPOSITE_TYPES:
            self._to_composite(decision, query, rule, composite)
        elif strategy == "select":
            self._select(decision, query, rule)
        else:
            self._blend(decision, query, rule, top_k or cfg.top_k, temperature or cfg.temperature)
        if not decision.experts and decision.reason is None:
            decision.reason = explain_base(decision)
        decision.seconds = time.perf_counter() - start
        return decision

    def _composite_strategy(self, name: str, strategy: str | None) -> str:
        record = self.composites.get(name)
        if record is None:
            raise ValueError(f"{name!r} is not a composite expert the router can use (it needs a card)")
        if strategy is not None and strategy != record.type:
            raise ValueError(f"composite {name!r} is a {record.type} composite; strategy {strategy!r} cannot use it")
        return record.type

    def _consider(self, decision: RoutingDecision, rule: CoverageRule,
                  found: list[tuple[str, float, float]]) -> list[tuple[str, float, bool]]:
        """Add search results to the decision's candidates: (name, similarity, covers) for each."""
        for name, sim, card in found:
            decision.candidates.append((name, sim))
            decision.required_margins[name] = rule.required_margin(card)
        return [(name, sim, rule.covers(sim, card)) for name, sim, card in found]

    def _select(self, decision: RoutingDecision, query: torch.Tensor, rule: CoverageRule) -> None:
        """The best match, composite or expert; a composite that does not cover the request gives way to
        the best single expert."""
        best = self._consider(decision, rule, self.index.search(query, 1))
        if best and self.index.kind(best[0][0]) != ADAPTER:
            name, sim, covers = best[0]
            record = self.composites.get(name)  # None: deleted since the search
            expert = self._consider(decision, rule, self.index.search(query, 1, kinds=(ADAPTER,)))
            if covers and record is not None:
                rival = f"the best single expert, {expert[0][0]}, has {expert[0][1]:.3f}" if expert else \
                    "no single expert is registered"
                self._choose_composite(decision, query, record, sim, f"its card matches best (similarity "
                                                                     f"{sim:.3f}; {rival})")
                return
            best = expert
        decision.experts = [(name, 1.0, sim) for name, sim, covers in best if covers]

    def _blend(self, decision: RoutingDecision, query: torch.Tensor, rule: CoverageRule, k: int,
               temperature: float) -> None:
        """mixture and fusion: the top k single experts that cover the request, softmax-weighted."""
        kept = [(name, sim) for name, sim, covers in
                self._consider(decision, rule, self.index.search(query, k, kinds=(ADAPTER,))) if covers]
        weights = softmax_weights([sim for _, sim in kept], temperature) if kept else []
        if decision.strategy == "fusion" and len(kept) > 1:
            weights = rounded_weights(weights)
        decision.experts = [(name, w, sim) for (name, sim), w in zip(kept, weights)]

    def _to_composite(self, decision: RoutingDecision, query: torch.Tensor, rule: CoverageRule,
                      named: str | None) -> None:
        """mole, mor, more: the best-matching composite of that type (or the named one), when its card or its
        best member or task expert covers the request."""
        kind = decision.strategy
        found = self._consider(decision, rule, self.index.search(query, 1, kinds=(kind,),
                                                                  names=None if named is None else (named,)))
        if not found:
            decision.reason = f"no {kind} composite with a card is registered"
            return
        name, sim, covers = found[0]
        record = self.composites.get(name)
        if record is None:  # deleted since the search
            decision.reason = f"no {kind} composite with a card is registered"
            return
        parts = self._consider(decision, rule, self.index.search(query, 1, kinds=(ADAPTER,),
                                                                  names=self._parts(record)))
        if covers:
            why = f"its card covers the prompt (similarity {sim:.3f})"
        elif parts and parts[0][2]:
            role = {"mole": "member", "more": "task"}.get(kind, "expert")
            why = f"its {role} {parts[0][0]} covers the prompt (similarity {parts[0][1]:.3f})"
        else:
            return
        self._choose_composite(decision, query, record, sim, why)

    def _parts(self, record: CompositeRecord) -> set[str] | None:
        """The routable experts a composite stands for: its named members (MoLE) or tasks (MoRE); None (every
        expert) for MoR, whose members are built from its own weights. A MoLE or MoRE none of whose members or
        tasks is a routable expert stands for none (empty set): only its own card covers a prompt."""
        if record.type == "mor":
            return None
        return {name for name in (*record.members, *record.tasks) if self.index.kind(name) == ADAPTER}

    def _choose_composite(self, decision: RoutingDecision, query: torch.Tensor, record: CompositeRecord,
                          similarity: float, why: str) -> None:
        """Serve the request with the composite; a MoRE composite runs the task named like the most similar
        expert among its tasks (its default task when none of them is a routable expert)."""
        name = record.name
        decision.experts = [(name, 1.0, similarity)]
        decision.composite = {"name": name, "type": record.type}
        decision.reason = f"composite {name} ({record.type}): {why}"
        if record.type == "more":
            task = self.index.search(query, 1, kinds=(ADAPTER,), names=record.tasks)
            decision.composite["task"] = task[0][0] if task else record.default_task
            decision.reason += (f"; task {task[0][0]}, the most similar expert among its tasks" if task else
                                f"; its default task {record.default_task} (no task is a routable expert)")
