"""LoRA kernels against the device's copy bandwidth (issue #13 step 2; a benchmark, not a test).

Projections of a Llama shape (7B: q/o 4096->4096, fused q/k/v 4096->3x4096,
fused gate/up 4096->2x11008, down 11008->4096), one shrink + one expand each,
as the server runs them: the plan builder picks the formulation, the backend
is the one the server would select (Triton on CUDA).
Adapter pools: "rank16" (every adapter rank 16, pool rank 16) and "mixed"
(ranks 8, 16, 32, 64 in turn, pool rank 64). Cases: decode batches 1..256
with all-distinct and Zipf(1.0) adapters, and a prefill of 8 x 512 tokens
(one adapter per sequence). Per case and projection:
  kernel us   shrink + expand
  must read   the bytes the kernel cannot avoid: every distinct adapter's A and B
              at its own rank once, x, and y read and written
  GB/s        must-read bytes / kernel time
  % copy      that against a device-to-device copy measured in the same run
GPU: `python loadtest/bench_kernels.py --device cuda --json out.json`.
`--device cpu --config tiny` is a smoke run of the same code (torch backend).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from bench_common import machine_description, timed

from loramux.kernels import build_lora_plan, select_lora_backend

logger = logging.getLogger("bench_kernels")

PROJECTIONS = {  # config -> name -> (d_in, output size of each fused sub-projection)
    "7b": {"q/o": (4096, [4096]), "qkv": (4096, [4096, 4096, 4096]), "gate_up": (4096, [11008, 11008]),
           "down": (11008, [4096])},
    "1b": {"q/o": (2048, [2048]), "qkv": (2048, [2048, 512, 512]), "gate_up": (2048, [8192, 8192]),
           "down": (8192, [2048])},
    "tiny": {"q/o": (64, [64]), "qkv": (64, [64, 32, 32]), "gate_up": (64, [96, 96]), "down": (96, [64])},
}
POOLS = {"rank16": (16, [16]), "mixed": (64, [8, 16, 32, 64])}  # pool rank, adapter ranks in turn


COPY_MIB = 256  # large enough to leave the caches behind on any GPU


def copy_bandwidth(device: str, dtype: torch.dtype, mib: int = COPY_MIB) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    src = torch.empty(mib * 2**20 // torch.empty((), dtype=dtype).element_size(), dtype=dtype, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, 20)
    return 2 * src.numel() * src.element_size() / seconds


def cases(batches: list[int], slots: int, prefill: tuple[int, int]) -> list[tuple[str, int, list[tuple[int, int]]]]:
    """(name, batch, [(slot, tokens)] per sequence)."""
    zipf = torch.distributions.Categorical(probs=1 / torch.arange(1, slots + 1, dtype=torch.float))
    torch.manual_seed(0)
    out = []
    for batch in batches:
        out.append(("decode distinct", batch, [(s % slots, 1) for s in range(batch)]))
        out.append(("decode zipf", batch, [(int(zipf.sample()), 1) for _ in range(batch)]))
    seqs, length = prefill
    out.append((f"prefill {seqs}x{length}", seqs, [(s % slots, length) for s in range(seqs)]))
    return out


def adapter_pool(device, dtype, d_in, d_outs, r_max, ranks) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot tensors as LoraLinear holds them (A [S, n_sub * r_max, d_in], B [S, d_out, r_max]), random on the
    device and zero above each slot's rank."""
    g = torch.Generator(device).manual_seed(0)
    rank_of = torch.tensor(ranks, device=device)[:, None]
    a = torch.randn(len(ranks), len(d_outs) * r_max, d_in, generator=g, device=device, dtype=dtype) / d_in ** 0.5
    a *= ((torch.arange(len(d_outs) * r_max, device=device) % r_max) < rank_of)[:, :, None].to(dtype)
    b = torch.randn(len(ranks), sum(d_outs), r_max, generator=g, device=device, dtype=dtype) * 0.01
    b *= (torch.arange(r_max, device=device) < rank_of)[:, None, :].to(dtype)
    return a, b


def measure(backend, a, b, d_outs, ranks, sequences, repeat) -> dict:
    """Time one projection's shrink + expand for these sequences; count the bytes it must read."""
    slots, d_in, r_max, device, dtype = a.shape[0], a.shape[2], b.shape[2], a.device, a.dtype
    starts = tuple(sum(d_outs[:i]) for i in range(len(d_outs)))
    active = torch.ones(slots, dtype=torch.int32, device=device)
    runs, token = [], 0
    for slot, length in sequences:
        runs.append((token, length, [(slot, 1.0, 0, ranks[slot])]))
        token += length
    plan = build_lora_plan(runs, torch.ones(slots), r_max, device)
    [level] = plan.levels
    x = torch.randn(token, d_in, dtype=dtype, device=device)
    y = torch.zeros(token, sum(d_outs), dtype=dtype, device=device)
    seconds = timed(lambda: backend.expand(y, b, backend.shrink(x, a, active, level, len(d_outs)), active, level,
                                           starts), str(device), repeat)
    itemsize = torch.empty((), dtype=dtype).element_size()
    adapters = sum(ranks[s] * (len(d_outs) * d_in + sum(d_outs)) for s in {slot for slot, _ in sequences})
    must_read = (adapters + token * (d_in + 2 * sum(d_outs))) * itemsize
    return {"mode": level.mode, "tokens": token, "kernel_us": seconds * 1e6, "must_read_bytes": must_read,
            "bandwidth_gbs": must_read / seconds / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", choices=sorted(PROJECTIONS), default="7b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--prefill", type=int, nargs=2, default=[8, 512], metavar=("SEQS", "TOKENS"))
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--copy-mib", type=int, default=COPY_MIB, help="size of the reference copy")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    backend = select_lora_backend("auto", device)
    machine = machine_description(args.device)
    copy_bw = copy_bandwidth(args.device, dtype, args.copy_mib)
    logger.info("machine: %s; LoRA backend %s; copy bandwidth %.1f GB/s", machine, backend.name, copy_bw / 1e9)
    logger.info("settings: %s projections, %s, %d slots, pools %s, repeat %d", args.config, args.dtype, args.slots,
                POOLS, args.repeat)
    logger.info("%-7s %-9s %-18s %5s %6s %-8s %10s %11s %8s %7s", "pool", "proj", "case", "batch", "tokens", "mode",
                "kernel us", "must read", "GB/s", "% copy")
    rows = []
    for pool, (r_max, pool_ranks) in POOLS.items():
        ranks = [pool_ranks[s % len(pool_ranks)] for s in range(args.slots)]
        for proj, (d_in, d_outs) in PROJECTIONS[args.config].items():
            a, b = adapter_pool(device, dtype, d_in, d_outs, r_max, ranks)
            for case, batch, sequences in cases(args.batches, args.slots, tuple(args.prefill)):
                row = {"pool": pool, "projection": proj, "case": case, "batch": batch,
                       **measure(backend, a, b, d_outs, ranks, sequences, args.repeat)}
                row["fraction_of_copy"] = row["bandwidth_gbs"] * 1e9 / copy_bw
                rows.append(row)
                logger.info("%-7s %-9s %-18s %5d %6d %-8s %10.1f %10.2fM %8.1f %6.0f%%", pool, proj, case, batch,
                            row["tokens"], row["mode"], row["kernel_us"], row["must_read_bytes"] / 1e6,
                            row["bandwidth_gbs"], 100 * row["fraction_of_copy"])
            del a, b
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "backend": backend.name,
                                         "copy_bandwidth_gbs": copy_bw / 1e9,
                                         "settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                        indent=2))


if __name__ == "__main__":
    main()
