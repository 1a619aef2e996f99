"""Token sampling for a batch of sequences with different parameters, on the logits' device.

One batched filter (temperature, top-k, top-p, min-p) and one draw serve
every row; the host sees one transfer per step for the sampled tokens and
one more when some row asks for logprobs.

Randomness is counter-based: each row's one uniform number is an integer
hash of (the sequence's 64-bit seed, its output position), computed with
torch integer ops on the logits' device; the draw inverts the row's
cumulative distribution at it (one `searchsorted` for all rows). So a seeded
request draws the same tokens whatever else is in the batch and after a
preemption, the uniforms are bit-identical on the CPU and a GPU, and no
generator state lives anywhere.

Logprobs are reported from the model's raw distribution (before temperature
and filters), as OpenAI and vLLM do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loramux.engine.sequence import SamplingParams, TokenLogprob

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (C. Wellons' `hash32` family, constants below 2**31) on int64 values in [0, 2**32).

    Every product stays below 2**63, so int64 arithmetic never overflows and
    the CPU and CUDA give the same bits.
    """
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    x = x ^ (x >> 12)
    x = (x * 0x297A2D39) & _MASK32
    return x ^ (x >> 15)


def counter_uniforms(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One uniform in [0, 1) with 53 random bits per row: seeds, positions [B] int64 -> [B] float64.

    `seeds` holds each 64-bit seed as int64 (two's complement). Row b's value
    depends on (seeds[b], positions[b]) alone.
    """
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    key = _mix32(lo ^ _mix32(hi ^ _mix32(positions & _MASK32)))
    high = _mix32(key ^ 0x5BD1E995) >> 5  # 27 bits
    low = _mix32(key ^ 0x1B873593) >> 6  # 26 bits
    return (high * 2**26 + low).double() * 2.0 ** -53


@dataclass
class SamplingTensors:
    """Per-row sampling parameters as device tensors (built with two host-to-device copies).

    temperature [B] float32 (1 for greedy rows, which take the argmax instead),
    top_k [B] int64 (vocab size when off), top_p, min_p [B] float32,
    seeds, positions [B] int64, greedy [B] bool. The flags say which filters
    any row uses, so unused ones cost nothing and nothing is read back to decide.
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    seeds: torch.Tensor
    positions: torch.Tensor
    greedy: torch.Tensor
    uses_sorted_filter: bool
    uses_min_p: bool
    all_greedy: bool

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], positions: list[int], vocab_size: int,
              device: torch.device) -> "SamplingTensors":
        """seeds in [0, 2**64); positions: each row's output position (the index of the token drawn now)."""
        floats = torch.tensor([[p.temperature or 1.0, p.top_p, p.min_p] for p in params], dtype=torch.float32)
        ints = torch.tensor([[min(p.top_k or vocab_size, vocab_size), s - (1 << 64) if s >= 1 << 63 else s, pos,
                              p.temperature == 0] for p, s, pos in zip(params, seeds, positions)], dtype=torch.int64)
        floats, ints = floats.to(device), ints.to(device)
        sampled = [p for p in params if p.temperature > 0]
        return cls(temperature=floats[:, 0], top_p=floats[:, 1], min_p=floats[:, 2], top_k=ints[:, 0],
                   seeds=ints[:, 1], positions=ints[:, 2], greedy=ints[:, 3].bool(),
                   uses_sorted_filter=any(0 < p.top_k < vocab_size or p.top_p < 1 for p in sampled),
                   uses_min_p=any(p.min_p > 0 for p in sampled), all_greedy=not sampled)


def filter_logits(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p, each on what the previous kept: [B, V] float32 -> [B, V].

    Dropped entries become -inf; the most likely token always stays. top-k
    keeps ties with the k-th value; top-p keeps the smallest prefix (by
    probability) whose mass reaches top_p.
    """
    logits = logits / t.temperature[:, None]
    if t.uses_sorted_filter:
        ordered, order = logits.sort(-1, descending=True)
        kth = ordered.gather(1, (t.top_k - 1)[:, None])
        ordered = ordered.masked_fill(ordered < kth, float("-inf"))
        probs = ordered.softmax(-1)
        drop = (probs.cumsum(-1) - probs >= t.top_p[:, None]) & (t.top_p < 1)[:, None]
        ordered = ordered.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, ordered)
    if t.uses_min_p:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < t.min_p[:, None] * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def draw(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """logits [B, V] float32 -> sampled token ids [B] int64, on the logits' device (greedy rows: argmax).

    Inverse-CDF sampling: the first token whose cumulative probability
    (float64) exceeds the row's uniform times the total; dropped tokens have
    probability 0 and so are never chosen.
    """
    greedy = logits.argmax(-1)
    if t.all_greedy:
        return greedy
    cdf = filter_logits(logits, t).softmax(-1).double().cumsum(-1)
    target = counter_uniforms(t.seeds, t.positions) * cdf[:, -1]
    sampled = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1).clamp_(max=logits.shape[-1] - 1)
    return torch.where(t.greedy, greedy, sampled)


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int],
           positions: list[int]) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [B, V]; one params, seed and output position per row -> token ids and logprobs."""
    logits = logits.float()
    t = SamplingTensors.build(params, seeds, positions, logits.shape[-1], logits.device)
    token_tensor = draw(logits, t)
    tokens = token_tensor.tolist()  # the step's one host transfer for tokens
    logprobs: list[TokenLogprob | None] = [None] * len(params)
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    if wanted:
        rows = torch.tensor(wanted, device=logits.device)
        lp = torch.log_softmax(logits[rows], dim=-1)
        k = max(params[i].logprobs for i in wanted)
        top = lp.topk(k, dim=-1)
        # One transfer: chosen logprob, top values, top indices (exact in float64) side by side.
        packed = torch.cat([lp.gather(1, token_tensor[rows][:, None]).double(), top.values.double(),
                            top.indices.double()], dim=1).tolist()
        for row, values in zip(wanted, packed):
            n = params[row].logprobs
            logprobs[row] = TokenLogprob(token_id=tokens[row], logprob=values[0],
                                         top=[(int(i), v) for i, v in zip(values[1 + k:1 + k + n], values[1:1 + n])])
    return tokens, logprobs
