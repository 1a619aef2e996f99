"""Decode steps replayed from CUDA graphs captured at start-up.

One graph per (batch size, LoRA depth): batch sizes from a fixed list up to
`--max-num-seqs`, depths 0..`max_depth`. There is no context bucket: the
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
  backend treats as inert. The levels run in the gathered (BGMV) mode, whose
  shapes depend only on the row count. Adapter slot tensors are read in
  place, so adapters paged in between replays need no recapture.

With `use_cuda_graphs=False` the same padded, static-buffer path runs eagerly;
the CPU tests use it to check the padding against the normal path.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

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
    rank_lo: torch.Tensor
    rank_hi: torch.Tensor


class DecodeGraphRunner:
    def __init__(self, model: CausalLM, max_batch: int, max_blocks_per_seq: int, scratch_block: int,
                 block_size: int, max_depth: int, device: torch.device, use_cuda_graphs: bool = True):
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
        self.levels = [_PlanLevel(zeros(max_batch), zeros(max_batch, dtype=torch.float32), zeros(max_batch),
                                  zeros(max_batch))
                       for _ in range(max_depth)]
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def static_inputs(self, batch: int, depth: int) -> StepInputs:
        """The first `batch` rows of the buffers as a decode step with `depth` LoRA levels."""
        empty = self.rows[:0]
        levels = tuple(LoraPlanLevel(
            token_idx=self.rows[:batch], slot_idx=lv.slot_idx[:batch], coeff=lv.coeff[:batch],
            rank_lo=lv.rank_lo[:batch], rank_hi=lv.rank_hi[:batch],
            seg_starts=empty, seg_slots=empty, segments=(), mode="gather") for lv in self.levels[:depth])
        attention = AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch], block_tables=self.block_tables[:batch],
            context_lens=self.context_lens[:batch], query_start=self.query_start[:batch + 1], num_decode=batch,
            max_query_len=1)
        return StepInputs(input_ids=self.input_ids[:batch], positions=self.positions[:batch],
                          ctx=StepContext(attention, LoraPlan(levels)), logit_rows=self.rows[:batch],
                          is_decode_only=True)

    def can_run(self, inputs: StepInputs) -> bool:
        return (inputs.is_decode_only and inputs.ctx.attention.num_decode <= self.batch_sizes[-1]
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
            for buffer in (level.coeff, level.rank_lo, level.rank_hi):
                buffer.zero_()
            if k < len(plan_levels):
                real = plan_levels[k]
                for name in ("slot_idx", "coeff", "rank_lo", "rank_hi"):
                    getattr(level, name).index_copy_(0, real.token_idx, getattr(real, name))

    def _forward(self, batch: int, depth: int) -> torch.Tensor:
        s = self.static_inputs(batch, depth)
        return self.model(s.input_ids, s.positions, s.ctx, s.logit_rows)

    def capture_all(self) -> None:
        """Capture every (batch size, depth) graph; the largest first, so the smaller ones reuse its pool."""
        torch.cuda.synchronize(self.device)
        free_before, _ = torch.cuda.mem_get_info(self.device)
        started = time.perf_counter()
        for batch in reversed(self.batch_sizes):
            for depth in range(self.max_depth + 1):
                self.fill(None, batch, depth)
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    self._forward(batch, depth)  # lazy initialisation must not happen inside the capture
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    logits = self._forward(batch, depth)
                self.pool = graph.pool()
                self.graphs[batch, depth] = (graph, logits)
        torch.cuda.synchronize(self.device)
        free_after, _ = torch.cuda.mem_get_info(self.device)
        logger.info("captured %d decode CUDA graphs (batch sizes %s, LoRA depth 0..%d) in %.1f s, %.0f MiB",
                    len(self.graphs), ",".join(map(str, self.batch_sizes)), self.max_depth,
                    time.perf_counter() - started, (free_before - free_after) / 2**20)

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Logits [num_decode, vocab] of a decode-only step (check `can_run` first)."""
        n = inputs.ctx.attention.num_decode
        batch, depth = self.graph_batch(n), len(inputs.ctx.lora_plan.levels)
        self.fill(inputs, batch, depth)
        if self.use_cuda_graphs:
            graph, logits = self.graphs[batch, depth]
            graph.replay()
        else:
            logits = self._forward(batch, depth)
        return logits[:n]
