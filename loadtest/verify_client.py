"""Check the load generator's timing against the official openai client's (a benchmark check, not a test).

    .venv/bin/python -m loadtest.verify_client --url http://127.0.0.1:8000

Runs the same seeded closed-loop traffic against a running server, sent by
the load generator's own SSE client (httpx) and by openai's `AsyncOpenAI`
with the same timing points, alternating for --rounds rounds (so that drift
in the machine's speed and warm-up hit both alike), and prints the mean
throughput and p50 TTFT of each and their relative difference (agreement
wanted: within 10%).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

from loadtest.__main__ import main as run_load
from loadtest.bench_common import scratch_dir

logger = logging.getLogger("verify_client")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--output-len", default="32")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = scratch_dir("loramux-verify-")
    summaries: dict[str, list[dict]] = {"httpx": [], "openai": []}
    for round_ in range(args.rounds):
        for client in ("httpx", "openai") if round_ % 2 == 0 else ("openai", "httpx"):
            folder = out / f"{client}-{round_}"
            run_load(["--url", args.url, "--concurrency", str(args.users), "--requests", str(args.requests),
                      "--output-len", args.output_len, "--seed", "0", "--client", client, "--no-plots",
                      "--out", str(folder)])
            summaries[client].append(json.loads((folder / "summary.json").read_text())["levels"][0]["summary"])
    for label, key in (("output tokens/s", lambda s: s["output_tokens_per_s"]),
                       ("p50 TTFT (s)", lambda s: s["ttft_s"]["p50"])):
        ours, theirs = (statistics.mean(key(s) for s in summaries[c]) for c in ("httpx", "openai"))
        difference = ours / theirs - 1
        logger.info("%-16s loadtest %.3f   openai client %.3f   difference %+.1f%%%s", label, ours, theirs,
                    100 * difference, "" if abs(difference) <= 0.10 else "   (over 10%)")


if __name__ == "__main__":
    main()
