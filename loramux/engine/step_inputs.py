"""Flatten a schedule plan into the tensors of one forward pass.

Decode rows come first (one per sequence), then each prefill chunk as a
contiguous run of rows. Everything the layers need is built here once per
step: token ids, positions, attention metadata and the LoRA plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loramux.adapters_store.slot_pool import LoraSlotPool
from loramux.composites.gates import build_composite_gates
from loramux.composites.registry import CompositeRegistry
from loramux.engine.attention import AttentionMetadata, PrefillSpan, context_slots, window_mask
from loramux.engine.model import StepContext
from loramux.engine.scheduler import SchedulePlan
from loramux.kernels import build_lora_plan


@dataclass
class StepInputs:
    """input_ids, positions: [T]; logit_rows: [B] rows whose next token is sampled."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    ctx: StepContext
    logit_rows: torch.Tensor
    is_decode_only: bool


def prepare_step_inputs(plan: SchedulePlan, block_size: int, sliding_window: int | None, slots: LoraSlotPool,
                        device: torch.device, composites: CompositeRegistry | None = None) -> StepInputs:
    token_ids: list[int] = []
    positions: list[int] = []
    runs = []
    logit_rows = []
    gated_rows = []  # (first row, rows, use, samples) of composite requests with a gate (MoLE, MoR)
    for item in plan.scheduled:
        seq, start, n = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
        row = len(token_ids)
        token_ids += seq.token_ids[start:start + n]
        positions += range(start, start + n)
        if seq.lora_mix:
            runs.append((row, n, [(slots.slot_of[name], w, lo, hi) for name, w, lo, hi in seq.lora_mix]))
        if seq.composite is not None and seq.composite.gate_index >= 0:
            gated_rows.append((row, n, seq.composite, item.samples))
        if item.samples:
            logit_rows.append(row + n - 1)
    pos = torch.tensor(positions, dtype=torch.int64)
    seqs = [item.seq for item in plan.scheduled]
    max_blocks = max(len(s.block_table) for s in seqs)
    tables = torch.tensor([s.block_table + [0] * (max_blocks - len(s.block_table)) for s in seqs], dtype=torch.int64)
    row_table = torch.repeat_interleave(tables, torch.tensor([i.num_new_tokens for i in plan.scheduled]), dim=0)
    slot_mapping = context_slots(row_table, pos[:, None], block_size)[:, 0]

    num_decode = len(plan.decode)
    decode_gather = decode_mask = None
    if num_decode:
        key_pos = torch.arange(int(pos[:num_decode].max()) + 1)[None, :].expand(num_decode, -1)
        decode_gather = context_slots(tables[:num_decode], key_pos, block_size).to(device)
        decode_mask = window_mask(pos[:num_decode, None], key_pos, sliding_window)[:, None, None, :].to(device)

    prefills: list[PrefillSpan] = []
    row = num_decode
    for i, item in enumerate(plan.prefill, start=num_decode):
        start, n = item.seq.num_computed_tokens, item.num_new_tokens
        if start == 0:
            # A chunk from position 0 attends only to itself: batch it with the previous one if same length.
            last = prefills[-1] if prefills else None
            if last is not None and last.gather_idx is None and last.length == n:
                last.num_seqs += 1
            else:
                mask = None
                if sliding_window is not None and n > sliding_window:
                    key_pos = torch.arange(n)
                    mask = window_mask(key_pos[:, None], key_pos[None, :], sliding_window).to(device)
                prefills.append(PrefillSpan(row, n, 1, None, mask))
        else:
            key_pos = torch.arange(start + n)
            mask = window_mask(pos[row:row + n, None], key_pos[None, :], sliding_window).to(device)
            prefills.append(PrefillSpan(row, n, 1, context_slots(tables[i], key_pos, block_size).to(device), mask))
        row += n

    attention = AttentionMetadata(slot_mapping=slot_mapping.to(device), num_decode=num_decode,
                                  decode_gather=decode_gather, decode_mask=decode_mask, prefills=prefills)
    lora_plan = build_lora_plan(runs, slots.scales, slots.max_rank, device)
    gates = None
    if gated_rows:
        lora_plan, gates = build_composite_gates(gated_rows, lora_plan, len(token_ids), composites, device)
    return StepInputs(
        input_ids=torch.tensor(token_ids, dtype=torch.int64, device=device),
        positions=pos.to(device),
        ctx=StepContext(attention, lora_plan, gates),
        logit_rows=torch.tensor(logit_rows, dtype=torch.int64, device=device),
        is_decode_only=not plan.prefill,
    )
