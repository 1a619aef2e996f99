"""Start-up warm-up: run the forward passes the server will see before it serves.

Every Triton kernel variant (attention and LoRA) compiles on first launch, so
the warm-up launches each of them once: prefill chunks of a few lengths from
position 0 and after cached context, a mixed decode + prefill step, and
decode-only steps, each with LoRA depth 0..max; then the decode graphs are
captured (which runs each graph's step once more). The kernels receive every
per-step integer through a tensor or unspecialised, so these steps cover the
variants that serving will launch. All warm-up K/V goes to the scratch block.
"""

from __future__ import annotations

import logging
import time

import torch

from loramux.engine.attention import AttentionBackend
from loramux.engine.cuda_graphs import DecodeGraphRunner, batch_sizes_up_to
from loramux.engine.model import CausalLM, StepContext
from loramux.engine.step_inputs import StepInputs, attention_metadata
from loramux.kernels import LoraPlan, build_lora_plan
from loramux.kernels.plan import with_mode

logger = logging.getLogger(__name__)

PREFILL_LENGTHS = (1, 8, 64, 512)


def scratch_step(chunks: list[tuple[int, int]], num_decode: int, depth: int, scratch_block: int, block_size: int,
                 attention: AttentionBackend, slot_scales: torch.Tensor, r_max: int, device: torch.device,
                 lora_mode: str | None = None) -> StepInputs:
    """A step whose sequences ((cached, new) tokens each) live in the scratch block only.

    Every block-table entry is the scratch block, so the step writes and reads
    nothing else; LoRA rows use slots 0..depth-1 with weight 0.
    """
    tables = [[scratch_block] * -(-(c + n) // block_size) for c, n in chunks]
    meta, positions = attention_metadata(tables, chunks, num_decode, attention, device)
    starts = meta.query_start.tolist()
    runs = [(start, n, [(k, 0.0, 0, r_max) for k in range(depth)]) for start, (_, n) in zip(starts, chunks)]
    plan = build_lora_plan(runs, slot_scales, r_max, device)
    if lora_mode is not None:
        plan = LoraPlan(tuple(with_mode(level, lora_mode) for level in plan.levels))
    return StepInputs(input_ids=torch.zeros_like(positions), positions=positions, ctx=StepContext(meta, plan),
                      logit_rows=torch.tensor([s - 1 for s in starts[1:]], device=device),
                      is_decode_only=num_decode == len(chunks))


def warm_up(model: CausalLM, attention: AttentionBackend, graphs: DecodeGraphRunner | None, max_batch: int,
            max_tokens: int, max_model_len: int, max_depth: int, scratch_block: int, block_size: int,
            slot_scales: torch.Tensor, r_max: int, device: torch.device) -> None:
    """Run the warm-up steps, then capture the decode graphs (when `graphs` is given)."""
    started = time.perf_counter()
    steps: list[tuple[list[tuple[int, int]], int, str | None]] = []
    for length in PREFILL_LENGTHS:
        length = min(length, max_tokens, max_model_len - 1)
        steps.append(([(0, length)], 0, None))
    if max_model_len > 2 * block_size + 1 and max_tokens > 2 * block_size:
        steps.append(([(block_size + 3, block_size)], 0, None))  # a chunk after cached context
        steps.append(([(block_size, 1), (0, block_size)], 1, None))  # mixed decode + prefill
    for batch in batch_sizes_up_to(max_batch) if graphs is None else (max_batch,):
        for mode in ("segments", "gather", "slots"):  # decode plans take any mode when run eagerly
            steps.append(([(block_size, 1)] * batch, batch, mode))
    for chunks, num_decode, mode in steps:
        for depth in range(max_depth + 1):
            s = scratch_step(chunks, num_decode, depth, scratch_block, block_size, attention, slot_scales, r_max,
                             device, mode)
            model(s.input_ids, s.positions, s.ctx, s.logit_rows)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    logger.info("warm-up: %d forward passes in %.1f s", len(steps) * (max_depth + 1), time.perf_counter() - started)
    if graphs is not None:
        graphs.capture_all()
