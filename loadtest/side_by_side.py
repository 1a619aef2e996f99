"""loramux against a transformers + PEFT server under the same multi-adapter traffic (a benchmark, not a test).

    .venv/bin/python -m loadtest.side_by_side

Creates --adapters random rank-16 adapters (all seven projections) for the
bundled model, starts both servers on free loopback ports, drives each with
the same closed-loop traffic (--users users, Zipf popularity, seeded), and
prints throughput and p99 TTFT of both and their ratios. Target: loramux at
least 5x the baseline's throughput at a lower p99 TTFT.

The same traffic is also sent to loramux with every request on the base
model (no adapter): the ceiling that no LoRA work can beat on this machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from loadtest.bench_common import machine_description, scratch_dir

from loadtest.__main__ import main as run_load
from loramux.adapters_store.synthetic import write_random_adapter
from loramux.engine.loader import load_checkpoint
from loramux.engine.model import ModelShape
from loadtest.server_process import ServerProcess

logger = logging.getLogger("side_by_side")
ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--output-len", default="32")
    parser.add_argument("--prompt-len", default="16:64")
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest" / "results" / "side_by_side")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "loramux"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    checkpoint = load_checkpoint(None)
    shape = ModelShape.from_hf_config(checkpoint.config)
    tmp = scratch_dir("loramux-sbs-")
    for i in range(args.adapters):
        write_random_adapter(tmp / "adapters" / f"sbs{i:02d}", shape.lora_target_shapes(), shape.num_layers, 16, i)
    load = ["--concurrency", str(args.users), "--requests", str(args.requests), "--popularity", "zipf",
            "--output-len", args.output_len, "--prompt-len", args.prompt_len, "--seed", "0", "--warmup", "2"]
    summaries = {}
    loramux = ServerProcess(["--adapter-dir", str(tmp / "adapters"), "--adapter-store", str(tmp / "store"),
                             "--max-loras", str(args.adapters), "--max-lora-rank", "16",
                             "--max-loras-per-batch", str(args.adapters), "--no-experts", "--no-router"],
                            tmp / "loramux.log")
    try:
        run_load(["--url", loramux.url, *load, "--out", str(args.out / "loramux")])
        run_load(["--url", loramux.url, *load, "--adapters", checkpoint.model_id, "--popularity", "single",
                  "--out", str(args.out / "loramux_base_only")])
    finally:
        loramux.stop()
    baseline = BaselineProcess(checkpoint.folder, tmp / "adapters", tmp / "baseline.log", args.users)
    try:
        run_load(["--url", baseline.url, *load, "--out", str(args.out / "baseline")])
    finally:
        baseline.stop()
    for name in ("loramux", "loramux_base_only", "baseline"):
        summaries[name] = json.loads((args.out / name / "summary.json").read_text())["levels"][0]["summary"]

    logger.info("machine: %s", machine_description("cpu"))
    logger.info("traffic: %d users, Zipf over %d rank-16 adapters (all 7 projections), %d requests, prompt %s words, "
                "output %s tokens", args.users, args.adapters, args.requests, args.prompt_len, args.output_len)
    for name, s in summaries.items():
        logger.info("%-17s %8.1f output tokens/s   p99 TTFT %7.2f s   errors %d", name, s["output_tokens_per_s"],
                    s["ttft_s"]["p99"], s["errors"])
    lm, bl = summaries["loramux"], summaries["baseline"]
    logger.info("throughput ratio loramux/baseline %.2fx; p99 TTFT ratio %.2f (lower is better)",
                lm["output_tokens_per_s"] / bl["output_tokens_per_s"], lm["ttft_s"]["p99"] / bl["ttft_s"]["p99"])
    logger.info("ceiling (base model only, no adapter) / baseline: %.2fx",
                summaries["loramux_base_only"]["output_tokens_per_s"] / bl["output_tokens_per_s"])


class BaselineProcess(ServerProcess):
    """loadtest/baseline_server.py as a process on a free port."""

    def __init__(self, model_folder: Path, adapter_dir: Path, log_path: Path, max_batch: int):
        self.launch(lambda port: [sys.executable, str(ROOT / "loadtest" / "baseline_server.py"), "--model",
                                  str(model_folder), "--adapter-dir", str(adapter_dir), "--max-batch", str(max_batch),
                                  "--port", str(port)], log_path, "/v1/models", startup_timeout=300)


if __name__ == "__main__":
    main()
