"""Requests, sampling parameters and the per-sequence state the scheduler moves around."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loramux.composites.registry import CompositeUse

# A LoRA mix: ((adapter name, weight, rank_lo, rank_hi), ...); rank_hi = None
# means the adapter's full rank. Empty = base model alone.
LoraMix = tuple[tuple[str, float, int, "int | None"], ...]

MAX_SEED = 2**64 - 1  # seeds are 64-bit; completion i of a request uses (seed + i) mod 2**64


@dataclass
class SamplingParams:
    """OpenAI-style sampling. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to report per token

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens >= 1, "max_tokens must be at least 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.n >= 1, "n must be at least 1"),
            (self.seed is None or 0 <= self.seed <= MAX_SEED, f"seed must be in [0, {MAX_SEED}]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


_seq_counter = itertools.count()


class Sequence:
    """One completion being generated (a request with n > 1 has n of them).

    `num_computed_tokens` counts the tokens whose K/V are in the cache;
    `block_table` lists the cache blocks that hold them.
    """

    def __init__(self, request_id: str, index: int, prompt_ids: list[int], sampling: SamplingParams,
                 lora_mix: LoraMix, seed: int = 0, lora_identity: tuple | None = None,
                 composite: CompositeUse | None = None):
        """`lora_identity`: what makes this sequence's K/V besides the tokens, for prefix-cache keys: the
        mix's adapters by content (checksums, weights, ranks) and a composite's gate settings; defaults
        to the mix itself (names)."""
        self.seq_id = next(_seq_counter)
        self.request_id = request_id
        self.index = index
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.sampling = sampling
        self.lora_mix = lora_mix
        self.seed = seed  # of the counter-based sampling noise (engine/sampler.py), in [0, 2**64)
        self.lora_identity = lora_mix if lora_identity is None else lora_identity
        self.composite = composite  # a CompositeUse when the request names a composite expert (mix = its members)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_keys: list = []  # prefix-cache identity of each full computed block
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        self.arrival_time = time.monotonic()
        self.first_scheduled_time: float | None = None

    @property
    def adapter_names(self) -> frozenset[str]:
        return frozenset(name for name, *_ in self.lora_mix)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id}/{self.index}, len={len(self)}, "
                f"computed={self.num_computed_tokens}, status={self.status.value})")
