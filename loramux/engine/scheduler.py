"""Continuous batching: which sequences run in the next step, and how many tokens each.

Policy, in order:
1. Running sequences that decode (one token each) go first, so long prompts
   never starve them. If the KV cache is full, the newest running sequence is
   preempted (its blocks freed, recomputed later from its tokens).
2. Running sequences still in prefill continue with a chunk of their prompt.
3. Waiting sequences are admitted first-come first-served while token budget,
   sequence slots, KV blocks and the adapter cap allow. Admission stops at the
   first sequence that does not fit, so a request for a rare adapter cannot be
   overtaken forever by requests for popular ones. Sequences whose adapters
   cannot be made resident yet (every slot pinned) are passed over without
   blocking the others.

Adapter residency goes through `residency` (the adapter store): a sequence's
adapters are paged in before it is admitted and pinned while it runs.

The scheduler never touches tensors: it returns a `SchedulePlan`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Protocol

from loramux.config import SchedulerConfig
from loramux.engine.block_manager import BlockManager
from loramux.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, from seq.num_computed_tokens on
    samples: bool  # this step reaches the end of the sequence, so its next token is sampled


@dataclass
class SchedulePlan:
    decode: list[ScheduledSeq] = field(default_factory=list)
    prefill: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def scheduled(self) -> list[ScheduledSeq]:
        return self.decode + self.prefill

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.decode and not self.prefill


class AdapterResidency(Protocol):
    def ensure_resident(self, names: frozenset[str]) -> bool: ...
    def pin(self, names: Iterable[str]) -> None: ...
    def unpin(self, names: Iterable[str]) -> None: ...


class AllResident:
    """Residency for engines whose adapters never leave their slots (and for tests)."""

    def ensure_resident(self, names: frozenset[str]) -> bool:
        return True

    def pin(self, names: Iterable[str]) -> None:
        pass

    def unpin(self, names: Iterable[str]) -> None:
        pass


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, residency: AdapterResidency | None = None):
        self.config = config
        self.blocks = blocks
        self.residency = residency or AllResident()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order, oldest first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark `seq` finished (or aborted) and give its blocks back."""
        if seq in self.running:
            self.running.remove(seq)
            self.residency.unpin(seq.adapter_names)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.blocks.free(seq)

    def _preempt(self, seq: Sequence, plan: SchedulePlan) -> None:
        self.running.remove(seq)
        self.residency.unpin(seq.adapter_names)
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)

    def _reserve(self, seq: Sequence, num_tokens: int, plan: SchedulePlan, scheduled: set[int]) -> bool:
        """Make room for `num_tokens` more tokens of a running seq, preempting the newest others.

        Returns False when `seq` itself had to be preempted.
        """
        while not self.blocks.can_grow(seq, seq.num_computed_tokens + num_tokens):
            victim = next((s for s in reversed(self.running) if s.seq_id not in scheduled), None)
            self._preempt(victim, plan)
            if victim is seq:
                return False
        self.blocks.grow(seq, seq.num_computed_tokens + num_tokens)
        return True

    def schedule(self) -> SchedulePlan:
        plan = SchedulePlan()
        budget = self.config.max_num_batched_tokens
        adapters: set[str] = set()
        scheduled: set[int] = set()

        def fits_adapter_cap(seq: Sequence) -> bool:
            return len(adapters | seq.adapter_names) <= self.config.max_loras_per_batch

        def take(seq: Sequence, n: int, into: list[ScheduledSeq]) -> None:
            nonlocal budget
            into.append(ScheduledSeq(seq, n, samples=seq.num_computed_tokens + n == len(seq)))
            scheduled.add(seq.seq_id)
            adapters.update(seq.adapter_names)
            budget -= n

        for decoding in (True, False):
            for seq in list(self.running):
                if seq.status is not SequenceStatus.RUNNING or (seq.num_uncomputed_tokens == 1) != decoding:
                    continue
                n = min(seq.num_uncomputed_tokens, budget)
                if n == 0 or not fits_adapter_cap(seq):
                    continue
                if self._reserve(seq, n, plan, scheduled):
                    take(seq, n, plan.decode if decoding else plan.prefill)

        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.config.max_num_seqs or seq in plan.preempted:
                break
            if not fits_adapter_cap(seq):
                break
            if not self.residency.ensure_resident(seq.adapter_names):
                continue
            cached = self.blocks.match_prefix(seq)
            n = min(len(seq) - cached, budget)
            if not self.blocks.can_grow(seq, cached + n):
                self.blocks.free(seq)
                break
            seq.num_computed_tokens = cached
            self.blocks.grow(seq, cached + n)
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            self.residency.pin(seq.adapter_names)
            take(seq, n, plan.prefill)
        return plan
