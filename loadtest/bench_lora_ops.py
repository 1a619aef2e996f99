"""Compare formulations of the torch LoRA ops on this machine (a benchmark, not a test).

Prints, for decode-like rows (one token per adapter) and prefill-like segments,
the time of one shrink + expand in each formulation (gathered bmm, slot
groups, segmented matmuls) and of the dense "every slot" product, at one
projection's shape (SmolLM2-135M's gate/up by default; `--subs` fuses
sub-projections as LoraLinear does, e.g. `--subs 576 192 192` for q/k/v),
with the base projection's matmul as the reference measured in the same run.
Activations are in `--dtype`, the slot tensors in `--slot-dtype` (float32:
what LoraLinear keeps on the CPU with torch's ops). The "cpu-bgmv" column runs
the backend of a bfloat16 CPU model (`loramux.kernels.cpu_bgmv`: its C++
kernel for decode rows, torch's segments for prefill) with the slot tensors in
`--dtype`, where that kernel builds (bfloat16, AVX512-BF16). Each call reads the next of `--layers`
copies of the slot tensors and base weight, as a step's decoder layers do,
so a step's memory traffic is timed, not a cache-resident one.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
from bench_common import machine_description, timed

from loramux.kernels import build_lora_plan, cpu_bgmv, cpu_extension, torch_ref
from loramux.kernels.plan import with_mode

logger = logging.getLogger("bench_lora_ops")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def dense_all_slots(x, lora_a, lora_b, level, y):
    """Every token against every slot's A, then keep its own block: one GEMM each way, S times the FLOPs.
    One sub-projection only."""
    num_slots, r, d_in = lora_a.shape
    h_all = (x[level.token_idx].to(lora_a.dtype) @ lora_a.reshape(num_slots * r, d_in).T).view(-1, num_slots, r)
    h = h_all[torch.arange(h_all.shape[0]), level.slot_idx] * level.coeff[:, None]  # every rank is in range here
    sparse = torch.zeros_like(h_all)
    sparse[torch.arange(h.shape[0]), level.slot_idx] = h
    delta = sparse.view(h.shape[0], -1) @ lora_b.permute(0, 2, 1).reshape(num_slots * r, -1)
    y.index_add_(0, level.token_idx, delta.to(y.dtype))


class Cycle:
    """Hands out the next of several copies in turn: a step reads every decoder layer's tensors once."""

    def __init__(self, copies):
        self.copies, self.next = copies, 0

    def __call__(self):
        self.next = (self.next + 1) % len(self.copies)
        return self.copies[self.next]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--subs", type=int, nargs="+", default=[1536],
                        help="output widths of the fused sub-projections")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="activations and base weight")
    parser.add_argument("--slot-dtype", choices=DTYPES, default="float32", help="LoRA slot tensors")
    parser.add_argument("--layers", type=int, default=30, help="copies of the tensors, read in turn")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--repeat", type=int, default=60, help="timed calls per decode case")
    parser.add_argument("--prefill-repeat", type=int, default=3, help="timed calls per prefill case")
    parser.add_argument("--rounds", type=int, default=3, help="each number is the best of this many timings "
                        "(on a shared CPU, the others are stretched by other processes)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    logger.info("machine: %s", machine_description("cpu"))
    logger.info("shapes: d_in=%d subs=%s rank=%d slots=%d; %s activations, %s slots, %d layers; load average %s",
                args.d_in, args.subs, args.rank, args.slots, args.dtype, args.slot_dtype, args.layers,
                ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    torch.manual_seed(0)
    dtype, slot_dtype, d_out = DTYPES[args.dtype], DTYPES[args.slot_dtype], sum(args.subs)
    starts = tuple(sum(args.subs[:i]) for i in range(len(args.subs)))
    copies = [((torch.randn(args.slots, len(args.subs) * args.rank, args.d_in) * 0.02).to(slot_dtype),
               (torch.randn(args.slots, d_out, args.rank) * 0.02).to(slot_dtype),
               (torch.randn(d_out, args.d_in) * 0.02).to(dtype)) for _ in range(args.layers)]
    # the same slots in the activations' dtype, for the kernel
    kernel_copies = [(a.to(dtype), b.to(dtype), w) for a, b, w in copies] \
        if dtype == torch.bfloat16 and cpu_extension.load() else None
    scales = torch.ones(args.slots)
    active = torch.ones(args.slots, dtype=torch.int32)
    modes = ("gather", "slots", "segments")
    logger.info("%-30s %9s %9s %9s %9s %9s %9s %6s %13s %6s", "case", "base ms", *(m + " ms" for m in modes),
                "dense ms", "plan", "plan/base", "cpu-bgmv ms", "/base")
    zipf = torch.distributions.Categorical(probs=1 / torch.arange(1, args.slots + 1))
    cases = [("decode 32 tok, all distinct", 32, 1, None), ("decode 64 tok, Zipf", 64, 1, zipf),
             ("decode 8 tok, all distinct", 8, 1, None), ("decode 2 tok, all distinct", 2, 1, None),
             ("prefill 32 x 128 tok", 4096, 128, None),
             ("prefill 4 x 128 tok", 512, 128, None), ("prefill 1 x 2048 tok", 2048, 2048, None)]
    for label, tokens, run_len, popularity in cases:
        runs = [(s, run_len, [(int(popularity.sample()) if popularity else (s // run_len) % args.slots,
                               1.0, 0, args.rank)]) for s in range(0, tokens, run_len)]
        [level] = build_lora_plan(runs, scales, args.rank).levels
        x = torch.randn(tokens, args.d_in).to(dtype)
        y = torch.zeros(tokens, d_out, dtype=dtype)
        layer, kernel_layer = Cycle(copies), Cycle(kernel_copies or copies)
        repeat = args.repeat if run_len == 1 else args.prefill_repeat

        def lora(lay):
            a, b, _ = layer()
            torch_ref.lora_expand(y, b, torch_ref.lora_shrink(x, a, active, lay, len(args.subs)), active, lay, starts)

        def kernel():
            a, b, _ = kernel_layer()
            cpu_bgmv.lora_expand(y, b, cpu_bgmv.lora_shrink(x, a, active, level, len(args.subs)), active, level, starts)

        def best(fn):
            return min(timed(fn, "cpu", repeat, warmup=1) for _ in range(args.rounds))

        results = {"base": best(lambda: torch.nn.functional.linear(x, layer()[2]))}
        for mode in modes:
            lay = with_mode(level, mode)
            results[mode] = best(lambda: lora(lay))
        results["dense"] = float("nan") if len(args.subs) > 1 else best(lambda: dense_all_slots(x, *layer()[:2],
                                                                                                level, y))
        results["kernel"] = best(kernel) if kernel_copies else float("nan")
        logger.info("%-30s %9.3f %9.3f %9.3f %9.3f %9.3f %9s %6.2f %13.3f %6.2f", label,
                    *(results[k] * 1e3 for k in ("base",) + modes + ("dense",)), level.mode,
                    results[level.mode] / results["base"], results["kernel"] * 1e3,
                    results["kernel"] / results["base"])


if __name__ == "__main__":
    main()
