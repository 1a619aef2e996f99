"""Requests, sampling parameters and the per-sequence state the scheduler moves around."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

# A LoRA mix: ((adapter name, weight, rank_lo, rank_hi), ...); rank_hi = None
# means the adapter's full rank. Empty = base model alone.
LoraMix = tuple[tuple[str, float, int, "int | None"], ...]


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
                 lora_mix: LoraMix, generator: torch.Generator | None):
        self.seq_id = next(_seq_counter)
        self.request_id = request_id
        self.index = index
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.sampling = sampling
        self.lora_mix = lora_mix
        self.composite = None  # a CompositeUse when the request names a composite expert (lora_mix = its members)
        self.generator = generator
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
    def cache_identity(self) -> tuple:
        """What, besides the tokens, makes this sequence's K/V: the mix, and a composite's gate settings."""
        return self.lora_mix, None if self.composite is None else self.composite.cache_key

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
