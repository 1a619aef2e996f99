"""Continuous batching: which sequences run in the next step, and how many tokens each.

Policy, in order:
1. Running sequences that decode (one token each) go first, so long prompts
   never starve them. If the KV cache is full, the newest running sequence is
   preempted (its blocks freed, recomputed later from its tokens).
2. Running sequences still in prefill continue with a chunk of their prompt.
3. Waiting sequences are admitted first-come first-served while token budget,
   sequence slots, KV blocks and the adapter cap allow. Admission stops at the
   first sequence that does not fit, so a request for a rare adapter cannot be
   overtaken forever by requests for popular ones.
4. Bounded wait for a GPU slot: when a waiting sequence's adapters cannot be
   made resident (every slot pinned), later sequences that need an adapter are
   not admitted this step (requests for the base model alone still are). No
   new pin lands on a slot meanwhile, so the next slot to be unpinned goes to
   the first waiting sequence: first come first served among adapters, and a
   wait no longer than the running sequences that hold the slots.
5. A page-in that fails (unreadable files, a copy that raises) fails the
   sequences that need that adapter (`plan.failed`), nobody else.
6. After a step that raised, its sequences are suspects: preempted, then run
   one per step until each has run a step alone. A suspect that fails alone
   caused it; the others go on (`quarantine`, `cleared`).

Adapter residency goes through `residency` (the adapter store): a sequence's
adapters are paged in before it is admitted and pinned while it runs.

The scheduler never touches tensors: it returns a `SchedulePlan`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Protocol

from loramux.adapters_store.peft_format import AdapterError
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
    failed: list[tuple[Sequence, str]] = field(default_factory=list)  # page-in failed: (seq, why)

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
    def ensure_resident(self, names: frozenset[str]) -> bool:
        """False while no slot can be freed; raises AdapterError when a page-in fails."""
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
        self.suspects: deque[Sequence] = deque()  # after a failed step: run alone, oldest first

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
        if seq in self.suspects:
            self.suspects.remove(seq)
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

    def quarantine(self, seqs: list[Sequence]) -> None:
        """The step that ran `seqs` raised: preempt them all; they run alone until cleared."""
        plan = SchedulePlan()
        for seq in sorted(seqs, key=lambda s: s.seq_id, reverse=True):
            if seq in self.running:
                self._preempt(seq, plan)
            if seq not in self.suspects:
                self.suspects.appendleft(seq)

    def cleared(self, seq: Sequence) -> None:
        """A suspect ran a step alone without error."""
        if seq in self.suspects:
            self.suspects.remove(seq)

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
        if self.suspects:
            return self._schedule_alone(self.suspects[0])
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

        slot_wait = False  # an earlier waiting sequence is waiting for a slot
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.config.max_num_seqs or seq in plan.preempted:
                break
            if not fits_adapter_cap(seq):
                break
            if seq.adapter_names and slot_wait:
                continue
            resident = self._page_in(seq, plan)
            if resident is None:
                continue
            if not resident:
                slot_wait = True
                continue
            n = self._admit(seq, budget)
            if n is None:
                break
            take(seq, n, plan.prefill)
        return plan

    def _page_in(self, seq: Sequence, plan: SchedulePlan) -> bool | None:
        """ensure_resident for `seq`; None when its page-in failed (it is then in plan.failed)."""
        try:
            return self.residency.ensure_resident(seq.adapter_names)
        except AdapterError as exc:  # that adapter cannot be loaded: only the sequences that need it fail
            self.waiting.remove(seq)
            plan.failed.append((seq, str(exc)))
            return None

    def _admit(self, seq: Sequence, budget: int) -> int | None:
        """Move a waiting seq (adapters resident) to running with up to `budget` tokens; None if KV is short."""
        cached = self.blocks.match_prefix(seq)
        n = min(len(seq) - cached, budget)
        if not self.blocks.can_grow(seq, cached + n):
            self.blocks.free(seq)
            return None
        seq.num_computed_tokens = cached
        self.blocks.grow(seq, cached + n)
        self.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = time.monotonic()
        self.running.append(seq)
        self.residency.pin(seq.adapter_names)
        return n

    def _schedule_alone(self, seq: Sequence) -> SchedulePlan:
        """A plan with one (waiting, preempted) suspect only, the others wait: it prefills from scratch."""
        plan = SchedulePlan()
        resident = self._page_in(seq, plan)
        if resident is None:
            self.suspects.remove(seq)
            return plan
        n = self._admit(seq, self.config.max_num_batched_tokens) if resident else None
        if n is None:  # no slot or no KV for it now: it stops being a suspect, the others run
            self.suspects.remove(seq)
            return self.schedule()
        plan.prefill.append(ScheduledSeq(seq, n, samples=seq.num_computed_tokens + n == len(seq)))
        return plan
