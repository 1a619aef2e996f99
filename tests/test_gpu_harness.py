"""The GPU harness (loadtest/run_gpu.sh and the benchmarks it runs) in its tiny CPU configuration.

The default suite runs the engine and paging benchmarks in-process on a tiny
random model (seconds); the whole script, server step included, runs in its
smoke mode under `-m slow`. The GPU machine runs the same code at real sizes.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def bench(monkeypatch):
    """Import a loadtest/bench_*.py script as its own directory would, and run its main with argv."""
    monkeypatch.syspath_prepend(str(ROOT / "loadtest"))
    levels = {name: logging.getLogger(name).level for name in ("loramux", "transformers", "httpx")}

    def run(script: str, argv: list[str]) -> None:
        module = importlib.import_module(script)
        monkeypatch.setattr(sys, "argv", [script, *argv])
        module.main()

    yield run
    for name, level in levels.items():  # the scripts quieten these loggers; other tests read their logs
        logging.getLogger(name).setLevel(level)


def test_bench_engine_tiny_reports_every_configuration_and_ratio(bench, tmp_path, smollm_tokenizer_dir):
    out = tmp_path / "engine.json"
    bench("bench_engine", ["--config", "tiny", "--tokenizer", str(smollm_tokenizer_dir), "--requests", "2", "3",
                           "--prompt-len", "8", "--new-tokens", "3", "--baseline-new-tokens", "2", "--rounds", "1",
                           "--adapter-files", "2",
                           "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result["tokens_per_s"]) == {f"{kind}@{n}" for kind in ("loramux_mixed", "loramux_shared",
                                                                      "loramux_base", "hf_base") for n in (2, 3)} | {
        "peft_mixed@2"}
    assert all(v > 0 for v in result["tokens_per_s"].values())
    assert {"mixed / base (loramux) @3", "mixed / PEFT mixed @2", "decode step / weight-read time (mixed) @2"} <= set(
        result["ratios"])
    assert result["weight_read_bytes"] > 0 and result["copy_bandwidth_bytes_per_s"] > 0 and result["page_in_ms"] > 0


def test_bench_paging_tiny_reports_ttft_of_cold_and_hot_adapters(bench, tmp_path, smollm_tokenizer_dir):
    out = tmp_path / "paging.json"
    bench("bench_paging", ["--config", "tiny", "--tokenizer", str(smollm_tokenizer_dir), "--adapters", "10",
                           "--ranks", "8", "16", "--gpu-slots", "2", "--requests", "12", "--prompt-len", "8",
                           "--new-tokens", "2", "--adapter-files", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["tokens_per_s"]["paged"] > 0 and result["tokens_per_s"]["resident"] > 0
    assert set(result["ttft_ms"]["paged_cold"]) == {"p50", "p99"}  # 10 adapters, 2 slots: some arrive cold
    assert result["store"]["gpu_evictions"] > 0
    assert result["page_in_ms"]["cpu"] > 0 and result["page_in_ms"]["disk"] > 0


@pytest.mark.slow
def test_run_gpu_sh_smoke_mode_runs_every_step_into_one_file(tmp_path, smollm_tokenizer_dir):
    env = dict(os.environ, LORAMUX_GPU_SMOKE="1", PYTHON=sys.executable)
    run = subprocess.run(["bash", str(ROOT / "loadtest" / "run_gpu.sh"), str(smollm_tokenizer_dir), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=900)
    text = (tmp_path / "gpu_results.txt").read_text()
    assert run.returncode == 0, text[-3000:]
    for step in ("bench_kernels", "bench_engine --config tiny", "bench_paging", "server + python -m loadtest",
                 "bench_composites"):
        assert re.search(rf"^=== {re.escape(step)}[^\n]*: exit 0 after", text, re.MULTILINE), step
    assert "every request completed: True" in text
    assert {"bench_engine_tiny.json", "bench_paging.json", "bench_kernels.json", "bench_composites.json"} <= {
        p.name for p in tmp_path.iterdir()}
