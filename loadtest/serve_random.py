"""Step 5 of the GPU run: the server on a random-init model with N random adapters, driven by `python -m loadtest`.

    python loadtest/serve_random.py --model DIR --adapters 32 --out OUT -- --concurrency 8 32 --requests 64

Writes N rank-16 adapters on all seven projections, starts `loramux serve`
on them (router off: its embedder package is not on the GPU machine), runs
the load generator with the arguments after `--` (summary.json in
OUT/loadtest, the server's log in OUT/server.log), then stops the server.
Exits non-zero when a request failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from transformers import AutoConfig

from loadtest.bench_common import scratch_dir
from loadtest.server_process import ServerProcess
from loramux.adapters_store.synthetic import write_random_adapter
from loramux.engine.model import ModelShape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="an HF folder (e.g. loadtest/random_model.py's)")
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--kv-gib", type=float, default=4.0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("loadtest_args", nargs=argparse.REMAINDER, help="after --: arguments of python -m loadtest")
    args = parser.parse_args()
    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(args.model))
    folder = scratch_dir("loramux-serve-adapters-")
    for i in range(args.adapters):
        write_random_adapter(folder / f"expert-{i:02d}", shape.lora_target_shapes(), shape.num_layers, args.rank,
                             seed=i)
    args.out.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(["--model", str(args.model), "--device", args.device, "--adapter-dir", str(folder),
                            "--no-router", "--max-loras", str(args.adapters), "--max-lora-rank", str(args.rank),
                            "--kv-cache-memory-gib", str(args.kv_gib)], args.out / "server.log",
                           startup_timeout=300)
    try:
        extra = [a for a in args.loadtest_args if a != "--"]
        run = subprocess.run([sys.executable, "-m", "loadtest", "--url", server.url, "--out",
                              str(args.out / "loadtest"), "--no-plots", *extra])
    finally:
        server.stop()
    summary = args.out / "loadtest" / "summary.json"
    if run.returncode or not summary.is_file():
        sys.exit(run.returncode or 1)
    levels = json.loads(summary.read_text())["levels"]
    incomplete = [lv["level"] for lv in levels if lv["summary"]["completed"] != lv["summary"]["requests"]]
    print(f"server run: {len(levels)} levels; every request completed: {not incomplete}")
    if incomplete:
        sys.exit(f"requests failed at levels {incomplete}")


if __name__ == "__main__":
    main()
