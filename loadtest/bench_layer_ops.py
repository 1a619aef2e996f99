"""A decoder layer's element-wise ops on the CPU in bfloat16: torch's against the C++ kernels (`cpu_layers.cpp`).

Two parts, one run, the bundled SmolLM2-135M's shapes:
  ops     each op (RMSNorm, rotary of q, silu(gate) * up) alone, per call, at a decode step's rows (the batch)
          and a prefill step's (batch x prompt length)
  engine  two bfloat16 engines in one process, alike but for their layer ops (the torch one's chosen by
          patching `select_layer_ops`: no setting picks them), generating for the same prompts: the prefill
          step and the median decode step, rounds interleaved so that the CPU's load (it is shared) hits both
          alike; each number is the best of its rounds
Ratios are torch's time over the kernels'.
"""

from __future__ import annotations

import argparse
import logging
import os
from unittest import mock

import torch
from bench_common import machine_description, timed
from bench_cpu_roofline import build_engine, run_batch

from loramux.engine import engine as engine_module
from loramux.engine.layer_ops import TORCH_LAYER_OPS, LayerOps, cpu_kernel_layer_ops
from loramux.engine.model import ModelShape
from loramux.kernels import cpu_extension

logger = logging.getLogger("bench_layer_ops")


def op_cases(shape: ModelShape, rows: int, gen: torch.Generator) -> dict[str, tuple]:
    """name -> (LayerOps field, its arguments) at the model's shapes for `rows` tokens."""
    s = shape
    q_size, kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    qkv = torch.randn(rows, q_size + 2 * kv_size, generator=gen).bfloat16()
    rope = tuple(torch.randn(rows, 1, s.head_dim, generator=gen).bfloat16() for _ in range(2))
    return {
        "rms_norm": ("rms_norm", (torch.randn(rows, s.hidden_size, generator=gen).bfloat16(),
                                  torch.randn(s.hidden_size, generator=gen).bfloat16(), 1e-5)),
        "rotate q": ("rotate", (qkv[:, :q_size].view(rows, s.num_heads, s.head_dim), rope)),
        "silu_mul": ("silu_mul", (torch.randn(rows, 2 * s.intermediate_size, generator=gen).bfloat16(),)),
    }


def time_ops(shape: ModelShape, rows: int, ops: list[LayerOps], repeat: int) -> dict[str, dict[str, float]]:
    """op name -> {LayerOps name: seconds per call}."""
    out = {}
    with torch.inference_mode():
        for name, (field, args) in op_cases(shape, rows, torch.Generator().manual_seed(rows)).items():
            out[name] = {o.name: timed(lambda o=o: getattr(o, field)(*args), "cpu", repeat, warmup=5) for o in ops}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=400, help="timed calls per op at decode rows (/8 at prefill)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("loramux", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cpu_extension.load():
        raise SystemExit("the C++ CPU kernels do not build here (no AVX512-BF16 or no compiler): nothing to compare")
    logger.info("machine: %s; load average %.2f", machine_description("cpu"), os.getloadavg()[0])
    logger.info("settings: bfloat16, batch %d, prompts of %d tokens, %d new tokens, %d rounds", args.batch,
                args.prompt_len, args.new_tokens, args.rounds)

    engines = {}
    with mock.patch.object(engine_module, "select_layer_ops", lambda device, dtype: TORCH_LAYER_OPS):
        engines["torch"] = build_engine("bfloat16", args.batch, args.prompt_len, 16, [])
    engines["cpu"] = build_engine("bfloat16", args.batch, args.prompt_len, 16, [])
    assert [e.layer_ops.name for e in engines.values()] == ["torch", "cpu"]
    shape = engines["cpu"].shape

    ops = [TORCH_LAYER_OPS, cpu_kernel_layer_ops()]
    for rows, repeat in ((args.batch, args.repeat), (args.batch * args.prompt_len, max(1, args.repeat // 8))):
        for name, times in time_ops(shape, rows, ops, repeat).items():
            logger.info("op %-9s %5d rows: torch %8.1f us  cpu %8.1f us  torch/cpu %.2f", name, rows,
                        times["torch"] * 1e6, times["cpu"] * 1e6, times["torch"] / times["cpu"])

    prompts = torch.randint(100, shape.vocab_size - 100, (args.batch, args.prompt_len),
                            generator=torch.Generator().manual_seed(0)).tolist()
    best = {name: [float("inf"), float("inf")] for name in engines}
    for r in range(args.rounds):
        for name, engine in engines.items():
            prefill, decode, _ = run_batch(engine, prompts, [[] for _ in prompts], args.new_tokens)
            best[name] = [min(best[name][0], prefill), min(best[name][1], decode)]
            logger.info("round %d %s: prefill %.1f ms, decode %.2f ms", r, name, prefill * 1e3, decode * 1e3)
    for i, step in enumerate(("prefill", "decode")):
        torch_s, cpu_s = best["torch"][i], best["cpu"][i]
        logger.info("engine %-7s step: torch ops %7.2f ms  cpu ops %7.2f ms  torch/cpu %.3f", step, torch_s * 1e3,
                    cpu_s * 1e3, torch_s / cpu_s)
    logger.info("load average at the end %.2f", os.getloadavg()[0])


if __name__ == "__main__":
    main()
