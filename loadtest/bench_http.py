"""What the HTTP path costs over the engine alone (a benchmark, not a test).

    .venv/bin/python -m loadtest.bench_http --json loadtest/results/bench_http_cpu.json

One workload, measured three ways in one run, rounds interleaved (the CPU is shared):
  engine   `Engine.step` in a loop in this process: the reference
  async    the same engine behind `AsyncEngine` in this process, one asyncio consumer per request
           (the engine thread and its hand-offs to the event loop, no HTTP)
  http     `loramux serve` as a real process (uvicorn), 32 concurrent streaming clients in this process
The engine is built and stepped on the `AsyncEngine` thread, as `loramux serve` does it (one OpenMP team in
the process, see AsyncEngine.for_serving): the `engine` row runs its step loop there as one engine-thread call.
Default workload: the bundled SmolLM2-135M on the CPU, 32 concurrent requests, each naming its own
random rank-16 adapter on all seven projections (`--base` for no adapter), 128-token prompts (random
token ids, sent as ids over HTTP), 64 new tokens, greedy, EOS ignored, streamed with usage.
Both engines are built from the same `serve` arguments. Tokens/s counts generated tokens from the first
request sent to the last token received. For the HTTP rows the CPU seconds of the client (this process)
and of the server process are reported too: the client shares the machine's cores with the server.
Every row also counts the engine steps and the seconds spent inside them (the server's from its /metrics),
which splits a path's cost over the engine alone into more steps (requests joining the batch over several
steps), slower steps (contention with the path's other threads) and time outside the steps. The voluntary
context switches per step of the process that steps the engine (all its threads) show waiting: a thread
that waits for the GIL (or a lock) blocks and switches, so threads taking turns on the GIL inside every
step would show as hundreds or thousands per step where the engine alone shows a handful. The event loop's
CPU seconds (the main thread of this process for `async`, of the server for `http`), also per generated
token, bound what that thread's Python work can take from the engine thread: the two share one GIL; its own
switches per step (`loop sw/step`) say how much of the process's waiting is the loop's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from loadtest.bench_common import machine_description, scratch_dir
from loadtest.client import send
from loadtest.server_metrics import scrape
from loadtest.server_process import ServerProcess
from loadtest.traffic import PlannedRequest
from loramux.adapters_store.synthetic import write_random_adapter
from loramux.cli import build_parser, engine_config_from_args
from loramux.engine import Engine, SamplingParams
from loramux.engine.async_engine import AsyncEngine
from loramux.engine.loader import load_checkpoint
from loramux.engine.model import ModelShape

logger = logging.getLogger("bench_http")
STEP_COUNT, STEP_SECONDS = "loramux_step_duration_seconds_count", "loramux_step_duration_seconds_sum"
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Steps:
    """The engine steps of one run: how many, and the seconds spent inside them."""

    count: int = 0
    seconds: float = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.seconds += seconds


@dataclass
class Measurement:
    tokens_per_s: float
    wall_s: float  # first request sent to last token received
    steps: int  # engine steps taken
    step_s: float  # seconds inside those steps
    switches_per_step: float  # voluntary context switches of the stepping process (all threads) per step
    loop_switches_per_step: float | None  # those of its event-loop thread (its main thread; None: no loop)
    loop_cpu_s: float | None  # CPU seconds of the event-loop thread beside the engine thread (None: no loop)
    client_cpu_s: float  # this process's CPU seconds during the run
    server_cpu_s: float | None = None  # the server process's, for the HTTP row
    load_average: float = 0.0  # 1-minute load average at the end of the run


def process_cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process, all its threads, or of its thread `tid` (Linux /proc)."""
    stat = Path(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def voluntary_switches(pid: int, tid: int | None = None) -> int:
    """Voluntary context switches of every thread of a process so far, or of its thread `tid` (Linux /proc):
    each is a wait that blocked."""
    total = 0
    for task in [Path(f"/proc/{pid}/task/{tid}")] if tid else Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        total += int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])
    return total


def run_engine(engine: Engine, prompts: list[list[int]], models: list[str | None], new_tokens: int,
               steps: Steps) -> float:
    """Every request at once, `Engine.step` until all are done -> wall seconds."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    batch = uuid.uuid4().hex
    start = time.perf_counter()
    for i, (prompt, model) in enumerate(zip(prompts, models)):
        engine.add_request(f"direct-{batch}-{i}", prompt, params, [model] if model else [])
    produced = 0
    while engine.has_unfinished_requests():
        step_start = time.perf_counter()
        outputs = engine.step()
        steps.add(time.perf_counter() - step_start)
        produced += sum(len(out.new_token_ids) for out in outputs)
    elapsed = time.perf_counter() - start
    assert produced == len(prompts) * new_tokens, produced
    return elapsed


async def run_async_engine(async_engine: AsyncEngine, prompts: list[list[int]], models: list[str | None],
                           new_tokens: int, steps: Steps) -> float:
    """Every request submitted to `async_engine`, one consumer task each -> wall seconds."""
    async_engine.step_listeners.append(steps.add)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    batch = uuid.uuid4().hex

    async def one(i: int) -> int:
        stream = await async_engine.submit(f"async-{batch}-{i}", prompts[i], params, [models[i]] if models[i] else [])
        return sum([len(out.new_token_ids) async for out in stream])

    try:
        start = time.perf_counter()
        produced = sum(await asyncio.gather(*(one(i) for i in range(len(prompts)))))
        elapsed = time.perf_counter() - start
    finally:
        async_engine.step_listeners.remove(steps.add)
    assert produced == len(prompts) * new_tokens, produced
    return elapsed


async def run_http(url: str, prompts: list[list[int]], models: list[str], new_tokens: int, steps: Steps) -> float:
    """One streaming completion per prompt, all at once, over one connection each -> wall seconds.

    The server's steps come from its /metrics, scraped before and after."""
    planned = [PlannedRequest({"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
                               "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}},
                              (model,)) for prompt, model in zip(prompts, models)]
    limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=len(prompts))
    with httpx.Client(base_url=url, timeout=60) as metrics_client:
        before = scrape(metrics_client)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            start = time.perf_counter()
            results = await asyncio.gather(*(send(client, p, time.monotonic()) for p in planned))
            elapsed = time.perf_counter() - start
        after = scrape(metrics_client)
    steps.count += round(after[STEP_COUNT] - before[STEP_COUNT])
    steps.seconds += after[STEP_SECONDS] - before[STEP_SECONDS]
    errors = [r.error for r in results if r.error]
    assert not errors, errors[:3]
    produced = sum(r.output_tokens for r in results)
    assert produced == len(prompts) * new_tokens, produced
    return elapsed


def measured(run, tokens: int, server_pid: int | None = None, event_loop: bool = True) -> Measurement:
    """Run `run(steps)` (-> wall seconds) and take its steps and the CPU seconds spent meanwhile.

    `event_loop`: the stepping process's main thread runs an event loop beside the engine thread."""
    steps = Steps()
    stepping_pid = server_pid or os.getpid()
    cpu, server_cpu = time.process_time(), server_pid and process_cpu_seconds(server_pid)
    loop_cpu, switches = process_cpu_seconds(stepping_pid, stepping_pid), voluntary_switches(stepping_pid)
    loop_switches = voluntary_switches(stepping_pid, stepping_pid)
    wall = run(steps)
    switches = voluntary_switches(stepping_pid) - switches
    loop_switches = voluntary_switches(stepping_pid, stepping_pid) - loop_switches
    loop_cpu = process_cpu_seconds(stepping_pid, stepping_pid) - loop_cpu if event_loop else None
    per_step = max(steps.count, 1)
    return Measurement(tokens / wall, wall, steps.count, steps.seconds, switches / per_step,
                       loop_switches / per_step if event_loop else None, loop_cpu,
                       time.process_time() - cpu, server_pid and process_cpu_seconds(server_pid) - server_cpu,
                       os.getloadavg()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32, help="concurrent requests (and HTTP clients)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--base", action="store_true", help="every request on the base model (no adapter)")
    parser.add_argument("--rounds", type=int, default=2, help="repeat every configuration; report the best")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--reference-tree", type=Path, metavar="DIR",
                        help="also serve the workload from the loramux package in DIR (e.g. `git archive` of the "
                             "commit before a change), interleaved with the rest: row 'http@ref'")
    parser.add_argument("--py-spy", type=Path, metavar="PREFIX",
                        help="sample each server process with py-spy through all rounds (idle threads left out) and "
                             "write its collapsed stacks to PREFIX.<row>.txt; the sampling takes CPU from the "
                             "servers, so a profiled run's numbers are not the ones to report")
    parser.add_argument("--plot", default="", help="a PNG of tokens/s by path here ('' for none)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("loramux", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    n = args.requests
    tmp = scratch_dir("loramux-bench-http-")
    shape = ModelShape.from_hf_config(load_checkpoint(None).config)
    names = [f"http{i:02d}" for i in range(n)]
    for i, name in enumerate(names):
        write_random_adapter(tmp / "adapters" / name, shape.lora_target_shapes(), shape.num_layers, args.rank, i)
    serve_args = ["--adapter-dir", str(tmp / "adapters"), "--max-loras", str(n), "--max-lora-rank", str(args.rank),
                  "--max-loras-per-batch", str(n), "--max-num-seqs", str(max(64, n)), "--no-experts", "--no-router"]

    machine = machine_description("cpu")  # before for_serving sets this thread's torch to one thread
    async_engine = AsyncEngine.for_serving(engine_config_from_args(build_parser().parse_args(
        ["serve", *serve_args, "--adapter-store", str(tmp / "store-direct")])))
    engine = async_engine.engine

    def run_engine_on_its_thread(models_: list[str | None], new_tokens: int, steps: Steps) -> float:
        return loop.run_until_complete(async_engine.call(
            lambda e: run_engine(e, prompts, models_, new_tokens, steps)))
    trees = {"http": None} | ({"http@ref": args.reference_tree.resolve()} if args.reference_tree else {})
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, shape.vocab_size - 100, (n, args.prompt_len), generator=g).tolist()
    models = [engine.model_id] * n if args.base else names
    direct_models = [None if args.base else m for m in models]
    loop = asyncio.new_event_loop()
    servers: dict[str, ServerProcess] = {}
    profilers = []
    try:
        for key, tree in trees.items():  # one at a time, inside the try: a failed start stops those already up
            servers[key] = ServerProcess([*serve_args, "--adapter-store", str(tmp / f"store-{key}")],
                                         tmp / f"{key}.log", startup_timeout=900, cwd=tree)
        # Warm-up: every adapter paged in on every side, each server's first requests served.
        run_engine_on_its_thread(direct_models, 2, Steps())
        for server in servers.values():
            loop.run_until_complete(run_http(server.url, prompts, models, 2, Steps()))
        runs = {"engine": (lambda steps: run_engine_on_its_thread(direct_models, args.new_tokens, steps), None),
                "async": (lambda steps: loop.run_until_complete(run_async_engine(
                    async_engine, prompts, direct_models, args.new_tokens, steps)), None)}
        for key, server in servers.items():
            runs[key] = (lambda steps, url=server.url: loop.run_until_complete(
                run_http(url, prompts, models, args.new_tokens, steps)), server.proc.pid)
        if args.py_spy:
            profilers = [subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                                           str(server.proc.pid), "--threads", "--nonblocking", "--rate", "50",
                                           "--format", "raw",
                                           "--output", f"{args.py_spy}.{key}.txt"], stdout=subprocess.DEVNULL)
                         for key, server in servers.items()]
        results: dict[str, list[Measurement]] = {key: [] for key in runs}
        for _ in range(args.rounds):
            for key, (run, server_pid) in runs.items():
                results[key].append(measured(run, n * args.new_tokens, server_pid, event_loop=key != "engine"))
    finally:
        for profiler in profilers:
            profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            profiler.wait()
        loop.close()
        async_engine.shutdown()
        for server in servers.values():
            server.stop()

    logger.info("machine: %s; load average (1, 5, 15 min) at the end %s", machine,
                " ".join(f"{v:.2f}" for v in os.getloadavg()))
    logger.info("settings: %s, %d concurrent streaming requests, %s, %d-token prompts, %d new tokens, greedy%s",
                engine.model_id, n, "base model only" if args.base else f"each its own rank-{args.rank} adapter "
                "(all 7 projections)", args.prompt_len, args.new_tokens,
                f"; http@ref serves {args.reference_tree}" if args.reference_tree else "")
    tokens = n * args.new_tokens
    logger.info("%-9s %10s %10s %7s %7s %9s %10s %14s %13s %11s %12s %13s %13s %7s", "path", "tokens/s", "best",
                "wall s", "steps", "step s", "outside s", "switches/step", "loop sw/step", "loop CPU s",
                "loop us/tok", "client CPU s", "server CPU s", "load")
    for key, rows in results.items():
        for m in rows:
            loop_columns = (["", "", ""] if m.loop_cpu_s is None else
                    [f"{m.loop_switches_per_step:.1f}", f"{m.loop_cpu_s:.2f}", f"{m.loop_cpu_s / tokens * 1e6:.0f}"])
            logger.info("%-9s %10.1f %10s %7.2f %7d %9.2f %10.2f %14.1f %13s %11s %12s %13.2f %13s %7.2f", key,
                        m.tokens_per_s, "", m.wall_s, m.steps, m.step_s, m.wall_s - m.step_s, m.switches_per_step,
                        *loop_columns, m.client_cpu_s, "" if m.server_cpu_s is None else f"{m.server_cpu_s:.2f}",
                        m.load_average)
        logger.info("%-9s %10s %10.1f", key, "", max(m.tokens_per_s for m in rows))
    best = {key: max(m.tokens_per_s for m in rows) for key, rows in results.items()}
    ratios = {f"{key} / engine": best[key] / best["engine"] for key in best if key != "engine"}
    for key, value in ratios.items():
        logger.info("%-18s %6.3fx  (best of %d interleaved rounds; target http / engine >= 0.9)", key, value,
                    args.rounds)
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps({
            "machine": machine, "load_average_end": os.getloadavg(), "settings": settings,
            "runs": {key: [vars(m) for m in rows] for key, rows in results.items()}, "best_tokens_per_s": best,
            "ratios": ratios}, indent=2))
    if args.plot:
        from loadtest.plots import path_throughput

        path_throughput({key: [vars(m) for m in rows] for key, rows in results.items()}, Path(args.plot))


if __name__ == "__main__":
    main()
