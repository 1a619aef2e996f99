"""Decode steps replayed from CUDA graphs captured at start-up.

One graph per (batch size, LoRA depth, gated): batch sizes from a fixed list
up to `--max-num-seqs`, depths 0..`max_depth`, and, when the server holds
gated composites (MoLE, MoR), a second graph per depth >= 1 that runs their
gates. There is no context bucket: the
paged attention kernel reads block tables and context lengths from device
buffers, so one graph serves every context length. All graphs share one set
of static buffers sized for the largest batch (a graph for batch b uses their
first b rows) and one memory pool.

A replay copies the step's inputs into the buffers and pads the rest; padding
is inert by construction, not by luck:
- a padded attention row writes its K/V to the scratch slot (the first slot
  of the spare KV block past the last real one) and, with context length 1,
  reads only that slot;
- a LoRA plan level has exactly one row per batch row (`token_idx` = row
  number), so no two rows of a level write the same output row and a padded
  row writes only its own padded row; rows without an assignment at that level
  (padding, or a sequence with a shorter mix) have slot -1, which every LoRA
  backend treats as inert. On a server with MoR scaling-vector pools every
  level carries `scale_idx` (-1 where a row is not a MoR expert's), rewritten
  between replays like the slots. The levels run in the gathered (BGMV) mode, whose
  shapes depend only on the row count. Adapter slot tensors are read in
  place, so adapters paged in between replays need no recapture.
- a gated graph runs the composite gates for every batch row (sizes fixed by
  the batch size); a row without a composite (plain, base-only or padding)
  gets gate row 0, every member allowed and top-k = M, so its gate is finite,
  and its `source` points at the all-ones row, so its coefficients keep their
  built value. The gates read their inputs from buffers filled on the device
  (`fill_gates`), and write the per-row gates into `gate_log`, which the step's
  own `CompositeGates` copies out after the replay (`take_log`).

With `use_cuda_graphs=False` the same padded, static-buffer path runs eagerly;
the CPU tests use it to check the padding against the normal path.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from loramux.composites.gates import CoefficientWrite, CompositeGates
from loramux.composites.registry import CompositeRegistry
from loramux.engine.attention import AttentionMetadata
from loramux.engine.model import CausalLM, StepContext
from loramux.engine.step_inputs import StepInputs
from loramux.kernels import LoraPlan, LoraPlanLevel

logger = logging.getLogger(__name__)

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MAX_GRAPH_LORA_DEPTH = 4  # deeper mixes (rare) run eagerly, with kernels compiled by the warm-up


def batch_sizes_up_to(max_batch: int) -> tuple[int, ...]:
    return tuple(b for b in BATCH_SIZES if b < max_batch) + (max_batch,)


@dataclass
class _PlanLevel:
    """Static buffers of one LoRA plan level, one row per batch row ([max_batch] each)."""

    slot_idx: torch.Tensor
    coeff: torch.Tensor
    base_coeff: torch.Tensor  # coeff as built; gated graphs rewrite coeff from it per decoder layer
    rank_lo: torch.Tensor
    rank_hi: torch.Tensor
    scale_idx: torch.Tensor  # row of the scaling-vector pools; -1: none


@dataclass
class _GateInputs:
    """Static inputs of the composite gates, one row per batch row."""

    gate_index: torch.Tensor  # [max_batch] int64
    allowed: torch.Tensor  # [max_batch, M] bool
    top_k: torch.Tensor  # [max_batch] int64
    source: torch.Tensor  # [max_batch] int64: the row itself for a composite row, else the batch size
    gate_log: torch.Tensor  # [L, max_batch, M] float32


class DecodeGraphRunner:
    def __init__(self, model: CausalLM, max_batch: int, max_blocks_per_seq: int, scratch_block: int,
                 block_size: int, max_depth: int, device: torch.device, use_cuda_graphs: bool = True,
                 composites: CompositeRegistry | None = None):
        """composites: the registry whose gates gated graphs run (None, or one without gate rows: no gated
        graphs, and steps with gated composites run eagerly)."""
        self.model = model
        self.batch_sizes = batch_sizes_up_to(max_batch)
        self.max_depth = max_depth
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * block_size
        self.device = device
        self.use_cuda_graphs = use_cuda_graphs

        def zeros(*shape, dtype=torch.int64):
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.input_ids = zeros(max_batch)
        self.positions = zeros(max_batch)
        self.slot_mapping = zeros(max_batch)
        self.block_tables = zeros(max_batch, max_blocks_per_seq, dtype=torch.int32)
        self.context_lens = zeros(max_batch, dtype=torch.int32)
        self.query_start = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.rows = torch.arange(max_batch, device=device)  # logit rows, and every level's token_idx
        self.levels = [_PlanLevel(zeros(max_batch), zeros(max_batch, dtype=torch.float32),
                                  zeros(max_batch, dtype=torch.float32), zeros(max_batch), zeros(max_batch),
                                  zeros(max_batch))
                       for _ in range(max_depth)]
        # the graphs read scale rows only where the linears have pools (a server that serves MoR composites)
        self.scaled = any(m.rank_scale is not None for _, m in model.lora_linears())
        self.composites = composites if composites is not None and composites.gate_weight.shape[0] else None
        self.gates = None
        if self.composites is not None:
            members, num_layers = self.composites.max_members, self.composites.gate_weight.shape[1]
            self.gates = _GateInputs(zeros(max_batch), zeros(max_batch, members, dtype=torch.bool), zeros(max_batch),
                                     zeros(max_batch), zeros(num_layers, max_batch, members, dtype=torch.float32))
        self.graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def keys(self) -> list[tuple[int, int, bool]]:
        """(batch size, depth, gated) of every graph, the largest batch first."""
        gated = (False, True) if self.gates is not None else (False,)
        return [(batch, depth, g) for batch in reversed(self.batch_sizes) for g in gated
                for depth in range(1 if g else 0, self.max_depth + 1)]

    def static_inputs(self, batch: int, depth: int, gated: bool = False) -> StepInputs:
        """The first `batch` rows of the buffers as a decode step with `depth` LoRA levels (and gates)."""
        empty = self.rows[:0]
        levels = tuple(LoraPlanLevel(
            token_idx=self.rows[:batch], slot_idx=lv.slot_idx[:batch], coeff=lv.coeff[:batch],
            rank_lo=lv.rank_lo[:batch], rank_hi=lv.rank_hi[:batch],
            scale_idx=lv.scale_idx[:batch] if self.scaled else None,
            seg_starts=empty, seg_slots=empty, segments=(), mode="gather") for lv in self.levels[:depth])
        attention = AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch], block_tables=self.block_tables[:batch],
            context_lens=self.context_lens[:batch], query_start=self.query_start[:batch + 1], num_decode=batch,
            max_query_len=1)
        gates = None
        if gated:
            g = self.gates
            # a composite has at most M members, so levels past M carry no gated rows
            writes = [CoefficientWrite(lv.coeff[:batch], lv.base_coeff[:batch], g.source[:batch], k)
                      for k, lv in enumerate(self.levels[:min(depth, self.composites.max_members)])]
            gates = CompositeGates(self.composites, self.rows[:batch], g.gate_index[:batch], g.allowed[:batch],
                                   g.top_k[:batch], writes, self.rows[:batch], g.gate_log[:, :batch],
                                   sampled_uses=[])
        return StepInputs(input_ids=self.input_ids[:batch], positions=self.positions[:batch],
                          ctx=StepContext(attention, LoraPlan(levels), gates), logit_rows=self.rows[:batch],
                          is_decode_only=True)

    def can_run(self, inputs: StepInputs) -> bool:
        gated_ok = inputs.ctx.composite is None or self.gates is not None
        return (inputs.is_decode_only and gated_ok and inputs.ctx.attention.num_decode <= self.batch_sizes[-1]
                and len(inputs.ctx.lora_plan.levels) <= self.max_depth)

    def graph_batch(self, num_seqs: int) -> int:
        return next(b for b in self.batch_sizes if b >= num_seqs)

    def fill(self, inputs: StepInputs | None, batch: int, depth: int) -> None:
        """Copy a decode step's inputs into the first rows and pad up to `batch` (None: all padding);
        the first `depth` plan levels get one row per batch row, inert (slot -1) where a row has no assignment."""
        n = 0 if inputs is None else inputs.ctx.attention.num_decode
        if inputs is not None:
            meta = inputs.ctx.attention
            self.input_ids[:n].copy_(inputs.input_ids)
            self.positions[:n].copy_(inputs.positions)
            self.slot_mapping[:n].copy_(meta.slot_mapping)
            self.block_tables[:n, :meta.block_tables.shape[1]].copy_(meta.block_tables)
            self.context_lens[:n].copy_(meta.context_lens)
        self.input_ids[n:batch].zero_()
        self.positions[n:batch].zero_()
        self.slot_mapping[n:batch].fill_(self.scratch_slot)
        self.block_tables[n:batch, 0].fill_(self.scratch_block)
        self.context_lens[n:batch].fill_(1)
        plan_levels = () if inputs is None else inputs.ctx.lora_plan.levels
        for k, level in enumerate(self.levels[:depth]):
            level.slot_idx.fill_(-1)
            level.scale_idx.fill_(-1)
            for buffer in (level.coeff, level.rank_lo, level.rank_hi):
                buffer.zero_()
            if k < len(plan_levels):
                real = plan_levels[k]
                for name in ("slot_idx", "coeff", "rank_lo", "rank_hi"):
                    getattr(level, name).index_copy_(0, real.token_idx, getattr(real, name))
                if real.scale_idx is not None:
                    level.scale_idx.index_copy_(0, real.token_idx, real.scale_idx)
            level.base_coeff.copy_(level.coeff)  # the plan's coefficients as built: no gate has run yet

    def fill_gates(self, gates: CompositeGates | None, batch: int) -> None:
        """Copy a step's gate inputs into the gate buffers (rows = batch rows) and make every other row inert."""
        g, members = self.gates, self.composites.max_members
        g.gate_index[:batch].zero_()
        g.allowed[:batch].fill_(True)
        g.top_k[:batch].fill_(members)
        g.source[:batch].fill_(batch)
        if gates is not None:
            g.gate_index.index_copy_(0, gates.tokens, gates.gate_index)
            g.allowed.index_copy_(0, gates.tokens, gates.allowed)
            g.top_k.index_copy_(0, gates.tokens, gates.top_k)
            g.source.index_copy_(0, gates.tokens, gates.tokens)

    def _forward(self, batch: int, depth: int, gated: bool) -> torch.Tensor:
        s = self.static_inputs(batch, depth, gated)
        return self.model(s.input_ids, s.positions, s.ctx, s.logit_rows)

    def capture_all(self) -> None:
        """Capture every (batch size, depth) graph; the largest first, so the smaller ones reuse its pool."""
        torch.cuda.synchronize(self.device)
        free_before, _ = torch.cuda.mem_get_info(self.device)
        started = time.perf_counter()
        for batch, depth, gated in self.keys():
            self.fill(None, batch, depth)
            if gated:
                self.fill_gates(None, batch)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._forward(batch, depth, gated)  # lazy initialisation must not happen inside the capture
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self._forward(batch, depth, gated)
            self.pool = graph.pool()
            self.graphs[batch, depth, gated] = (graph, logits)
        torch.cuda.synchronize(self.device)
        free_after, _ = torch.cuda.mem_get_info(self.device)
        logger.info("captured %d decode CUDA graphs (batch sizes %s, LoRA depth 0..%d, gated: %s) in %.1f s, "
                    "%.0f MiB", len(self.graphs), ",".join(map(str, self.batch_sizes)), self.max_depth,
                    "yes" if self.gates is not None else "no",
                    time.perf_counter() - started, (free_before - free_after) / 2**20)

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Logits [num_decode, vocab] of a decode-only step (check `can_run` first)."""
        n = inputs.ctx.attention.num_decode
        batch, depth, gates = self.graph_batch(n), len(inputs.ctx.lora_plan.levels), inputs.ctx.composite
        gated = gates is not None
        self.fill(inputs, batch, depth)
        if gated:
            self.fill_gates(gates, batch)
        if self.use_cuda_graphs:
            graph, logits = self.graphs[batch, depth, gated]
            graph.replay()
        else:
            logits = self._forward(batch, depth, gated)
        if gated:
            gates.take_log(self.gates.gate_log[:, :batch])
        return logits[:n]
