"""Command line: `loramux serve | generate`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from loramux.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, StoreConfig


def parse_adapter_flag(value: str) -> tuple[str, str]:
    """NAME=PATH, or PATH (named after its folder)."""
    name, sep, path = value.partition("=")
    if not sep:
        path, name = value, Path(value).expanduser().resolve().name
    if not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter expects NAME=PATH or PATH, got {value!r}")
    return name, path


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    m, c, s, st = ModelConfig(), CacheConfig(), SchedulerConfig(), StoreConfig()
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None, help="local HF folder or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    g.add_argument("--served-model-name", default=None, help="model id reported by the API")
    g.add_argument("--dtype", default=m.dtype, choices=["auto", "float32", "float16", "bfloat16"])
    g.add_argument("--device", default=m.device, help="auto, cpu, cuda or cuda:N")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--enforce-eager", action="store_true", help="do not capture CUDA graphs for decode")
    g.add_argument("--seed", type=int, default=0)
    g = parser.add_argument_group("KV cache and batching")
    g.add_argument("--block-size", type=int, default=c.block_size)
    g.add_argument("--num-kv-blocks", type=int, default=None, help="explicit KV block count")
    g.add_argument("--kv-cache-memory-gib", type=float, default=None,
                   help="KV cache budget (default: 1 GiB on CPU, 90%% of free GPU memory)")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--max-num-seqs", type=int, default=s.max_num_seqs)
    g.add_argument("--max-num-batched-tokens", type=int, default=s.max_num_batched_tokens)
    g = parser.add_argument_group("LoRA adapters")
    g.add_argument("--adapter", action="append", type=parse_adapter_flag, default=[], metavar="NAME=PATH",
                   help="PEFT LoRA folder to load (repeatable)")
    g.add_argument("--max-loras", type=int, default=st.max_loras, help="adapter slots")
    g.add_argument("--max-lora-rank", type=int, default=st.max_lora_rank)
    g.add_argument("--max-loras-per-batch", type=int, default=s.max_loras_per_batch)
    g.add_argument("--lora-backend", default=st.lora_backend, choices=["auto", "torch", "triton"])


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                          served_model_name=args.served_model_name, enforce_eager=args.enforce_eager),
        cache=CacheConfig(block_size=args.block_size, num_blocks=args.num_kv_blocks,
                          kv_cache_memory_gib=args.kv_cache_memory_gib,
                          enable_prefix_caching=not args.no_prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_loras_per_batch=args.max_loras_per_batch),
        store=StoreConfig(max_loras=args.max_loras, max_lora_rank=args.max_lora_rank, lora_backend=args.lora_backend,
                          adapters=dict(args.adapter)),
        seed=args.seed,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from loramux.engine import Engine, SamplingParams

    engine = Engine(engine_config_from_args(args))
    names = [name for name, _ in args.adapter]
    weights = args.weights or [1.0] * len(names)
    if len(weights) != len(names):
        raise SystemExit("--weights needs one weight per --adapter")
    prompt = args.prompt
    if args.chat:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                      add_generation_prompt=True, tokenize=False)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    [[out]] = engine.generate([prompt], params, [list(zip(names, weights))])
    print(out.new_text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loramux", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one prompt and print it")
    add_engine_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--weights", type=float, nargs="*", help="mixture weight per --adapter (default 1 each)")
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        logging.getLogger("loramux").error("%s", exc)
        return 2
