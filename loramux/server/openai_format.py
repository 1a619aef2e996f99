"""Turn engine outputs into OpenAI response bodies and stream chunks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property

import orjson
from transformers import PreTrainedTokenizerBase

from loramux.engine import RequestOutput
from loramux.engine.sequence import LoraMix, TokenLogprob


def loramux_info(mix: LoraMix, routing: dict | None, composites: list[dict] | None = None) -> dict:
    """The `loramux` field: which adapters served the request, for routed requests the router's decision,
    and for a composite expert what its gate did (one report per completion; a dict when there is one)."""
    info = {"adapters": [{"name": n, "weight": w, "rank_lo": lo, "rank_hi": hi} for n, w, lo, hi in mix]}
    if routing is not None:
        info["router"] = routing
    if composites:
        info["composite"] = composites[0] if len(composites) == 1 else composites
    return info


def display_mix(mix) -> LoraMix:
    """The mix as submitted, with a composite's option entry ({"name", ...}) shown as its name."""
    return tuple((e["name"], 1.0, 0, None) if isinstance(e, dict) else e for e in mix)


def adapters_header(mix: LoraMix) -> str:
    return ",".join(f"{n}:{w:g}" for n, w, _, _ in mix)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _token_text(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    return tokenizer.decode([token_id])


def completion_logprobs(tokenizer, logprobs: list[TokenLogprob], text_offset: int = 0) -> dict | None:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
    if not logprobs:
        return None
    tokens = [_token_text(tokenizer, lp.token_id) for lp in logprobs]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{_token_text(tokenizer, t): v for t, v in lp.top} for lp in logprobs],
            "text_offset": offsets}


def chat_logprobs(tokenizer, logprobs: list[TokenLogprob]) -> dict | None:
    if not logprobs:
        return None

    def entry(token_id: int, value: float) -> dict:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    return {"content": [entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in logprobs]}


@dataclass
class ResponseContext:
    """What every body of one request shares."""

    request_id: str
    model: str
    chat: bool
    mix: LoraMix
    tokenizer: PreTrainedTokenizerBase
    want_logprobs: bool
    routing: dict | None = None  # RoutingDecision.to_json() of a routed request
    created: int = field(default_factory=lambda: int(time.time()))

    def _logprobs(self, logprobs: list[TokenLogprob], text_offset: int = 0) -> dict | None:
        if not self.want_logprobs:
            return None
        if self.chat:
            return chat_logprobs(self.tokenizer, logprobs)
        return completion_logprobs(self.tokenizer, logprobs, text_offset)

    def _envelope(self, kind: str) -> dict:
        return {"id": self.request_id, "object": kind, "created": self.created, "model": self.model}

    def full_body(self, choices: list[RequestOutput], prompt_tokens: int) -> dict:
        """choices: one merged output per completion (`RequestOutput.accumulator` + `merge`)."""
        if self.chat:
            body_choices = [{"index": c.index, "message": {"role": "assistant", "content": c.new_text},
                             "logprobs": self._logprobs(c.logprobs), "finish_reason": c.finish_reason}
                            for c in choices]
        else:
            body_choices = [{"index": c.index, "text": c.new_text, "logprobs": self._logprobs(c.logprobs),
                             "finish_reason": c.finish_reason} for c in choices]
        return self._envelope("chat.completion" if self.chat else "text_completion") | {
            "choices": body_choices, "usage": usage(prompt_tokens, sum(c.num_output_tokens for c in choices)),
            "loramux": loramux_info(self.mix, self.routing, [c.composite for c in choices if c.composite])}

    def chunk(self, index: int, text: str, finish_reason: str | None, logprobs: list[TokenLogprob],
              text_offset: int, first: bool, composite: dict | None = None) -> bytes:
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": self._logprobs(logprobs),
                      "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text, "logprobs": self._logprobs(logprobs, text_offset),
                      "finish_reason": finish_reason}
        info = (self._plain_info if not first and composite is None else
                loramux_info(self.mix, self.routing if first else None, [composite] if composite else None))
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion") | {
            "choices": [choice], "loramux": info}
        return sse(body)

    @cached_property
    def _plain_info(self) -> dict:
        """The `loramux` field of every chunk but the first and a composite's last: built once, not per token."""
        return loramux_info(self.mix, None)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion") | {
            "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
        return sse(body)


def sse(body: dict) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
