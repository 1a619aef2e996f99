"""Adapter-popularity patterns and a per-token float32 loop: the ground truth for LoRA ops."""

from __future__ import annotations

import random
from dataclasses import replace

import torch

from loramux.kernels import build_lora_plan
from loramux.kernels.plan import Segment, with_mode

POPULARITY = ("all_distinct", "uniform", "zipf", "all_same", "one_dominant", "with_base_tokens")


def random_runs(pattern: str, num_tokens: int, num_slots: int, ranks: list[int], depth: int, run_len: int,
                seed: int):
    """Runs of `run_len` tokens (1 = decode) with slots drawn by `pattern`; K = `depth` assignments each."""
    rng = random.Random(seed)
    weights = {
        "all_distinct": None, "uniform": [1.0] * num_slots, "zipf": [1 / (i + 1) for i in range(num_slots)],
        "all_same": [1.0] + [0.0] * (num_slots - 1), "one_dominant": [20.0] + [1.0] * (num_slots - 1),
        "with_base_tokens": [1.0] * num_slots,
    }[pattern]
    runs, start, counter = [], 0, 0
    while start < num_tokens:
        count = min(run_len, num_tokens - start)
        if pattern == "with_base_tokens" and rng.random() < 0.3:
            start += count
            continue
        slots = []
        for _ in range(depth):
            if weights is None:
                slot = counter % num_slots
                counter += 1
            else:
                slot = rng.choices(range(num_slots), weights)[0]
            if slot not in slots:
                slots.append(slot)
        assignments = []
        for slot in slots:
            lo = rng.randrange(0, ranks[slot] // 2) if rng.random() < 0.3 else 0
            hi = rng.randrange(lo + 1, ranks[slot] + 1) if rng.random() < 0.3 else ranks[slot]
            assignments.append((slot, rng.uniform(0.2, 1.0), lo, hi))
        runs.append((start, count, assignments))
        start += count
    return runs


def random_pool(num_slots: int, ranks: list[int], r_max: int, d_in: int, d_out: int, seed: int):
    """Stacked A [S, r_max, d_in], B [S, d_out, r_max] zero-padded above each slot's rank, and scales [S]."""
    g = torch.Generator().manual_seed(seed)
    a = torch.zeros(num_slots, r_max, d_in)
    b = torch.zeros(num_slots, d_out, r_max)
    for s, r in enumerate(ranks):
        a[s, :r] = torch.randn(r, d_in, generator=g) / d_in ** 0.5
        b[s, :, :r] = torch.randn(d_out, r, generator=g) / r ** 0.5
    scales = torch.rand(num_slots, generator=g) + 0.5
    return a, b, scales


def loop_reference(x, a, b, scales, runs, y_offset=0, d_total=None):
    """y[t, off:off+d_out] = sum_k w * scale * B[s][:, lo:hi] @ (A[s][lo:hi] @ x[t]), one token at a time, float32."""
    d_out = b.shape[1]
    y = torch.zeros(x.shape[0], d_total or d_out, dtype=torch.float32)
    for start, count, assignments in runs:
        for t in range(start, start + count):
            for slot, w, lo, hi in assignments:
                delta = b[slot, :, lo:hi].float() @ (a[slot, lo:hi].float() @ x[t].float())
                y[t, y_offset:y_offset + d_out] += w * float(scales[slot]) * delta
    return y


def plan_for(runs, scales, r_max, device="cpu", slot_targets=None, flat=False):
    return build_lora_plan(runs, scales, r_max, device, slot_targets, flat=flat)


def fused_pool(ranks: list[int], r_max: int, d_in: int, d_outs: list[int], seed: int):
    """Fused sub-projections (like q/k/v): A stacked [S, n * r_max, d_in], B stacked [S, sum(d_outs), r_max].

    Also returns each sub-projection's own (A, B) for the reference; scales are shared, as in one adapter.
    """
    subs = [random_pool(len(ranks), ranks, r_max, d_in, d_out, seed + i)[:2] for i, d_out in enumerate(d_outs)]
    scales = random_pool(len(ranks), ranks, r_max, d_in, 1, seed)[2]
    return torch.cat([a for a, _ in subs], 1), torch.cat([b for _, b in subs], 1), scales, subs


def fused_reference(x, subs, scales, runs, d_outs: list[int]):
    """The per-token loop, each sub-projection into its own columns."""
    y = torch.zeros(x.shape[0], sum(d_outs))
    offset = 0
    for (a, b), d_out in zip(subs, d_outs):
        y += loop_reference(x, a, b, scales, runs, y_offset=offset, d_total=sum(d_outs))
        offset += d_out
    return y


def sub_starts(d_outs: list[int]) -> tuple[int, ...]:
    return tuple(sum(d_outs[:i]) for i in range(len(d_outs)))


def with_inert_rows(level, tokens: list[int], r_max: int):
    """The level with one inert row (slot -1) per entry of `tokens` appended, as CUDA-graph padding is.

    The inert rows point at real tokens and carry a non-zero coefficient, a
    full rank range and (in a level with scaled rows) scale row 0, so any read
    or write they caused would show in the result.
    """
    n, count = level.num_rows, len(tokens)
    device = level.token_idx.device

    def cat(name, values, dtype):
        return torch.cat([getattr(level, name), torch.tensor(values, dtype=dtype, device=device)])

    segments = level.segments + tuple(Segment(-1, n + i, n + i + 1, t, 0, r_max) for i, t in enumerate(tokens))
    return with_mode(replace(
        level, token_idx=cat("token_idx", tokens, torch.int64), slot_idx=cat("slot_idx", [-1] * count, torch.int64),
        coeff=cat("coeff", [0.7] * count, torch.float32), rank_lo=cat("rank_lo", [0] * count, torch.int64),
        rank_hi=cat("rank_hi", [r_max] * count, torch.int64),
        mix_index=None if level.mix_index is None else cat("mix_index", [0] * count, torch.int64),
        scale_idx=None if level.scale_idx is None else cat("scale_idx", [0] * count, torch.int64),
        seg_starts=torch.tensor([s.start for s in segments] + [n + count], dtype=torch.int64, device=device),
        seg_slots=torch.tensor([s.slot for s in segments], dtype=torch.int64, device=device),
        segments=segments), level.mode)


RANKS = [4, 8, 16, 64, 8, 4, 16, 64]  # a pool padded to rank 64, ranks 4..64


def run_case(shrink, expand, pattern: str, run_len: int, depth: int, mode: str, num_tokens: int, d_in: int,
             d_outs: list[int], dtype=torch.float32, device="cpu", seed=0, inert=False, coeff_factor=1.0,
             inactive=(), r_max=64, flat=False, slot_dtype=None, ranks=RANKS):
    """Fused shrink + expand of every plan level against the float32 per-token loop.

    Sub-projections of uneven widths (d_outs), so column tiles meet their
    boundaries. inert: slot -1 rows pointing at real tokens appended to each
    level; coeff_factor: the plan's coeff tensors are scaled in place after the
    plan is built (the ops must read them there); inactive: slots marked as not
    targeting this linear in `slot_active`; flat: one plan level for every
    assignment; slot_dtype: the slot tensors' dtype when it differs from x's
    and y's; ranks: each slot's rank (<= r_max). Returns (got, expected), float32 on the CPU.
    """
    a, b, scales, subs = fused_pool(ranks, r_max, d_in, d_outs, seed)
    runs = random_runs(pattern, num_tokens, len(ranks), ranks, depth, run_len, seed=POPULARITY.index(pattern))
    x = torch.randn(num_tokens, d_in, generator=torch.Generator().manual_seed(seed + 2)).to(dtype)
    base = torch.randn(num_tokens, sum(d_outs)).to(dtype)
    slot_dtype = slot_dtype or dtype
    to = dict(device=device, dtype=slot_dtype)
    y, a_dev, b_dev = base.to(device).clone(), a.to(**to).contiguous(), b.to(**to).contiguous()
    active = torch.tensor([s not in inactive for s in range(len(ranks))], dtype=torch.int32, device=device)
    for level in plan_for(runs, scales, r_max, device, flat=flat).levels:
        level = with_mode(level, mode)
        if inert:
            level = with_inert_rows(level, [0, 3, num_tokens - 1, 0], r_max)
        level.coeff.mul_(coeff_factor)
        h = shrink(x.to(device), a_dev, active, level, len(d_outs))
        expand(y, b_dev, h, active, level, sub_starts(d_outs))
    live_runs = [(start, count, [(s, w * coeff_factor, lo, hi) for s, w, lo, hi in assignments if s not in inactive])
                 for start, count, assignments in runs]
    rounded = [(sa.to(slot_dtype).float(), sb.to(slot_dtype).float()) for sa, sb in subs]
    return y.float().cpu(), base.float() + fused_reference(x.float(), rounded, scales, live_runs, d_outs)


def mor_runs(num_tokens: int, run_len: int, ranks: list[int], shared_slot: int, num_rows: int, seed: int,
             experts: int = 3):
    """Plain runs (scale row -1) interleaved with MoR runs: `experts` rows of `shared_slot` per token, each with
    its own scale row (the last expert unscaled, -1, so scaled and unscaled rows share the slot), and base-only
    runs. Assignments are (slot, weight, rank_lo, rank_hi, scale_row); num_rows >= experts - 1."""
    runs = random_runs("with_base_tokens", num_tokens, len(ranks), ranks, 2, run_len, seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (start, count, assignments) in enumerate(runs):
        if i % 2 == 0:
            rows = torch.randperm(num_rows, generator=g)[:experts - 1].tolist() + [-1]
            assignments = [(shared_slot, 0.3 + 0.2 * k, 0, ranks[shared_slot], row) for k, row in enumerate(rows)]
        else:
            assignments = [(slot, w, lo, hi, -1) for slot, w, lo, hi in assignments]
        out.append((start, count, assignments))
    return out


def random_scale_pools(num_rows: int, width: int, d_total: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """λ_A [num_rows + 1, width] and λ_B [num_rows + 1, d_total] pools in [-0.5, 1.5), float32; the last row
    is ones, as `LoraLinear`'s pools keep it for scale row -1."""
    g = torch.Generator().manual_seed(seed)
    rank_scale = torch.cat([torch.rand(num_rows, width, generator=g) * 2 - 0.5, torch.ones(1, width)])
    out_scale = torch.cat([torch.rand(num_rows, d_total, generator=g) * 2 - 0.5, torch.ones(1, d_total)])
    return rank_scale, out_scale


def scaled_reference(x, subs, scales, runs, rank_scale, out_scale, d_outs: list[int], r_max: int):
    """y[t] += sum_k w_k * scale * λ_B ⊙ (B[:, lo:hi] @ (λ_A[lo:hi] ⊙ (A[lo:hi] @ x[t]))), per sub-projection,
    float32, for runs from `mor_runs`; scale row -1 = no scaling."""
    y = torch.zeros(x.shape[0], sum(d_outs))
    for start, count, assignments in runs:
        for t in range(start, start + count):
            offset = 0
            for i, ((a, b), d_out) in enumerate(zip(subs, d_outs)):
                for slot, w, lo, hi, row in assignments:
                    lam_a = rank_scale[row, i * r_max + lo:i * r_max + hi] if row >= 0 else 1.0
                    lam_b = out_scale[row, offset:offset + d_out] if row >= 0 else 1.0
                    delta = lam_b * (b[slot, :, lo:hi] @ (lam_a * (a[slot, lo:hi] @ x[t])))
                    y[t, offset:offset + d_out] += w * float(scales[slot]) * delta
                offset += d_out
    return y
