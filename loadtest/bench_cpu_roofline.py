"""The CPU roofline: bfloat16 against float32, mixed adapters against the base model, and the model's
achieved FLOP/s against the GEMM FLOP/s this machine reaches at the model's shapes (a benchmark, not a test).

One run on the CPU, the bundled SmolLM2-135M, 32 concurrent requests of
128-token prompts and 64 new tokens (greedy, EOS ignored), for each dtype
(float32, bfloat16) and each batch:
  base    no adapter
  mixed   32 distinct random rank-16 adapters on all seven projections, one per request
Per run: the prefill step (all 32 prompts, 4,096 tokens, in one step), the
median decode step (32 rows), and tokens/s over the whole generation.
GEMM: `F.linear` (in bfloat16 also oneDNN on a prepacked weight, the faster
of the two, as the model runs it) at exactly the model's projection shapes
for that step (M = 4,096 or 32 rows; the LM head at the 32 scored rows),
weights in the same dtype, each shape's one
weight timed alone in the same run (so it stays in the CPU's caches, while
the model streams all of its weights from memory every step).
Roofline ratio: the step's model FLOPs (projections + LM head + attention)
per second, over the GEMM FLOP/s at its shapes.
Rounds interleave every configuration, so a change in the machine's load
(this CPU is shared) hits all of them alike; each number is the best of its rounds.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import time
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_common import machine_description, scratch_dir, timed

from loramux.adapters_store.synthetic import write_random_adapter
from loramux.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, StoreConfig
from loramux.engine import Engine, SamplingParams, dense_gemm
from loramux.engine.model import ModelShape

logger = logging.getLogger("bench_cpu_roofline")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def step_gemms(shape: ModelShape, rows: int, scored_rows: int) -> list[tuple[int, int, int, int]]:
    """(count, M, K, N) of every projection GEMM of one step: fused q/k/v and gate/up as the model runs them."""
    s = shape
    qkv = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
    layer = [(rows, s.hidden_size, qkv), (rows, s.num_heads * s.head_dim, s.hidden_size),
             (rows, s.hidden_size, 2 * s.intermediate_size), (rows, s.intermediate_size, s.hidden_size)]
    return [(s.num_layers, *g) for g in layer] + [(1, scored_rows, s.hidden_size, s.vocab_size)]


def gemm_flops(gemms: list[tuple[int, int, int, int]]) -> float:
    return sum(2.0 * count * m * k * n for count, m, k, n in gemms)


def attention_flops(shape: ModelShape, batch: int, new_tokens: int, context: int) -> float:
    """QK^T and PV of one step: each new token attends to its causal context (about `context` keys on average)."""
    return 4.0 * shape.num_layers * shape.num_heads * shape.head_dim * batch * new_tokens * context


def gemm_seconds(gemms: list[tuple[int, int, int, int]], dtype: torch.dtype, repeat: int) -> float:
    """Time of the step's GEMMs run alone: each distinct shape timed with one weight, times its count. Per shape
    the GEMM loramux runs: `F.linear` in float32 (MKL); in bfloat16 the faster of `F.linear` (oneDNN reordering
    the weight every call) and oneDNN on a weight reordered once (`engine/dense_gemm.py`, what loramux runs)."""
    total = 0.0
    for count, m, k, n in gemms:
        x, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
        seconds = timed(lambda: F.linear(x, w), "cpu", repeat, warmup=1)
        if dense_gemm.packs_weights(torch.device("cpu"), dtype):
            packed = dense_gemm.prepack(w)
            seconds = min(seconds, timed(lambda: dense_gemm.linear(x, packed), "cpu", repeat, warmup=1))
        total += count * seconds
    return total


def run_batch(engine: Engine, prompts: list[list[int]], mixes: list[list[str]], new_tokens: int
              ) -> tuple[float, float, float]:
    """Generate for every prompt at once -> (prefill step s, median decode step s, tokens/s overall)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    batch = uuid.uuid4().hex
    for i, (prompt, mix) in enumerate(zip(prompts, mixes)):
        engine.add_request(f"roofline-{batch}-{i}", prompt, params, mix)
    prefill, decode, produced = None, [], 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        step_start = time.perf_counter()
        outs = engine.step()
        elapsed = time.perf_counter() - step_start
        if prefill is None:
            assert engine.last_step_num_tokens == sum(map(len, prompts)), "the prompts must prefill in one step"
            prefill = elapsed
        elif len(outs) == len(prompts) == engine.last_step_num_tokens:
            decode.append(elapsed)
        produced += len(outs)
    assert produced == len(prompts) * new_tokens
    return prefill, statistics.median(decode), produced / (time.perf_counter() - start)


def build_engine(dtype: str, batch: int, prompt_len: int, rank: int, adapters: list[Path]) -> Engine:
    engine = Engine(EngineConfig(
        model=ModelConfig(dtype=dtype),
        cache=CacheConfig(kv_cache_memory_gib=0.5, enable_prefix_caching=False),  # every round prefills in full
        scheduler=SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=batch * prompt_len,
                                  max_loras_per_batch=batch),
        store=StoreConfig(max_loras=batch, max_lora_rank=rank)))
    for i, path in enumerate(adapters):
        engine.add_adapter(f"roofline-{i}", str(path))
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gemm-repeat", type=int, default=5, help="timed calls per GEMM shape and round")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core); on a CPU "
                        "shared with other busy processes 1 avoids stalls at every parallel region's barrier")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--plot", default="", help="also draw the results here (PNG; '' for none)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("loramux", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()

    tmp = scratch_dir("loramux-roofline-")
    engines = {}
    for name in DTYPES:
        if not engines:
            probe = build_engine(name, args.batch, args.prompt_len, args.rank, [])
            shape = probe.shape
            adapters = [write_random_adapter(tmp / f"adapter-{i}", shape.lora_target_shapes(), shape.num_layers,
                                             args.rank, seed=i) for i in range(args.batch)]
            del probe
        engines[name] = build_engine(name, args.batch, args.prompt_len, args.rank, adapters)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, shape.vocab_size - 100, (args.batch, args.prompt_len), generator=g).tolist()
    mixes = {"base": [[]] * args.batch, "mixed": [[f"roofline-{i}"] for i in range(args.batch)]}

    machine = machine_description("cpu")
    logger.info("machine: %s", machine)
    logger.info("settings: model=%s batch=%d prompt=%d new=%d rank=%d (all 7 projections, %d distinct adapters) "
                "rounds=%d", engines["float32"].model_id, args.batch, args.prompt_len, args.new_tokens, args.rank,
                args.batch, args.rounds)
    prefill_gemms = step_gemms(shape, args.batch * args.prompt_len, args.batch)
    decode_gemms = step_gemms(shape, args.batch, args.batch)
    for engine in engines.values():
        run_batch(engine, prompts[:2], [mixes["mixed"][0], []], 4)  # warm-up

    best: dict[str, float] = {}

    def keep_min(key: str, value: float) -> None:
        best[key] = min(best.get(key, float("inf")), value)

    for _ in range(args.rounds):
        for dtype_name, engine in engines.items():
            for mix_name, mix in mixes.items():
                prefill, decode, tokens_per_s = run_batch(engine, prompts, mix, args.new_tokens)
                keep_min(f"{dtype_name}/{mix_name}/prefill_s", prefill)
                keep_min(f"{dtype_name}/{mix_name}/decode_step_s", decode)
                keep_min(f"{dtype_name}/{mix_name}/s_per_token", 1 / tokens_per_s)
            dtype = DTYPES[dtype_name]
            keep_min(f"{dtype_name}/gemm/prefill_s", gemm_seconds(prefill_gemms, dtype, args.gemm_repeat))
            keep_min(f"{dtype_name}/gemm/decode_step_s", gemm_seconds(decode_gemms, dtype, args.gemm_repeat))
    load_end = os.getloadavg()
    del engines
    gc.collect()

    # Attention context per new token: half the prompt in prefill (causal); the prompt + half the output in decode.
    flops = {"prefill": gemm_flops(prefill_gemms) + attention_flops(shape, args.batch, args.prompt_len,
                                                                    args.prompt_len // 2),
             "decode": gemm_flops(decode_gemms) + attention_flops(shape, args.batch, 1,
                                                                  args.prompt_len + args.new_tokens // 2)}
    phase_key = {"prefill": "prefill_s", "decode": "decode_step_s"}
    results = {"tokens_per_s": {}, "model_gflops": {}, "gemm_gflops": {}, "roofline": {}}
    for dtype_name in DTYPES:
        for phase, key in phase_key.items():
            gemm_rate = gemm_flops(prefill_gemms if phase == "prefill" else decode_gemms) / best[
                f"{dtype_name}/gemm/{key}"]
            results["gemm_gflops"][f"{dtype_name}/{phase}"] = gemm_rate / 1e9
            for mix_name in mixes:
                rate = flops[phase] / best[f"{dtype_name}/{mix_name}/{key}"]
                results["model_gflops"][f"{dtype_name}/{mix_name}/{phase}"] = rate / 1e9
                results["roofline"][f"{dtype_name}/{mix_name}/{phase}"] = rate / gemm_rate
        for mix_name in mixes:
            results["tokens_per_s"][f"{dtype_name}/{mix_name}"] = 1 / best[f"{dtype_name}/{mix_name}/s_per_token"]
    tps = results["tokens_per_s"]
    ratios = {"bfloat16 / float32 (base)": tps["bfloat16/base"] / tps["float32/base"],
              "bfloat16 / float32 (mixed)": tps["bfloat16/mixed"] / tps["float32/mixed"],
              "mixed / base (bfloat16)": tps["bfloat16/mixed"] / tps["bfloat16/base"],
              "mixed / base (float32)": tps["float32/mixed"] / tps["float32/base"]}

    logger.info("load average (1, 5, 15 min): start %s, end %s", *(
        ", ".join(f"{v:.2f}" for v in load) for load in (load_start, load_end)))
    logger.info("%-18s %10s %12s %14s %16s %16s", "configuration", "tokens/s", "prefill ms", "decode step ms",
                "prefill roofline", "decode roofline")
    for dtype_name in DTYPES:
        for mix_name in mixes:
            k = f"{dtype_name}/{mix_name}"
            logger.info("%-18s %10.1f %12.1f %14.2f %15.0f%% %15.0f%%", k, tps[k], best[k + "/prefill_s"] * 1e3,
                        best[k + "/decode_step_s"] * 1e3, 100 * results["roofline"][k + "/prefill"],
                        100 * results["roofline"][k + "/decode"])
        logger.info("%-18s GEMM alone at the model's shapes: prefill %.1f GFLOP/s (%.1f ms), decode %.1f GFLOP/s "
                    "(%.2f ms)", dtype_name, results["gemm_gflops"][f"{dtype_name}/prefill"],
                    best[f"{dtype_name}/gemm/prefill_s"] * 1e3, results["gemm_gflops"][f"{dtype_name}/decode"],
                    best[f"{dtype_name}/gemm/decode_step_s"] * 1e3)
    for key, value in ratios.items():
        logger.info("%-30s %6.2fx", key, value)
    logger.info("model FLOPs per step: prefill %.1f GFLOP, decode %.2f GFLOP (projections, LM head at the scored "
                "rows, attention)", flops["prefill"] / 1e9, flops["decode"] / 1e9)
    if args.json:
        args.json.write_text(json.dumps({
            "machine": machine, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "load_average": {"start": load_start, "end": load_end}, "best_seconds": best,
            "model_flops": flops, **results, "ratios": ratios}, indent=2))
    if args.plot:  # a string: Path("") would be "." and save ".png"
        plot(results, Path(args.plot))


def plot(results: dict, path: Path) -> None:
    """Tokens/s per configuration, and model FLOP/s against GEMM FLOP/s per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    configs = list(results["tokens_per_s"])
    left.bar(configs, [results["tokens_per_s"][c] for c in configs],
             color=["tab:gray", "tab:olive", "tab:blue", "tab:cyan"])
    left.set_ylabel("output tokens/s (32 requests)")
    left.tick_params(axis="x", labelsize=8)
    bars = [(f"{d}\n{p}", results["gemm_gflops"][f"{d}/{p}"],
             results["model_gflops"][f"{d}/base/{p}"], results["model_gflops"][f"{d}/mixed/{p}"])
            for d in DTYPES for p in ("prefill", "decode")]
    xs = range(len(bars))
    for offset, (label, column) in zip((-0.27, 0, 0.27), (("GEMM alone", 1), ("model, base", 2),
                                                          ("model, mixed", 3))):
        right.bar([x + offset for x in xs], [b[column] for b in bars], width=0.27, label=label)
    right.set_xticks(list(xs), [b[0] for b in bars], fontsize=8)
    right.set_ylabel("GFLOP/s")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
