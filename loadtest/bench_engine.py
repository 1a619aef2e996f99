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
import tempfile
import time
from pathlib import Path

import torch
from bench_common import machine_description
from safetensors.torch import save_file

from loramux.adapters_store.synthetic import write_random_adapter
from loramux.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, StoreConfig
from loramux.engine import Engine, SamplingParams

logger = logging.getLogger("bench_engine")

RANDOM_CONFIGS = {  # random-init Llama shapes for GPU runs (no checkpoint travels to the GPU machine)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
}


def write_random_model(folder: Path, config_name: str, tokenizer_dir: Path, device: str) -> Path:
    """A random-init Llama checkpoint (bf16 safetensors, fixed seed) with a borrowed tokenizer.

    Tensors are drawn on `device` and written shard by shard, which is much
    faster than initialising a 7B model through transformers on the CPU.
    """
    from transformers import AutoTokenizer, LlamaConfig

    config = LlamaConfig(**RANDOM_CONFIGS[config_name], max_position_embeddings=4096, tie_word_embeddings=False,
                         torch_dtype="bfloat16")
    config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    g = torch.Generator(device=device).manual_seed(0)
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)

    def rand(*shape):
        return (torch.randn(*shape, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()

    save_file({"model.embed_tokens.weight": rand(config.vocab_size, h), "lm_head.weight": rand(config.vocab_size, h),
               "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}, folder / "model-embed.safetensors")
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        save_file({p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
                   p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
                   p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
                   p + "mlp.down_proj.weight": rand(h, i),
                   p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                   p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)},
                  folder / f"model-{layer:03d}.safetensors")
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
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder for --config models")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--skip-baselines", action="store_true", help="loramux rows only")
    parser.add_argument("--rounds", type=int, default=2, help="repeat every configuration; report the best")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("loramux", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    tmp = Path(tempfile.mkdtemp(prefix="loramux-bench-"))
    model_path = args.model
    if args.config:
        if args.tokenizer is None:
            parser.error("--config needs --tokenizer DIR (any HF tokenizer folder; prompts are random token ids)")
        model_path = str(write_random_model(tmp / "model", args.config, args.tokenizer, args.device))
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
    runs = {
        "loramux_mixed": lambda: run_loramux(engine, prompts, [[name] for name in names], args.new_tokens),
        "loramux_shared": lambda: run_loramux(engine, prompts, [[names[0]]] * n, args.new_tokens),
        "loramux_base": lambda: run_loramux(engine, prompts, [[]] * n, args.new_tokens),
    }
    if not args.skip_baselines:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        def load_hf():
            return AutoModelForCausalLM.from_pretrained(engine.checkpoint_folder, dtype=engine.dtype).to(
                args.device).eval()

        hf = load_hf()
        peft = PeftModel.from_pretrained(load_hf(), adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            peft.load_adapter(adapters[name], adapter_name=name)
        runs["hf_base"] = lambda: run_hf(hf, prompts, args.new_tokens)
        runs["peft_mixed"] = lambda: run_hf(peft.eval(), prompts, args.new_tokens, adapter_names=names)
    # Rounds interleave the configurations, so a drift in machine speed hits all of them alike.
    results = dict.fromkeys(runs, 0.0)
    for _ in range(args.rounds):
        for key, run in runs.items():
            results[key] = max(results[key], run())

    logger.info("%-16s %12s   (best of %d interleaved rounds)", "configuration", "tokens/s", args.rounds)
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
