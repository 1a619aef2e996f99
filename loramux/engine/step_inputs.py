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
from loramux.engine.attention import AttentionBackend, AttentionMetadata
from loramux.kernels.attention_ref import context_slots
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


def attention_metadata(block_tables: list[list[int]], chunks: list[tuple[int, int]], num_decode: int,
                       attention: AttentionBackend, device: torch.device) -> tuple[AttentionMetadata, torch.Tensor]:
    """The attention metadata of a step for `attention` (with its gather plan, if it has one) and the
    positions [T] of its tokens (both on `device`).

    block_tables: each scheduled sequence's blocks, decode sequences first;
    chunks: (tokens already in the cache, new tokens) of each.
    """
    block_size = attention.block_size
    cached = torch.tensor([c for c, _ in chunks])
    query_lens = torch.tensor([n for _, n in chunks])
    pos = torch.tensor([p for c, n in chunks for p in range(c, c + n)], dtype=torch.int64)
    width = max(len(t) for t in block_tables)
    tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int64)
    row_table = torch.repeat_interleave(tables, query_lens, dim=0)
    slot_mapping = context_slots(row_table, pos[:, None], block_size)[:, 0]
    query_start = torch.cat([torch.zeros(1, dtype=torch.int64), query_lens.cumsum(0)])
    sdpa = attention.build_plan(tables, pos, num_decode, chunks[num_decode:])
    meta = AttentionMetadata(
        slot_mapping=slot_mapping.to(device), block_tables=tables.to(device, torch.int32),
        context_lens=(cached + query_lens).to(device, torch.int32), query_start=query_start.to(device, torch.int32),
        num_decode=num_decode, max_query_len=int(query_lens.max()), sdpa=sdpa)
    return meta, pos.to(device)


def prepare_step_inputs(plan: SchedulePlan, attention: AttentionBackend, slots: LoraSlotPool,
                        device: torch.device, composites: CompositeRegistry | None = None,
                        flat_lora_plan: bool = False, lora_mode_tensors: bool = True) -> StepInputs:
    """The tensors of one step for the `attention` backend;
    `composites`: the registry whose gates the step's gated composite requests use;
    `flat_lora_plan`: one LoRA plan level for any mixture depth (a backend that sums repeated rows);
    `lora_mode_tensors`: the LoRA backend reads the plan's per-mode tensors (see `build_lora_plan`)."""
    token_ids: list[int] = []
    runs = []
    logit_rows = []
    gated_rows = []  # (first row, rows, use, samples) of composite requests with a gate (MoLE, MoR)
    for item in plan.scheduled:
        seq, start, n = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
        row = len(token_ids)
        token_ids += seq.token_ids[start:start + n]
        if seq.lora_mix:
            # a MoR composite's experts: its shared member's slot, each with its row of the scaling-vector pools
            scale_rows = seq.composite.scale_rows if seq.composite is not None else ()
            runs.append((row, n, [(slots.slot_of[name], w, lo, hi, scale_rows[k] if scale_rows else -1)
                                  for k, (name, w, lo, hi) in enumerate(seq.lora_mix)]))
        if seq.composite is not None and seq.composite.gate_index >= 0:
            gated_rows.append((row, n, seq.composite, item.samples))
        if item.samples:
            logit_rows.append(row + n - 1)
    attention, pos = attention_metadata(
        [item.seq.block_table for item in plan.scheduled],
        [(item.seq.num_computed_tokens, item.num_new_tokens) for item in plan.scheduled], len(plan.decode),
        attention, device)
    lora_plan = build_lora_plan(runs, slots.scales, slots.max_rank, device, slots.targets, flat=flat_lora_plan,
                                mode_tensors=lora_mode_tensors)
    gates = None
    if gated_rows:
        gates = build_composite_gates(gated_rows, lora_plan, len(token_ids), composites, device)
    return StepInputs(
        input_ids=torch.tensor(token_ids, dtype=torch.int64, device=device),
        positions=pos,
        ctx=StepContext(attention, lora_plan, gates),
        logit_rows=torch.tensor(logit_rows, dtype=torch.int64, device=device),
        is_decode_only=not plan.prefill,
    )
