"""Token sampling for a batch of sequences with different parameters, on the logits' device.

One batched filter (temperature, top-k, top-p, min-p) and one draw serve
every row; the host sees one transfer per step for the sampled tokens and
one more when some row asks for logprobs.

Randomness is counter-based: the noise of row b at vocabulary index v is an
integer hash of (the sequence's 64-bit seed, its output position, v),
computed with torch integer ops on the logits' device. So a seeded request
draws the same tokens whatever else is in the batch, after a preemption,
and on the CPU and a GPU alike (given the same logits), and no generator
state lives anywhere. The draw is the Gumbel-max trick:
argmax(filtered logits / T + Gumbel noise) is a sample of softmax(filtered / T).

Logprobs are reported from the model's raw distribution (before temperature
and filters), as OpenAI and vLLM do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loramux.engine.sequence import SamplingParams, TokenLogprob

_MASK32 = 0xFFFFFFFF
_UNIFORM_BITS = 24  # float32 holds 24 bits exactly


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


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Counter-based Gumbel(0, 1) noise: seeds, positions [B] int64 -> [B, vocab_size] float32.

    `seeds` holds each 64-bit seed as int64 (two's complement); the rows are
    independent streams and position p of a stream never depends on the others.
    """
    device = seeds.device
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    row_key = _mix32(lo ^ _mix32(hi ^ _mix32(positions & _MASK32)))  # [B]
    column_key = _mix32(torch.arange(vocab_size, device=device, dtype=torch.int64) ^ 0x5BD1E995)  # [V]
    bits = _mix32(row_key[:, None] ^ column_key[None, :]) >> (32 - _UNIFORM_BITS)
    uniform = (bits.float() + 0.5) * 2.0 ** -_UNIFORM_BITS  # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(uniform))


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
    """logits [B, V] float32 -> sampled token ids [B] int64, on the logits' device (greedy rows: argmax)."""
    greedy = logits.argmax(-1)
    if t.all_greedy:
        return greedy
    noisy = filter_logits(logits, t) + gumbel_noise(t.seeds, t.positions, logits.shape[-1])
    return torch.where(t.greedy, greedy, noisy.argmax(-1))


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
