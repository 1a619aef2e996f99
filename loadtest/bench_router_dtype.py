"""Router embedder in bfloat16 against float32: the same decisions? how much less time per request?

    python -m loadtest.bench_router_dtype [--experts 500] [--repeats 2] [--out loadtest/results/router_dtype.json]

Both routers index the bundled experts' cards plus synthetic cards up to
--experts (as eval_router's latency benchmark) and route the held-out task
and general prompts one at a time on one torch thread; the two dtypes take
turns prompt by prompt, so a machine shared with other work slows both alike.
Prints the machine and its load average, wall-clock and the routing thread's
CPU time (median, p99), the bf16/fp32 ratio, and how many decisions differ.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from loadtest.bench_common import machine_description
from loadtest.eval_router import bundled_records, heldout_set, percentile, synthetic_records
from loramux.config import RouterConfig
from loramux.router import Router, load_prompts
from loramux.router.embedders import SentenceEmbedder, minilm_path


def decision_key(decision) -> tuple:
    return tuple(name for name, _, _ in decision.experts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default="loadtest/results/router_dtype.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    records = bundled_records()
    records |= synthetic_records(args.experts - len(records), args.seed)
    prompts = [p for _, p, _ in heldout_set(20, args.seed)] + load_prompts("general_heldout.txt")
    routers = {}
    for dtype in (torch.float32, torch.bfloat16):
        routers[str(dtype).removeprefix("torch.")] = Router(SentenceEmbedder(minilm_path(), dtype=dtype),
                                                            RouterConfig(), records)
    for router in routers.values():
        router.wait_for_updates(None)
    load_before = os.getloadavg()
    wall = {name: [] for name in routers}
    cpu = {name: [] for name in routers}
    decisions = {name: [] for name in routers}
    for _ in range(args.repeats):
        for prompt in prompts:
            for name, router in routers.items():
                start_cpu = time.thread_time()
                decision = router.route(prompt)
                cpu[name].append(time.thread_time() - start_cpu)
                wall[name].append(decision.seconds)
                decisions[name].append(decision_key(decision))
    load_after = os.getloadavg()
    top1 = [[r.route(p).candidates[0][0] for p in prompts] for r in routers.values()]
    report = {"machine": f"{machine_description('cpu')}, {os.cpu_count()} cores",
              "load_average": {"before": load_before, "after": load_after}, "experts": len(records),
              "requests_per_dtype": len(prompts) * args.repeats, "torch_threads": 1,
              "different_decisions": sum(a != b for a, b in zip(*decisions.values())),
              "different_top1_candidates": sum(a != b for a, b in zip(*top1))}
    for name in routers:
        report[name] = {kind: {"p50": 1e3 * percentile(values[name], 0.5), "p99": 1e3 * percentile(values[name], 0.99),
                               "mean": 1e3 * sum(values[name]) / len(values[name])}
                        for kind, values in (("wall_ms", wall), ("cpu_ms", cpu))}
    report["bf16_over_fp32_cpu_p99"] = report["bfloat16"]["cpu_ms"]["p99"] / report["float32"]["cpu_ms"]["p99"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
