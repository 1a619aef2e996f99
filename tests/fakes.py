"""Fake sequences for testing the block manager and scheduler without a model."""

from __future__ import annotations

from loramux.engine.sequence import SamplingParams, Sequence


def fake_seq(num_prompt_tokens: int, adapter: str | None = None, first_token: int = 0, rid: str = "r") -> Sequence:
    mix = ((adapter, 1.0, 0, 8),) if adapter else ()
    return Sequence(rid, 0, list(range(first_token, first_token + num_prompt_tokens)), SamplingParams(), mix)
