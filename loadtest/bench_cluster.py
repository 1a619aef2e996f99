"""serve-cluster: 1 vs 2 replicas, adapter-affine vs random placement, over many adapters (a benchmark).

Each setting starts a local Ray cluster with the bundled model (or --model),
--adapters random adapters registered on every replica, and few device and
CPU slots per replica (--slots), so an adapter that moves between replicas
is paged in again. It sends --requests streamed completions (adapters drawn
uniformly, --concurrency at a time) through the ingress and reports:
  page-ins    adapters copied into a device slot, summed over replicas
  loads       adapters read from disk into CPU memory, summed over replicas
  tok/s       generated tokens per second of wall time
  p99 TTFT    99th percentile time to first token, seen by the client
Settings: 1 replica; 2 replicas with affinity (Ray Serve multiplexing by
adapter); 2 replicas placed by load only (--no-adapter-affinity).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import httpx
from bench_common import machine_description, scratch_dir
from prometheus_client.parser import text_string_to_metric_families

from loramux.adapters_store.synthetic import write_random_adapter
from loramux.cluster import start_cluster, stop_cluster
from loramux.config import (CacheConfig, ClusterConfig, EngineConfig, ModelConfig, RouterConfig, SchedulerConfig,
                            ServerConfig, StoreConfig)
from loramux.engine import Engine

SETTINGS = [("1 replica", 1, True), ("2 replicas, affinity", 2, True), ("2 replicas, random", 2, False)]


def engine_config(args, adapters: dict[str, str]) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=args.model), cache=CacheConfig(kv_cache_memory_gib=0.25),
        scheduler=SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=512, max_loras_per_batch=args.slots),
        store=StoreConfig(max_loras=args.slots, max_cpu_loras=args.slots, max_lora_rank=16, adapters=adapters),
        router=RouterConfig(enabled=False))


async def one_request(client: httpx.AsyncClient, adapter: str, prompt: list[int], max_tokens: int):
    start, first, tokens = time.perf_counter(), None, 0
    body = {"model": adapter, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if first is None:
                    first = time.perf_counter()
                tokens += 1 if chunk["choices"][0]["text"] or chunk["choices"][0]["finish_reason"] else 0
    return first - start, tokens


async def traffic(url: str, args, adapters: list[str]) -> tuple[float, list[float], int]:
    rng = random.Random(0)
    jobs = [(rng.choice(adapters), [rng.randrange(10, 40000) for _ in range(args.prompt_tokens)])
            for _ in range(args.requests)]
    gate = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def run(adapter, prompt):
            async with gate:
                return await one_request(client, adapter, prompt, args.max_tokens)
        start = time.perf_counter()
        results = await asyncio.gather(*(run(a, p) for a, p in jobs))
    return time.perf_counter() - start, [ttft for ttft, _ in results], sum(n for _, n in results)


def store_counters(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    totals = {"page_ins": 0.0, "loads": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "loramux_adapter_page_ins_total":
                totals["page_ins"] += sample.value
            elif sample.name == "loramux_adapter_loads_total":
                totals["loads"] += sample.value
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M")
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--slots", type=int, default=8, help="device slots and CPU-cached adapters per replica")
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--num-cpus", type=float, default=2, help="logical CPUs of the local Ray cluster")
    parser.add_argument("--port", type=int, default=18700)
    args = parser.parse_args()

    print(f"machine: {machine_description('cpu')}")
    folder = scratch_dir("bench-cluster-")
    probe = Engine(engine_config(args, {}))
    shapes, layers = probe.shape.lora_target_shapes(), probe.shape.num_layers
    del probe
    adapters = {f"a{i:03d}": str(write_random_adapter(folder / f"a{i:03d}", shapes, layers, rank=8, seed=i))
                for i in range(args.adapters)}
    rows = []
    for label, replicas, affinity in SETTINGS:
        cluster = ClusterConfig(num_replicas=replicas, num_cpus_per_replica=args.num_cpus / replicas * 0.9,
                                adapter_affinity=affinity, metrics_report_seconds=0.5)
        url = start_cluster(engine_config(args, adapters), ServerConfig(port=args.port), cluster,
                            num_cpus=args.num_cpus)
        try:
            asyncio.run(traffic(url, argparse.Namespace(**{**vars(args), "requests": 4}), list(adapters)))  # warm-up
            time.sleep(1.5)
            before = store_counters(url)
            seconds, ttfts, tokens = asyncio.run(traffic(url, args, list(adapters)))
            time.sleep(1.5)  # the replicas' next metrics report
            after = store_counters(url)
        finally:
            stop_cluster()
        ttfts.sort()
        rows.append((label, after["page_ins"] - before["page_ins"], after["loads"] - before["loads"],
                     tokens / seconds, ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]))
    print(f"{args.adapters} adapters, {args.slots} slots per replica, {args.requests} requests, "
          f"{args.concurrency} concurrent, {args.max_tokens} tokens each")
    print(f"{'setting':<24}{'page-ins':>10}{'loads':>8}{'tok/s':>9}{'p99 TTFT s':>12}")
    for label, page_ins, loads, tps, p99 in rows:
        print(f"{label:<24}{page_ins:>10.0f}{loads:>8.0f}{tps:>9.1f}{p99:>12.2f}")
    base = rows[0][3]
    print("throughput vs 1 replica: " + ", ".join(f"{label} {tps / base:.2f}x" for label, _, _, tps, _ in rows))


if __name__ == "__main__":
    main()
