"""Decode steps replayed from captured CUDA graphs.

A graph is captured on first use for each (batch bucket, context bucket, LoRA
depth). Every input lives in a static buffer of the bucket's size; a replay
copies the step's inputs in and pads the rest: padding rows write their K/V
to a spare slot past the last KV block, attend only to it, and carry no LoRA
(slot -1: inert rows, which the LoRA kernels neither read nor write). The LoRA plan runs in the gathered (BGMV) mode,
whose shapes depend only on the row count. Adapter slot tensors are read in
place, so adapters written into slots between replays are used without
recapture.

With `use_cuda_graphs=False` the same padded, static-buffer path runs eagerly;
the CPU tests use it to check the padding against the normal path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from loramux.engine.attention import AttentionMetadata
from loramux.engine.model import CausalLM, StepContext
from loramux.engine.step_inputs import StepInputs
from loramux.kernels import LoraPlan, LoraPlanLayer

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MIN_CONTEXT_BUCKET = 256
MAX_LORA_DEPTH = 3


def bucket(value: int, buckets) -> int | None:
    return next((b for b in buckets if b >= value), None)


@dataclass
class _StaticStep:
    """The static buffers of one graph, and the graph and logits once captured."""

    inputs: StepInputs
    plan_layers: list[LoraPlanLayer]
    graph: "torch.cuda.CUDAGraph | None" = None
    logits: torch.Tensor | None = None


class DecodeGraphRunner:
    def __init__(self, model: CausalLM, max_batch: int, max_context: int, trash_slot: int, r_max: int,
                 device: torch.device, use_cuda_graphs: bool = True):
        self.model = model
        self.batch_buckets = tuple(b for b in BATCH_BUCKETS if b < max_batch) + (max_batch,)
        self.context_buckets = []
        length = MIN_CONTEXT_BUCKET
        while length < max_context:
            self.context_buckets.append(length)
            length *= 2
        self.context_buckets.append(max_context)
        self.trash_slot = trash_slot
        self.r_max = r_max
        self.device = device
        self.use_cuda_graphs = use_cuda_graphs
        self.steps: dict[tuple[int, int, int], _StaticStep] = {}
        self.pool = None

    def can_run(self, inputs: StepInputs) -> bool:
        meta = inputs.ctx.attention
        return (inputs.is_decode_only and meta.num_decode <= self.batch_buckets[-1]
                and meta.decode_gather.shape[1] <= self.context_buckets[-1]
                and len(inputs.ctx.lora_plan.layers) <= MAX_LORA_DEPTH)

    def _allocate(self, batch: int, context: int, depth: int) -> _StaticStep:
        def zeros(*shape, dtype=torch.int64):
            return torch.zeros(*shape, dtype=dtype, device=self.device)

        layers = [LoraPlanLayer(
            token_idx=zeros(batch), slot_idx=zeros(batch), coeff=zeros(batch, dtype=torch.float32),
            rank_lo=zeros(batch), rank_hi=zeros(batch),
            seg_starts=zeros(0), seg_slots=zeros(0), segments=(), mode="gather") for _ in range(depth)]
        attention = AttentionMetadata(
            slot_mapping=zeros(batch), num_decode=batch, decode_gather=zeros(batch, context),
            decode_mask=zeros(batch, 1, 1, context, dtype=torch.bool), prefills=[])
        inputs = StepInputs(input_ids=zeros(batch), positions=zeros(batch),
                            ctx=StepContext(attention, LoraPlan(tuple(layers))),
                            logit_rows=torch.arange(batch, device=self.device), is_decode_only=True)
        return _StaticStep(inputs, layers)

    def _fill(self, static: _StaticStep, inputs: StepInputs) -> None:
        n = inputs.ctx.attention.num_decode
        src, dst = inputs.ctx.attention, static.inputs.ctx.attention
        length = src.decode_gather.shape[1]
        for buffer, value, pad in ((static.inputs.input_ids, inputs.input_ids, 0),
                                   (static.inputs.positions, inputs.positions, 0),
                                   (dst.slot_mapping, src.slot_mapping, self.trash_slot)):
            buffer[:n].copy_(value)
            buffer[n:].fill_(pad)
        dst.decode_gather.fill_(self.trash_slot)
        dst.decode_gather[:n, :length].copy_(src.decode_gather)
        dst.decode_mask.fill_(False)
        dst.decode_mask[:n, ..., :length].copy_(src.decode_mask)
        dst.decode_mask[n:, ..., 0] = True  # padding rows attend to the spare slot, never to nothing
        for layer, target in zip(inputs.ctx.lora_plan.layers, static.plan_layers):
            rows = layer.num_rows
            for name, pad in (("token_idx", 0), ("slot_idx", -1), ("coeff", 0), ("rank_lo", 0), ("rank_hi", 0)):
                buffer = getattr(target, name)
                buffer[:rows].copy_(getattr(layer, name))
                buffer[rows:].fill_(pad)

    def _forward(self, static: _StaticStep) -> torch.Tensor:
        s = static.inputs
        return self.model(s.input_ids, s.positions, s.ctx, s.logit_rows)

    def _capture(self, static: _StaticStep) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._forward(static)  # warm-up: lazy initialisation must not happen inside the capture
        torch.cuda.current_stream(self.device).wait_stream(side)
        static.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(static.graph, pool=self.pool):
            static.logits = self._forward(static)
        self.pool = static.graph.pool()

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Logits [num_decode, vocab] of a decode-only step (check `can_run` first)."""
        meta = inputs.ctx.attention
        key = (bucket(meta.num_decode, self.batch_buckets), bucket(meta.decode_gather.shape[1], self.context_buckets),
               len(inputs.ctx.lora_plan.layers))
        static = self.steps.get(key)
        if static is None:
            static = self.steps[key] = self._allocate(*key)
            self._fill(static, inputs)
            if self.use_cuda_graphs:
                self._capture(static)
                logger.info("captured decode graph: batch %d, context %d, LoRA depth %d", *key)
        else:
            self._fill(static, inputs)
        if static.graph is not None:
            static.graph.replay()
            logits = static.logits
        else:
            logits = self._forward(static)
        return logits[:meta.num_decode]
