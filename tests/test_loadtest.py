"""The load generator: its random traffic, its statistics, and a short run against a real server."""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys

import numpy as np
import pytest

from loadtest.__main__ import main as loadtest_main
from loadtest.report import percentile
from loadtest.traffic import AdapterPopularity, LengthSpec, TrafficSpec, plan_requests, poisson_arrivals
from loramux.adapters_store.synthetic import write_random_adapter
from loadtest.server_process import ServerProcess


def test_poisson_arrivals_have_the_rate_and_exponential_gaps():
    times = poisson_arrivals(4.0, 20_000, random.Random(1))
    gaps = [b - a for a, b in zip([0.0] + times, times)]
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.03)
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, rel=0.05)  # exponential: CV = 1
    assert times == sorted(times)


def test_popularity_generators():
    names = [f"a{i}" for i in range(10)]
    rng = random.Random(2)
    zipf = [AdapterPopularity("zipf", names, alpha=1.0).draw(rng)[0] for _ in range(40_000)]
    counts = {n: zipf.count(n) for n in names}
    harmonic = sum(1 / (i + 1) for i in range(10))
    assert counts["a0"] / len(zipf) == pytest.approx(1 / harmonic, rel=0.05)
    assert counts["a0"] / counts["a1"] == pytest.approx(2.0, rel=0.08)
    uniform = [AdapterPopularity("uniform", names).draw(rng)[0] for _ in range(20_000)]
    assert max(uniform.count(n) for n in names) / min(uniform.count(n) for n in names) < 1.15
    assert {AdapterPopularity("single", names).draw(rng)[0] for _ in range(100)} == {"a0"}
    assert len(set(AdapterPopularity("zipf", names).draw(rng, 2))) == 2


def test_plan_shares_and_lengths():
    spec = TrafficSpec("base", [f"a{i}" for i in range(5)], auto_share=0.2, mixture_share=0.3,
                       prompt_len=LengthSpec(3, 9), output_len=LengthSpec.parse("4:6"))
    planned = plan_requests(spec, 10_000, random.Random(3))
    auto = [p for p in planned if p.body["model"] == "auto"]
    mixtures = [p for p in planned if "adapters" in p.body]
    assert len(auto) / len(planned) == pytest.approx(0.2, abs=0.02)
    assert len(mixtures) / len(planned) == pytest.approx(0.3, abs=0.02)
    assert all(abs(sum(a["weight"] for a in p.body["adapters"]) - 1) < 1e-9 for p in mixtures)
    assert {len(p.body["prompt"].split()) for p in planned} == set(range(3, 10))
    assert {p.body["max_tokens"] for p in planned} == {4, 5, 6}
    assert plan_requests(spec, 50, random.Random(9)) == plan_requests(spec, 50, random.Random(9))


@pytest.mark.parametrize("q", [0, 12.5, 50, 90, 99, 100])
def test_percentile_matches_numpy(q):
    rng = random.Random(4)
    values = [rng.gauss(0, 1) for _ in range(37)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), abs=1e-12)


def test_short_run_against_a_real_server_matches_its_metrics(tiny_llama_dir, tmp_path):
    from loramux.engine.model import ModelShape
    from transformers import AutoConfig

    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(tiny_llama_dir))
    for i in range(4):
        write_random_adapter(tmp_path / "adapters" / f"lt{i}", shape.lora_target_shapes(), shape.num_layers, 8, i)
    server = ServerProcess(["--model", str(tiny_llama_dir), "--served-model-name", "tiny", "--num-kv-blocks", "256",
                            "--adapter-dir", str(tmp_path / "adapters"), "--adapter-store", str(tmp_path / "store")],
                           tmp_path / "server.log")
    try:
        out = tmp_path / "out"
        code = loadtest_main(["--url", server.url, "--concurrency", "3", "--requests", "12", "--warmup", "0",
                              "--output-len", "4", "--prompt-len", "5:10", "--mixture-share", "0.25",
                              "--out", str(out)])
    finally:
        server.stop()
    assert code == 0
    [level] = json.loads((out / "summary.json").read_text())["levels"]
    summary, seen_by_server = level["summary"], level["server"]
    assert summary["completed"] == summary["requests"] == 12 and summary["errors"] == 0
    assert summary["output_tokens"] == 12 * 4
    assert seen_by_server["loramux_requests_total{status=success}"] == 12
    assert seen_by_server["loramux_generation_tokens_total"] == summary["output_tokens"]
    assert summary["ttft_s"]["count"] == 12 and summary["ttft_s"]["p50"] <= summary["e2e_s"]["p50"]
    for name in ("latency_cdf.png", "ttft_hot_cold.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_soak_runs_and_finds_nothing_leaked(tiny_llama_dir, tmp_path):
    """A 30-second soak with the tiny model: exit 0, and its report holds the leak checks it promises."""
    out = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, "-m", "loadtest.soak", "--minutes", "0.5", "--model", str(tiny_llama_dir),
                           "--users", "6", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["server_errors"] == 0 and report["all_slots_probe_completed"]
    assert not any(v for k, v in report["after"].items() if "slots" not in k)
    assert report["outcomes"]["probe 200"] > 10
