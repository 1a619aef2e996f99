"""Engine throughput with many adapters in one batch (a benchmark, not a test).

Default setting (issue: engine core): the bundled SmolLM2-135M on the CPU,
32 concurrent requests, each with its own random rank-16 adapter on all seven
projections, 128-token prompts, 64 new tokens (greedy, EOS ignored).
Measured in one run:
  loramux  mixed      32 distinct adapters
  loramux  shared     one adapter for all 32 requests
  loramux  base       no adapter
  HF       base       transformers `generate`, no adapter
  PEFT     mixed      PEFT `generate(adapter_names=...)` over the same 32 adapters
`--device cuda --config 1b|7b` runs random-init Llama shapes on a GPU instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from loramux.config import LORA_TARGET_MODULES, CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, StoreConfig
from loramux.engine import Engine, SamplingParams

logger = logging.getLogger("bench_engine")

RANDOM_CONFIGS = {  # random-init Llama shapes for GPU runs (no checkpoint travels to the GPU machine)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
}


def machine_description(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    text = f"{platform.node()} {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if device == "cuda":
        text += f", {torch.cuda.get_device_name()}"
    return text


def write_random_adapter(folder: Path, shapes: dict[str, tuple[int, int]], num_layers: int, rank: int,
                         seed: int) -> Path:
    """A PEFT folder with random A/B on all seven projections."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(num_layers):
        for module in LORA_TARGET_MODULES:
            d_out, d_in = shapes[module]
            part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) / d_in ** 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(LORA_TARGET_MODULES),
        "bias": "none", "task_type": "CAUSAL_LM", "lora_dropout": 0.0}))
    return folder


def write_random_model(folder: Path, config_name: str, tokenizer_source: Path | None) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**RANDOM_CONFIGS[config_name], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    return folder


def run_loramux(engine: Engine, prompts: list[list[int]], mixes: list[list[str]], new_tokens: int) -> float:
    """Tokens/s generating `new_tokens` for every prompt at once (prefill included)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = engine.generate(prompts, params, mixes)
    elapsed = time.perf_counter() - start
    assert all(o[0].num_output_tokens == new_tokens for o in outs)
    return len(prompts) * new_tokens / elapsed


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder or GGUF (default: bundled SmolLM2-135M)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--config", choices=sorted(RANDOM_CONFIGS), help="random-init Llama shape instead of --model")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--skip-baselines", action="store_true", help="loramux rows only")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("loramux", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    tmp = Path(tempfile.mkdtemp(prefix="loramux-bench-"))
    model_path = args.model
    if args.config:
        model_path = str(write_random_model(tmp / "model", args.config, None))
    n = args.requests
    engine = Engine(EngineConfig(
        model=ModelConfig(model=model_path, device=args.device),
        cache=CacheConfig(),
        scheduler=SchedulerConfig(max_num_seqs=max(64, n), max_num_batched_tokens=max(2048, n * args.prompt_len),
                                  max_loras_per_batch=n),
        store=StoreConfig(max_loras=n, max_lora_rank=args.rank)))
    shapes, num_layers = engine.shape.lora_target_shapes(), engine.shape.num_layers
    adapters = {f"bench-{i}": write_random_adapter(tmp / f"bench-{i}", shapes, num_layers, args.rank, seed=i)
                for i in range(n)}
    for name, folder in adapters.items():
        engine.add_adapter(name, str(folder))
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, engine.shape.vocab_size - 100, (n, args.prompt_len), generator=g).tolist()
    names = list(adapters)

    logger.info("machine: %s", machine_description(args.device))
    logger.info("settings: model=%s device=%s dtype=%s requests=%d prompt=%d new=%d rank=%d (all 7 projections)",
                engine.model_id, args.device, str(engine.dtype).removeprefix("torch."), n, args.prompt_len,
                args.new_tokens, args.rank)
    run_loramux(engine, prompts[:2], [[names[0]], []], 4)  # warm-up
    results = {
        "loramux_mixed": run_loramux(engine, prompts, [[name] for name in names], args.new_tokens),
        "loramux_shared": run_loramux(engine, prompts, [[names[0]]] * n, args.new_tokens),
        "loramux_base": run_loramux(engine, prompts, [[]] * n, args.new_tokens),
    }
    if not args.skip_baselines:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(engine.checkpoint_folder, dtype=engine.dtype).to(args.device).eval()
        results["hf_base"] = run_hf(hf, prompts, args.new_tokens)
        peft = PeftModel.from_pretrained(hf, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            peft.load_adapter(adapters[name], adapter_name=name)
        results["peft_mixed"] = run_hf(peft.eval(), prompts, args.new_tokens, adapter_names=names)

    logger.info("%-16s %12s", "configuration", "tokens/s")
    for key, value in results.items():
        logger.info("%-16s %12.1f", key, value)
    ratios = {"mixed / base (loramux)": results["loramux_mixed"] / results["loramux_base"]}
    if "hf_base" in results:
        ratios["mixed / PEFT mixed"] = results["loramux_mixed"] / results["peft_mixed"]
        ratios["base / HF base"] = results["loramux_base"] / results["hf_base"]
    for key, value in ratios.items():
        logger.info("%-24s %6.2fx", key, value)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_description(args.device), "settings": vars(args) | {
            "json": str(args.json), "model": engine.model_id}, "tokens_per_s": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
