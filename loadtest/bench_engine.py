"""Engine throughput with many adapters in one batch (a benchmark, not a test).

Default setting (issue: engine core): the bundled SmolLM2-135M on the CPU,
32 concurrent requests, each with its own random rank-16 adapter on all seven
projections, 128-token prompts, 64 new tokens (greedy, EOS ignored).
Measured in one run, for each --requests N:
  loramux  mixed      N distinct adapters (and, with CUDA graphs, the same eagerly at the smallest N)
  loramux  shared     one adapter for all N requests
  loramux  base       no adapter
  HF       base       transformers `generate`, no adapter (PEFT's model with its adapters disabled)
  PEFT     mixed      PEFT `generate(adapter_names=...)` over N distinct adapters (at --peft-requests only)
and: the decode step at the smallest N against the time to read the weights once
(weight bytes / a device-to-device copy's bandwidth measured here), and the
page-in time of one rank-16 adapter on all seven projections from the CPU
cache (pinned memory on CUDA).
`--device cuda --config 1b|7b --requests 32 128 --new-tokens 128` is the GPU
setting (loadtest/run_gpu.sh); `--config tiny` is its CPU smoke run.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import time
import uuid
from pathlib import Path

import torch
from bench_common import machine_description, scratch_dir
from bench_kernels import copy_bandwidth
from bench_paging import page_in_seconds
from random_model import RANDOM_CONFIGS, write_random_model

from loramux.adapters_store.synthetic import write_random_adapter
from loramux.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, StoreConfig
from loramux.engine import Engine, SamplingParams

logger = logging.getLogger("bench_engine")

def run_loramux(engine: Engine, prompts: list[list[int]], mixes: list[list[str]],
                new_tokens: int) -> tuple[float, float]:
    """Generate `new_tokens` for every prompt at once (prefill included) -> (tokens/s, median decode step s).

    A decode step is one in which every request decodes one token.
    """
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    batch = uuid.uuid4().hex
    for i, (prompt, mix) in enumerate(zip(prompts, mixes)):
        engine.add_request(f"bench-{batch}-{i}", prompt, params, mix)
    produced, decode_steps = 0, []
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        step_start = time.perf_counter()
        outs = engine.step()  # ends with the host reading the sampled tokens: the wall clock covers the GPU work
        if len(outs) == len(prompts) == engine.last_step_num_tokens:
            decode_steps.append(time.perf_counter() - step_start)
        produced += len(outs)
    elapsed = time.perf_counter() - start
    assert produced == len(prompts) * new_tokens
    return produced / elapsed, statistics.median(decode_steps) if decode_steps else float("nan")


def run_hf(model, prompts: list[list[int]], new_tokens: int, adapter_names: list[str] | None = None) -> float:
    ids = torch.tensor(prompts, device=model.device)
    kwargs = {} if adapter_names is None else {"adapter_names": adapter_names}
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens
    return len(prompts) * new_tokens / elapsed


def kv_cache_gib(model_path: str, requests: int, tokens_per_request: int, itemsize: int) -> float:
    """A KV budget for `requests` sequences of `tokens_per_request` (+ a block of slack each), with 25% headroom."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_path)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * itemsize
    return 1.25 * requests * (tokens_per_request + 16) * per_token / 2**30


def weight_read_bytes(engine: Engine) -> int:
    """Bytes a decode step must read: every weight once, the embedding table aside (rows are gathered)."""
    model = engine.model
    total = sum(p.nbytes for p in model.parameters())
    return total - (model.embed_tokens.nbytes if model.lm_head is not model.embed_tokens else 0)


def free_device_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder or GGUF (default: bundled SmolLM2-135M)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--config", choices=sorted(RANDOM_CONFIGS), help="random-init Llama shape instead of --model")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder for --config models")
    parser.add_argument("--keep-model", type=Path, help="write the --config model here and keep it (else a temp dir)")
    parser.add_argument("--requests", type=int, nargs="+", default=[32], help="concurrent requests (one level each)")
    parser.add_argument("--peft-requests", type=int, help="the level PEFT mixed runs at (default: the smallest)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--baseline-new-tokens", type=int, help="new tokens for HF/PEFT (default: --new-tokens)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapter-files", type=int, default=8,
                        help="distinct random adapter files, registered cyclically under one name per request")
    parser.add_argument("--kv-gib", type=float, help="KV cache budget (default: what the largest level needs)")
    parser.add_argument("--skip-baselines", action="store_true", help="loramux rows only")
    parser.add_argument("--rounds", type=int, default=2, help="repeat every configuration; report the best")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("loramux", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    tmp = scratch_dir("loramux-bench-")
    model_path = args.model
    if args.config:
        if args.tokenizer is None:
            parser.error("--config needs --tokenizer DIR (any HF tokenizer folder; prompts are random token ids)")
        model_path = str(write_random_model(args.keep_model or tmp / "model", args.config, args.tokenizer,
                                            args.device))
    levels = sorted(args.requests)
    n_max, n_min = levels[-1], levels[0]
    n_peft = args.peft_requests or n_min
    baseline_tokens = args.baseline_new_tokens or args.new_tokens
    kv_gib = args.kv_gib
    if kv_gib is None and model_path is not None and args.device == "cuda":
        kv_gib = kv_cache_gib(model_path, n_max, args.prompt_len + args.new_tokens, itemsize=2)
    engine = Engine(EngineConfig(
        model=ModelConfig(model=model_path, device=args.device),
        cache=CacheConfig(kv_cache_memory_gib=kv_gib),
        scheduler=SchedulerConfig(max_num_seqs=max(64, n_max),
                                  max_num_batched_tokens=max(2048, n_max * args.prompt_len),
                                  max_loras_per_batch=n_max),
        store=StoreConfig(max_loras=n_max + 1, max_lora_rank=args.rank)))
    shapes, num_layers = engine.shape.lora_target_shapes(), engine.shape.num_layers
    files = [write_random_adapter(tmp / f"adapter-{i}", shapes, num_layers, args.rank, seed=i)
             for i in range(min(args.adapter_files, n_max))]
    names = [f"bench-{i}" for i in range(n_max)]
    for i, name in enumerate(names):
        engine.add_adapter(name, str(files[i % len(files)]))
    engine.add_adapter("probe", str(files[0]))
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, engine.shape.vocab_size - 100, (n_max, args.prompt_len), generator=g).tolist()

    machine = machine_description(args.device)
    logger.info("machine: %s", machine)
    logger.info("settings: model=%s device=%s dtype=%s requests=%s prompt=%d new=%d (HF/PEFT %d) rank=%d "
                "(all 7 projections) cuda_graphs=%s", engine.model_id, args.device,
                str(engine.dtype).removeprefix("torch."), levels, args.prompt_len, args.new_tokens, baseline_tokens,
                args.rank, engine.decode_graphs is not None)
    run_loramux(engine, prompts[:2], [[names[0]], []], 4)  # warm-up

    def loramux_runs(n: int) -> dict:
        runs = {f"loramux_mixed@{n}": lambda: run_loramux(engine, prompts[:n], [[m] for m in names[:n]],
                                                          args.new_tokens),
                f"loramux_shared@{n}": lambda: run_loramux(engine, prompts[:n], [[names[0]]] * n, args.new_tokens),
                f"loramux_base@{n}": lambda: run_loramux(engine, prompts[:n], [[]] * n, args.new_tokens)}
        if n == n_min and engine.decode_graphs is not None:
            def eager():
                graphs, engine.decode_graphs = engine.decode_graphs, None
                try:
                    return run_loramux(engine, prompts[:n], [[m] for m in names[:n]], args.new_tokens)
                finally:
                    engine.decode_graphs = graphs
            runs[f"loramux_mixed_eager@{n}"] = eager
        return runs

    runs = {key: run for n in levels for key, run in loramux_runs(n).items()}
    # Rounds interleave the configurations, so a drift in machine speed hits all of them alike.
    tokens_per_s, decode_step_s = dict.fromkeys(runs, 0.0), dict.fromkeys(runs, float("inf"))
    for _ in range(args.rounds):
        for key, run in runs.items():
            tps, step = run()
            tokens_per_s[key], decode_step_s[key] = max(tokens_per_s[key], tps), min(decode_step_s[key], step)
    page_in_ms = 1e3 * sorted(page_in_seconds(engine, "probe", from_disk=False) for _ in range(5))[2]
    weight_bytes = weight_read_bytes(engine)
    bandwidth = copy_bandwidth(args.device, engine.dtype)
    checkpoint_folder, dtype = engine.checkpoint_folder, engine.dtype
    del engine, runs
    free_device_memory(args.device)

    if not args.skip_baselines:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(checkpoint_folder, dtype=dtype).to(args.device).eval()
        peft = PeftModel.from_pretrained(hf, files[0], adapter_name=names[0])
        for i, name in enumerate(names[1:n_peft], start=1):
            peft.load_adapter(files[i % len(files)], adapter_name=name)
        peft.eval()

        def hf_base(n: int) -> float:
            with peft.disable_adapter():
                return run_hf(peft, prompts[:n], baseline_tokens)

        baselines = {f"hf_base@{n}": (lambda n=n: hf_base(n)) for n in levels}
        baselines[f"peft_mixed@{n_peft}"] = lambda: run_hf(peft, prompts[:n_peft], baseline_tokens,
                                                            adapter_names=names[:n_peft])
        for _ in range(args.rounds):
            for key, run in baselines.items():
                tokens_per_s[key] = max(tokens_per_s.get(key, 0.0), run())
        del hf, peft
        free_device_memory(args.device)

    logger.info("%-26s %12s %16s   (best of %d interleaved rounds)", "configuration", "tokens/s",
                "decode step ms", args.rounds)
    for key, value in tokens_per_s.items():
        step = decode_step_s.get(key)
        logger.info("%-26s %12.1f %16s", key, value, "" if step is None else f"{step * 1e3:.2f}")
    ratios = {}
    for n in levels:
        ratios[f"mixed / base (loramux) @{n}"] = tokens_per_s[f"loramux_mixed@{n}"] / tokens_per_s[f"loramux_base@{n}"]
        ratios[f"mixed / shared (loramux) @{n}"] = (tokens_per_s[f"loramux_mixed@{n}"]
                                                   / tokens_per_s[f"loramux_shared@{n}"])
        if f"hf_base@{n}" in tokens_per_s:
            ratios[f"base / HF base @{n}"] = tokens_per_s[f"loramux_base@{n}"] / tokens_per_s[f"hf_base@{n}"]
    if f"peft_mixed@{n_peft}" in tokens_per_s:
        ratios[f"mixed / PEFT mixed @{n_peft}"] = (tokens_per_s[f"loramux_mixed@{n_peft}"]
                                                  / tokens_per_s[f"peft_mixed@{n_peft}"])
    if f"loramux_mixed_eager@{n_min}" in tokens_per_s:
        ratios[f"CUDA graphs / eager (mixed) @{n_min}"] = (tokens_per_s[f"loramux_mixed@{n_min}"]
                                                          / tokens_per_s[f"loramux_mixed_eager@{n_min}"])
    weight_read_s = weight_bytes / bandwidth
    ratios[f"decode step / weight-read time (mixed) @{n_min}"] = decode_step_s[f"loramux_mixed@{n_min}"] / weight_read_s
    ratios[f"decode step / weight-read time (base) @{n_min}"] = decode_step_s[f"loramux_base@{n_min}"] / weight_read_s
    for key, value in ratios.items():
        logger.info("%-44s %8.2fx", key, value)
    logger.info("weights read per step %.2f GB; copy bandwidth %.1f GB/s (read + write); weight-read time %.3f ms",
                weight_bytes / 1e9, bandwidth / 1e9, weight_read_s * 1e3)
    logger.info("page-in of a rank-%d adapter on all seven projections from the CPU cache: %.2f ms (median of 5)",
                args.rank, page_in_ms)
    if args.json:
        args.json.write_text(json.dumps({
            "machine": machine, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "tokens_per_s": tokens_per_s, "decode_step_s": {k: v for k, v in decode_step_s.items()},
            "ratios": ratios, "weight_read_bytes": weight_bytes, "copy_bandwidth_bytes_per_s": bandwidth,
            "page_in_ms": page_in_ms}, indent=2))


if __name__ == "__main__":
    main()
