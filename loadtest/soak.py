"""Soak: minutes of mixed traffic against one server, then a check that nothing leaked and latency stayed flat.

    python -m loadtest.soak --minutes 10 --out loadtest/results/soak.json

Starts its own server on a loopback port (the bundled model unless --model) with 4 adapter slots,
12 random adapters registered and 4 spare ones that an admin user uploads and deletes again and again.
Closed-loop users send streamed and plain completions, chats and mixtures, abort streams part-way,
disconnect before answers arrive, send bad requests and delete adapters that may be in use.

Afterwards, read from /metrics: no running, waiting or admitted request, no KV block in use; a probe that
needs every slot at once completes (a leaked slot would make it wait forever). The p99 end-to-end latency of
the fixed-size probe requests is reported per minute; "flat" means no minute's p99 exceeds twice the median
minute's. Exit status 0 only if every check holds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

from loadtest.server_process import ServerProcess
from loadtest.server_metrics import scrape

logger = logging.getLogger("loadtest.soak")

PROBE_TOKENS = 16  # the requests whose latency is tracked all ask for this many tokens
REGISTERED, SPARE = 12, 4  # adapters registered at start-up, and uploaded/deleted during the run
FLAT_FACTOR = 2.0


@dataclass
class Outcome:
    at: float  # seconds since the soak began
    kind: str
    status: int  # HTTP status; 0: the client gave up on purpose (abort, disconnect)
    seconds: float


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--model", default=None, help="HF folder (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--users", type=int, default=12, help="closed-loop users")
    p.add_argument("--slots", type=int, default=4, help="--max-loras of the server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("loadtest/results/soak.json"))
    return p.parse_args(argv)


def write_adapters(model: str | None, folder: Path, count: int) -> list[Path]:
    from loramux.adapters_store.synthetic import write_random_adapter
    from loramux.engine.loader import load_checkpoint
    from loramux.engine.model import ModelShape

    shape = ModelShape.from_hf_config(load_checkpoint(model).config)
    return [write_random_adapter(folder / f"soak{i:02d}", shape.lora_target_shapes(), shape.num_layers,
                                 rank=8, seed=i, b_std=0.05) for i in range(count)]


class Soak:
    def __init__(self, url: str, adapters: list[Path], users: int, seconds: float, rng: random.Random):
        self.url = url
        self.registered = [p.name for p in adapters[:REGISTERED]]
        self.spare = adapters[REGISTERED:]
        self.users = users
        self.seconds = seconds
        self.rng = rng
        self.outcomes: list[Outcome] = []
        self.start = 0.0

    def live(self) -> list[str]:
        return list(self.registered)

    async def run(self) -> None:
        self.start = time.monotonic()
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=self.url, timeout=120, limits=limits) as client:
            await asyncio.gather(*(self.user(client) for _ in range(self.users)), self.admin(client))

    def done(self) -> bool:
        return time.monotonic() - self.start >= self.seconds

    def record(self, kind: str, status: int, began: float) -> None:
        self.outcomes.append(Outcome(began - self.start, kind, status, time.monotonic() - began))

    async def user(self, client: httpx.AsyncClient) -> None:
        actions = [(self.probe, 40), (self.chat, 12), (self.mixture, 10), (self.abort_stream, 12),
                   (self.disconnect, 8), (self.bad_request, 8), (self.delete_in_use, 2)]
        while not self.done():
            action = self.rng.choices([a for a, _ in actions], [w for _, w in actions])[0]
            await action(client)

    def prompt(self) -> str:
        return " ".join(self.rng.choice(["alpha", "river", "stone", "cloud", "seven", "quiet", "metal", "song"])
                        for _ in range(self.rng.randint(4, 40)))

    async def probe(self, client: httpx.AsyncClient) -> None:
        """A streamed completion of PROBE_TOKENS tokens on a random adapter (or the base model): the tracked latency."""
        model = self.rng.choice(self.live() + ["base"])
        body = {"model": model, "prompt": self.prompt(), "max_tokens": PROBE_TOKENS, "ignore_eos": True,
                "stream": True, "temperature": 0.7}
        began = time.monotonic()
        async with client.stream("POST", "/v1/completions", json=body) as r:
            text = [line async for line in r.aiter_lines() if line]
        ok = r.status_code == 200 and text[-1] == "data: [DONE]" and not any('"error"' in t[:20] for t in text)
        self.record("probe", r.status_code if ok or r.status_code != 200 else 500, began)

    async def chat(self, client: httpx.AsyncClient) -> None:
        began = time.monotonic()
        r = await client.post("/v1/chat/completions", json={
            "model": self.rng.choice(self.live()), "max_tokens": self.rng.randint(4, 24),
            "messages": [{"role": "user", "content": self.prompt()}], "n": self.rng.choice([1, 1, 2])})
        self.record("chat", r.status_code, began)

    async def mixture(self, client: httpx.AsyncClient) -> None:
        a, b = self.rng.sample(self.live(), 2)
        began = time.monotonic()
        r = await client.post("/v1/completions", json={
            "model": "base", "prompt": self.prompt(), "max_tokens": 12,
            "adapters": [{"name": a, "weight": 0.6}, {"name": b, "weight": 0.4, "rank_hi": 4}]})
        self.record("mixture", r.status_code, began)

    async def abort_stream(self, client: httpx.AsyncClient) -> None:
        """Read a few chunks of a long stream, then hang up."""
        began = time.monotonic()
        body = {"model": self.rng.choice(self.live()), "prompt": self.prompt(), "max_tokens": 200,
                "ignore_eos": True, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code == 200:
                wanted = self.rng.randint(1, 6)
                async for line in r.aiter_lines():
                    wanted -= bool(line)
                    if wanted <= 0:
                        break
        self.record("abort", 0 if r.status_code == 200 else r.status_code, began)

    async def disconnect(self, client: httpx.AsyncClient) -> None:
        """A plain completion the client stops waiting for."""
        began = time.monotonic()
        try:
            r = await client.post("/v1/completions", timeout=self.rng.uniform(0.05, 0.5), json={
                "model": self.rng.choice(self.live()), "prompt": self.prompt(), "max_tokens": 120,
                "ignore_eos": True})
            self.record("disconnect", r.status_code, began)
        except httpx.TimeoutException:
            self.record("disconnect", 0, began)

    async def bad_request(self, client: httpx.AsyncClient) -> None:
        bodies = [{"model": "base", "prompt": "x", "seed": 2**64}, {"model": "no-such", "prompt": "x"},
                  {"model": "base", "prompt": "x", "adapters": [{"name": self.registered[0], "weight": 1e999}]},
                  {"model": "base", "prompt": "x", "stop": ["a"] * 5}, {"model": "base", "prompt": ""}]
        began = time.monotonic()
        r = await client.post("/v1/completions", content=json.dumps(self.rng.choice(bodies)),
                              headers={"content-type": "application/json"})
        self.record("bad", r.status_code, began)

    async def delete_in_use(self, client: httpx.AsyncClient) -> None:
        """Delete an uploaded adapter while users may be sending to it (409 in use, 404 gone, or 200)."""
        uploaded = [n for n in self.registered if n.startswith("up-")]
        if not uploaded:
            return
        name = self.rng.choice(uploaded)
        began = time.monotonic()
        r = await client.delete(f"/v1/adapters/{name}")
        if r.status_code == 200 and name in self.registered:
            self.registered.remove(name)
        self.record("delete", r.status_code, began)

    async def admin(self, client: httpx.AsyncClient) -> None:
        """Upload the spare adapters one by one and delete them again, over and over."""
        round_ = 0
        while not self.done():
            folder = self.spare[round_ % len(self.spare)]
            name = f"up-{folder.name}-{round_}"
            files = {f: (f, (folder / f).read_bytes()) for f in ("adapter_config.json", "adapter_model.safetensors")}
            began = time.monotonic()
            r = await client.post("/v1/adapters", files=files, data={"name": name})
            self.record("upload", r.status_code, began)
            if r.status_code == 201:
                self.registered.append(name)
            await asyncio.sleep(2.0)
            uploaded = [n for n in self.registered if n.startswith("up-")]
            if len(uploaded) > SPARE - 1:  # keep at most 16 adapters registered
                victim = uploaded[0]
                self.registered.remove(victim)  # stop sending to it first, then delete
                await asyncio.sleep(1.0)
                began = time.monotonic()
                r = await client.delete(f"/v1/adapters/{victim}")
                if r.status_code == 409:  # still in use: a later round retries
                    self.registered.append(victim)
                self.record("delete", r.status_code, began)
            round_ += 1


def windows(outcomes: list[Outcome], minute: float = 60.0) -> list[dict]:
    """p50/p99 of successful probe latencies per minute."""
    rows = []
    for w in range(int(max(o.at for o in outcomes) // minute) + 1):
        lat = sorted(o.seconds for o in outcomes if o.kind == "probe" and o.status == 200 and
                     w * minute <= o.at < (w + 1) * minute)
        if len(lat) >= 10:
            rows.append({"minute": w + 1, "probes": len(lat), "p50": lat[len(lat) // 2],
                         "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))]})
    return rows


async def all_slots_probe(url: str, names: list[str]) -> bool:
    """Requests for as many distinct adapters as there are slots, at once: all must finish."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        results = await asyncio.gather(*(client.post("/v1/completions", json={
            "model": n, "prompt": "slot probe", "max_tokens": 8}) for n in names))
    return all(r.status_code == 200 for r in results)


def quiet_metrics(url: str) -> dict:
    with httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(100):
            m = scrape(c)
            if not any(m.get(k) for k in ("loramux_requests_running", "loramux_requests_waiting",
                                          "loramux_requests_admitted", "loramux_kv_blocks_used")):
                break
            time.sleep(0.2)
    return m


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="loramux-soak-") as tmp_name:
        tmp = Path(tmp_name)
        adapters = write_adapters(args.model, tmp / "adapters", REGISTERED + SPARE)
        serving = tmp / "serving"
        serving.mkdir()
        for folder in adapters[:REGISTERED]:
            (serving / folder.name).symlink_to(folder)
        server_args = ["--served-model-name", "base", "--no-router", "--no-experts", "--adapter-dir", str(serving),
                       "--adapter-store", str(tmp / "store"), "--max-loras", str(args.slots),
                       "--max-loras-per-batch", str(args.slots), "--max-cpu-loras", "8", "--max-num-seqs", "32",
                       "--max-concurrent-requests", "64"]
        if args.model:
            server_args = ["--model", args.model, *server_args]
        server = ServerProcess(server_args, tmp / "server.log", startup_timeout=600)
        try:
            soak = Soak(server.url, adapters, args.users, args.minutes * 60, rng)
            logger.info("soak: %s for %.1f min, %d users, %d slots, %d+%d adapters", server.url, args.minutes,
                        args.users, args.slots, REGISTERED, SPARE)
            asyncio.run(soak.run())
            metrics = quiet_metrics(server.url)
            slots_ok = asyncio.run(all_slots_probe(server.url, soak.registered[:args.slots]))
            after_probe = quiet_metrics(server.url)
        finally:
            server.stop()
            log = (tmp / "server.log").read_text()
    counts = Counter((o.kind, o.status) for o in soak.outcomes)
    server_errors = sum(n for (kind, status), n in counts.items() if status >= 500)
    per_minute = windows(soak.outcomes)
    p99s = [w["p99"] for w in per_minute]
    median_p99 = statistics.median(p99s) if p99s else float("nan")
    flat = bool(p99s) and max(p99s) <= FLAT_FACTOR * median_p99
    leaks = {k: after_probe.get(k, 0) for k in ("loramux_requests_running", "loramux_requests_waiting",
                                                "loramux_requests_admitted", "loramux_kv_blocks_used")}
    report = {
        "minutes": args.minutes, "users": args.users, "slots": args.slots, "adapters": REGISTERED + SPARE,
        "outcomes": {f"{k} {s}": n for (k, s), n in sorted(counts.items())}, "server_errors": server_errors,
        "per_minute": per_minute, "median_minute_p99": median_p99, "flat": flat,
        "after": leaks | {"loramux_gpu_adapter_slots_used": metrics.get("loramux_gpu_adapter_slots_used"),
                          "loramux_gpu_adapter_slots_total": metrics.get("loramux_gpu_adapter_slots_total")},
        "all_slots_probe_completed": slots_ok, "tracebacks_in_log": log.count("Traceback"),
        "server_requests": {k: v for k, v in metrics.items() if k.startswith("loramux_requests_total")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    ok = (server_errors == 0 and flat and slots_ok and not any(leaks.values())
          and report["tracebacks_in_log"] == 0)
    logger.info("soak %s; wrote %s", "passed" if ok else "FAILED", args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
