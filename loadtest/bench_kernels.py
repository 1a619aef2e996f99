"""LoRA decode kernels against a gathered-bmm baseline and the device's copy bandwidth (a benchmark, not a test).

For a random-init Llama shape (1B or 7B class), rank 16 on all seven
projections, one decoder layer's LoRA work for a decode batch of N tokens:
q/k/v (one shrink over the stacked A, one expand over the stacked B), o,
gate/up (likewise), down.
Adapter popularity: every token its own adapter ("distinct") or Zipf(1.0)
over the slot pool. Reported per batch size:
  kernel us      the backend's kernels (Triton on CUDA)
  baseline us    torch gather + bmm (the torch backend's gathered mode)
  GB/s           bytes the kernels must move (each row's A and B, x, y read
                 and written) / kernel time
  % of copy      that bandwidth against a device-to-device copy measured here
Run on a GPU: `python loadtest/bench_kernels.py --device cuda --config 7b`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from bench_common import machine_description, timed

from loramux.kernels import TORCH_BACKEND, build_lora_plan, select_lora_backend
from loramux.kernels.plan import with_mode

logger = logging.getLogger("bench_kernels")

SHAPES = {  # hidden, intermediate, q heads * head_dim, kv heads * head_dim
    "1b": (2048, 8192, 2048, 512),
    "7b": (4096, 11008, 4096, 4096),
    "smollm2": (576, 1536, 576, 192),
}


def copy_bandwidth(device: str, dtype: torch.dtype) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    src = torch.empty(256 * 2**20 // torch.empty((), dtype=dtype).element_size(), dtype=dtype, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, 20)
    return 2 * src.numel() * src.element_size() / seconds


def layer_groups(config: str) -> list[tuple[int, list[int]]]:
    """(d_in, [d_out per fused sub-projection]) for qkv, o, gate_up, down."""
    hidden, inter, q, kv = SHAPES[config]
    return [(hidden, [q, kv, kv]), (q, [hidden]), (hidden, [inter, inter]), (inter, [hidden])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    backend = select_lora_backend("auto", device)
    name = machine_description(args.device)
    copy_bw = copy_bandwidth(args.device, dtype)
    logger.info("machine: %s; backend %s; copy bandwidth %.0f GB/s", name, backend.name, copy_bw / 1e9)
    logger.info("settings: %s shapes, %s, rank %d on all 7 projections, %d slots, one layer per call",
                args.config, args.dtype, args.rank, args.slots)
    itemsize = torch.empty((), dtype=dtype).element_size()
    g = torch.Generator().manual_seed(0)
    groups = []
    for d_in, d_outs in layer_groups(args.config):
        a = (torch.randn(args.slots, len(d_outs) * args.rank, d_in, generator=g) / d_in ** 0.5).to(device, dtype)
        b = (torch.randn(args.slots, sum(d_outs), args.rank, generator=g) * 0.01).to(device, dtype)
        groups.append((d_in, d_outs, tuple(sum(d_outs[:i]) for i in range(len(d_outs))), a, b))
    scales = torch.ones(args.slots)
    rows = []
    logger.info("%-9s %6s %11s %12s %8s %10s %9s", "adapters", "batch", "kernel us", "baseline us", "speedup",
                "GB/s", "% copy")
    for popularity in ("distinct", "zipf"):
        zipf = torch.distributions.Categorical(probs=1 / torch.arange(1, args.slots + 1, dtype=torch.float))
        for batch in args.batches:
            slots = (list(range(batch)) if popularity == "distinct"
                     else sorted(int(zipf.sample()) for _ in range(batch)))
            runs = [(t, 1, [(s % args.slots, 1.0, 0, args.rank)]) for t, s in enumerate(slots)]
            [layer] = build_lora_plan(runs, scales, args.rank, device).layers
            layer = with_mode(layer, "gather")
            xs = [torch.randn(batch, d_in, device=device, dtype=dtype) for d_in, *_ in groups]
            ys = [torch.zeros(batch, sum(d_outs), device=device, dtype=dtype) for _, d_outs, *_ in groups]

            def one_layer(ops):
                for (_, _, starts, a, b), x, y in zip(groups, xs, ys):
                    ops.expand(y, b, ops.shrink(x, a, layer), layer, starts)

            kernel = timed(lambda: one_layer(backend), args.device, args.repeat)
            baseline = timed(lambda: one_layer(TORCH_BACKEND), args.device, args.repeat)
            moved = sum(batch * (a[0].numel() + b[0].numel() + d_in + 2 * sum(d_outs)) * itemsize
                        for d_in, d_outs, _, a, b in groups)
            row = {"popularity": popularity, "batch": batch, "kernel_us": kernel * 1e6, "baseline_us": baseline * 1e6,
                   "bandwidth_gbs": moved / kernel / 1e9, "fraction_of_copy": moved / kernel / copy_bw}
            rows.append(row)
            logger.info("%-9s %6d %11.1f %12.1f %7.2fx %10.1f %8.0f%%", popularity, batch, row["kernel_us"],
                        row["baseline_us"], baseline / kernel, row["bandwidth_gbs"], 100 * row["fraction_of_copy"])
    if args.json:
        args.json.write_text(json.dumps({"machine": name, "copy_bandwidth_gbs": copy_bw / 1e9,
                                         "settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                        indent=2))


if __name__ == "__main__":
    main()
