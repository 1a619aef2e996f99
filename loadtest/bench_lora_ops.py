"""Compare formulations of the torch LoRA ops on this machine (a benchmark, not a test).

Prints, for decode-like rows (one token per adapter) and prefill-like segments,
the time of: gathered bmm, segmented matmuls, and the dense "every slot"
product, at the shapes of the model given (SmolLM2-135M by default), with the
base projection's matmul as the reference measured in the same run.
"""

from __future__ import annotations

import argparse
import logging

import torch
from bench_common import machine_description, timed

from loramux.kernels import build_lora_plan, torch_ref
from loramux.kernels.plan import with_mode

logger = logging.getLogger("bench_lora_ops")


def dense_all_slots(x, lora_a, lora_b, level, y):
    """Every token against every slot's A, then keep its own block: one GEMM each way, S times the FLOPs."""
    num_slots, r, d_in = lora_a.shape
    h_all = (x[level.token_idx] @ lora_a.reshape(num_slots * r, d_in).T).view(-1, num_slots, r)
    h = h_all[torch.arange(h_all.shape[0]), level.slot_idx] * level.coeff[:, None]  # every rank is in range here
    sparse = torch.zeros_like(h_all)
    sparse[torch.arange(h.shape[0]), level.slot_idx] = h
    delta = sparse.view(h.shape[0], -1) @ lora_b.permute(0, 2, 1).reshape(num_slots * r, -1)
    y.index_add_(0, level.token_idx, delta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-out", type=int, default=1536)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info("machine: %s", machine_description("cpu"))
    logger.info("shapes: d_in=%d d_out=%d rank=%d slots=%d", args.d_in, args.d_out, args.rank, args.slots)
    torch.manual_seed(0)
    a = torch.randn(args.slots, args.rank, args.d_in) * 0.02
    b = torch.randn(args.slots, args.d_out, args.rank) * 0.02
    w = torch.randn(args.d_out, args.d_in) * 0.02
    scales = torch.ones(args.slots)
    active = torch.ones(args.slots, dtype=torch.int32)
    modes = ("gather", "slots", "segments")
    logger.info("%-30s %9s %9s %9s %9s %9s %9s %6s", "case", "base ms", *(m + " ms" for m in modes), "dense ms",
                "plan", "plan/base")
    zipf = torch.distributions.Categorical(probs=1 / torch.arange(1, args.slots + 1))
    cases = [("decode 32 tok, all distinct", 32, 1, None), ("decode 64 tok, Zipf", 64, 1, zipf),
             ("decode 8 tok, all distinct", 8, 1, None), ("decode 2 tok, all distinct", 2, 1, None),
             ("prefill 32 x 128 tok", 4096, 128, None),
             ("prefill 4 x 128 tok", 512, 128, None)]
    for label, tokens, run_len, popularity in cases:
        runs = [(s, run_len, [(int(popularity.sample()) if popularity else (s // run_len) % args.slots,
                               1.0, 0, args.rank)]) for s in range(0, tokens, run_len)]
        [level] = build_lora_plan(runs, scales, args.rank).levels
        x = torch.randn(tokens, args.d_in)
        y = torch.zeros(tokens, args.d_out)
        results = {"base": timed(lambda: torch.nn.functional.linear(x, w), "cpu", args.repeat)}
        for mode in modes:
            lay = with_mode(level, mode)
            results[mode] = timed(lambda: torch_ref.lora_expand(y, b, torch_ref.lora_shrink(x, a, active, lay), active,
                                                                lay), "cpu", args.repeat)
        results["dense"] = timed(lambda: dense_all_slots(x, a, b, level, y), "cpu", args.repeat)
        logger.info("%-30s %9.3f %9.3f %9.3f %9.3f %9.3f %9s %6.2f", label,
                    *(results[k] * 1e3 for k in ("base",) + modes + ("dense",)), level.mode,
                    results[level.mode] / results["base"])


if __name__ == "__main__":
    main()
