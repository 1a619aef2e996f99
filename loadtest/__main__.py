"""Drive a running server with multi-adapter streaming traffic and report latency and throughput.

    python -m loadtest --url http://127.0.0.1:8000 --rate 0.5 1 2 --requests 60
    python -m loadtest --url http://127.0.0.1:8000 --concurrency 1 4 16 --duration 60

Several --rate (Poisson arrivals) or --concurrency (closed-loop users) values
make a sweep: one table row and one plot point per level. Writes summary.json
and PNG plots to --out. Talks to --url only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from tqdm import tqdm

from loadtest.client import mark_cold, run_closed_loop, run_open_loop, send, send_openai
from loadtest.report import SLO, format_table, summarize
from loadtest.server_metrics import scrape, scrape_when_counted, server_view
from loadtest.traffic import LengthSpec, TrafficSpec, plan_requests, poisson_arrivals

logger = logging.getLogger("loadtest")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the server's base URL (the only address contacted)")
    p.add_argument("--api-key", default=None)
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, nargs="+", help="Poisson arrival rate(s), requests/s")
    load.add_argument("--concurrency", type=int, nargs="+", help="closed-loop user count(s)")
    p.add_argument("--requests", type=int, default=100, help="measured requests per level")
    p.add_argument("--duration", type=float, default=300.0, help="stop sending after this many seconds per level")
    p.add_argument("--warmup", type=int, default=2, help="requests sent first and left out of the numbers")
    p.add_argument("--adapters", default=None, help="comma-separated names (default: every adapter the server lists)")
    p.add_argument("--popularity", choices=["uniform", "zipf", "single"], default="zipf")
    p.add_argument("--zipf-alpha", type=float, default=1.0)
    p.add_argument("--auto-share", type=float, default=0.0, help="share of requests with model 'auto'")
    p.add_argument("--mixture-share", type=float, default=0.0, help="share of requests mixing two adapters")
    p.add_argument("--prompt-len", type=LengthSpec.parse, default=LengthSpec(32, 32), help="words: N or LOW:HIGH")
    p.add_argument("--output-len", type=LengthSpec.parse, default=LengthSpec(32, 32), help="tokens: N or LOW:HIGH")
    p.add_argument("--prompts-file", type=Path, help="one prompt per line, sampled instead of synthetic prompts")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="goodput SLO on time to first token, seconds")
    p.add_argument("--slo-tpot", type=float, default=0.5, help="goodput SLO on time per output token, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    p.add_argument("--client", choices=["httpx", "openai"], default="httpx",
                   help="send with raw httpx SSE parsing, or with the official openai client (a cross-check)")
    p.add_argument("--out", type=Path, default=Path("loadtest/results/latest"))
    p.add_argument("--no-plots", action="store_true")
    return p.parse_args(argv)


def traffic_spec(args: argparse.Namespace, client: httpx.Client) -> TrafficSpec:
    models = client.get("/v1/models").raise_for_status().json()["data"]
    base = next(m["id"] for m in models if m.get("parent") is None)
    adapters = args.adapters.split(",") if args.adapters else [m["id"] for m in models if m.get("parent")]
    prompts = [line for line in args.prompts_file.read_text().splitlines() if line.strip()] if args.prompts_file else None
    return TrafficSpec(base_model=base, adapters=adapters, popularity=args.popularity, zipf_alpha=args.zipf_alpha,
                       auto_share=args.auto_share, mixture_share=args.mixture_share, prompt_len=args.prompt_len,
                       output_len=args.output_len, prompts=prompts)


@asynccontextmanager
async def open_client(args):
    """The sending client and its send function, as chosen by --client."""
    if args.client == "openai":
        import openai

        async with openai.AsyncOpenAI(base_url=args.url + "/v1", api_key=args.api_key or "unused",
                                      timeout=args.timeout, max_retries=0) as client:
            yield client, send_openai
        return
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout, limits=limits) as client:
        yield client, send


async def run_level(args, spec: TrafficSpec, rate: float | None, users: int | None, rng: random.Random):
    async with open_client(args) as (client, sender):
        for request in plan_requests(spec, args.warmup, rng):
            await sender(client, request, time.monotonic())
        planned = plan_requests(spec, args.requests, rng)
        with tqdm(total=len(planned), desc=f"rate {rate}/s" if rate else f"{users} users", file=sys.stderr,
                  leave=False) as bar:
            start = time.monotonic()
            if rate is not None:
                results = await run_open_loop(sender, client, planned, poisson_arrivals(rate, len(planned), rng),
                                              args.duration, bar.update)
            else:
                results = await run_closed_loop(sender, client, planned, users, args.duration, bar.update)
            elapsed = time.monotonic() - start
    mark_cold(results)
    return results, elapsed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    rng = random.Random(args.seed)
    slo = SLO(args.slo_ttft, args.slo_tpot)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    levels = [(f"{r:g}/s", r, None) for r in args.rate] if args.rate else [(f"{u} users", None, u)
                                                                             for u in args.concurrency]
    args.out.mkdir(parents=True, exist_ok=True)
    rows, runs, report = [], [], {"settings": {k: str(v) for k, v in vars(args).items()}, "levels": []}
    with httpx.Client(base_url=args.url, headers=headers, timeout=30) as control:
        spec = traffic_spec(args, control)
        logger.info("server %s: base %s, %d adapters; %s popularity", args.url, spec.base_model, len(spec.adapters),
                    args.popularity)
        for label, rate, users in levels:
            before = scrape(control)
            results, elapsed = asyncio.run(run_level(args, spec, rate, users, rng))
            server = server_view(before, scrape_when_counted(control, before, len(results)))
            summary = summarize(results, elapsed, slo)
            rows.append((label, summary))
            runs.append((label, results))
            report["levels"].append({"level": label, "offered": rate or users, "summary": summary, "server": server})
            logger.info("%s: %d/%d completed; server: %s", label, summary["completed"], summary["requests"],
                        ", ".join(f"{k} {v:g}" for k, v in server.items()))
    print(format_table(rows))
    (args.out / "summary.json").write_text(json.dumps(report, indent=2))
    if not args.no_plots:
        from loadtest import plots

        plots.latency_cdfs(runs, args.out / "latency_cdf.png")
        plots.hot_cold_ttft([r for _, results in runs for r in results], args.out / "ttft_hot_cold.png")
        if len(levels) > 1:
            plots.load_curves([lvl["offered"] for lvl in report["levels"]], [s for _, s in rows],
                              "offered load (requests/s)" if args.rate else "concurrent users",
                              args.out / "load_curves.png")
    logger.info("wrote %s", args.out)
    return 0 if all(s["errors"] == 0 for _, s in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
