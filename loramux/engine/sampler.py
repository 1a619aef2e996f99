"""Token sampling for a batch of sequences with different parameters.

Logprobs are reported from the model's raw distribution (before temperature
and filters), as OpenAI and vLLM do.
"""

from __future__ import annotations

import torch

from loramux.engine.sequence import SamplingParams, TokenLogprob


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Apply temperature, top-k, top-p and min-p to one row of logits [V] (float32)."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop = probs.cumsum(-1) - probs >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator]) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [B, V] float32; one params and generator per row -> token ids and logprobs."""
    greedy = logits.argmax(-1).tolist()
    tokens = []
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.temperature == 0:
            tokens.append(greedy[row])
            continue
        probs = filter_logits(logits[row], p).softmax(-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, using this row's generator.
        noise = torch.empty_like(probs).exponential_(generator=gen)
        tokens.append(int((probs / noise).argmax()))
    logprobs: list[TokenLogprob | None] = [None] * len(params)
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    if wanted:
        lp = torch.log_softmax(logits[wanted], dim=-1)
        for j, row in enumerate(wanted):
            top = torch.topk(lp[j], params[row].logprobs) if params[row].logprobs else None
            logprobs[row] = TokenLogprob(
                token_id=tokens[row], logprob=float(lp[j, tokens[row]]),
                top=[] if top is None else list(zip(top.indices.tolist(), top.values.tolist())))
    return tokens, logprobs
