"""CPU decode attention: the `cpu` backend (C++ kernel reading the paged cache) against `sdpa` (a benchmark).

    .venv/bin/python loadtest/bench_cpu_attention.py --json loadtest/results/bench_cpu_attention.json

One decode step's attention over all layers, as the engine runs it in bfloat16
at SmolLM2-135M's shapes (30 layers, 9 query / 3 KV heads of 64, block size
16): each layer has its own K/V cache (so, as in the engine, the caches stream
from memory rather than sit in the CPU's caches), every sequence its own
consecutive blocks; each backend writes the step's new K/V into the cache and
attends (`AttentionBackend.__call__`), with the step's metadata built once as
the engine builds it. Rounds interleave the backends; each number is the best
of its rounds. The ratio is sdpa's time over cpu's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
from bench_common import machine_description, timed

from loramux.engine.attention import CpuKernelAttention, SdpaAttention
from loramux.engine.step_inputs import attention_metadata

logger = logging.getLogger("bench_cpu_attention")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=160, help="tokens in every sequence's cache after the step")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--heads", type=int, nargs=3, default=[9, 3, 64], metavar=("HQ", "HKV", "D"))
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=10, help="timed steps per round")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    num_heads, num_kv_heads, head_dim = args.heads
    bs, batch, context = args.block_size, args.batch, args.context
    blocks_per_seq = -(-context // bs)
    cpu = torch.device("cpu")
    backends = {name: kind(num_kv_heads, head_dim, bs, None, cpu)
                for name, kind in (("sdpa", SdpaAttention), ("cpu", CpuKernelAttention))}
    gen = torch.Generator().manual_seed(0)
    num_slots = (batch * blocks_per_seq + 1) * bs
    caches = [tuple(torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).bfloat16() for _ in range(2))
              for _ in range(args.layers)]
    tables = [list(range(b * blocks_per_seq, (b + 1) * blocks_per_seq)) for b in range(batch)]
    chunks = [(context - 1, 1)] * batch  # one new token each, after context - 1 cached
    q = torch.randn(batch, num_heads, head_dim, generator=gen).bfloat16()
    k, v = (torch.randn(batch, num_kv_heads, head_dim, generator=gen).bfloat16() for _ in range(2))
    metas = {name: attention_metadata(tables, chunks, batch, backend, cpu)[0] for name, backend in backends.items()}

    def step(name: str) -> None:
        for k_cache, v_cache in caches:
            backends[name](q, k, v, k_cache, v_cache, metas[name])

    torch.testing.assert_close(backends["cpu"](q, k, v, *caches[0], metas["cpu"]).float(),
                               backends["sdpa"](q, k, v, *caches[0], metas["sdpa"]).float(), rtol=3e-2, atol=3e-2)
    load_start = os.getloadavg()
    best = {name: float("inf") for name in backends}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name in backends:
                best[name] = min(best[name], timed(lambda: step(name), "cpu", args.repeat, warmup=1))
    load_end = os.getloadavg()
    kv_bytes = 2 * args.layers * batch * context * num_kv_heads * head_dim * 2
    logger.info("machine: %s", machine_description("cpu"))
    logger.info("settings: batch %d, context %d, %d layers, heads %d/%d x %d, block %d, rounds %d x %d steps; "
                "load average %.2f -> %.2f", batch, context, args.layers, num_heads, num_kv_heads, head_dim, bs,
                args.rounds, args.repeat, load_start[0], load_end[0])
    for name, seconds in best.items():
        logger.info("%-5s %7.2f ms a step (%6.1f us a layer), K/V read %.0f MB: %.1f GB/s", name, seconds * 1e3,
                    seconds / args.layers * 1e6, kv_bytes / 1e6, kv_bytes / seconds / 1e9)
    ratio = best["sdpa"] / best["cpu"]
    logger.info("sdpa / cpu: %.2fx", ratio)
    if args.json:
        args.json.write_text(json.dumps({
            "machine": machine_description("cpu"), "settings": {k: str(v) if isinstance(v, Path) else v
                                                                for k, v in vars(args).items()},
            "load_average": {"start": load_start, "end": load_end}, "best_step_seconds": best,
            "kv_bytes_per_step": kv_bytes, "sdpa_over_cpu": ratio}, indent=2))


if __name__ == "__main__":
    main()
