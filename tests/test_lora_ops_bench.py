"""loadtest/bench_kernels.py in its CPU smoke mode: every pool, projection and case is measured and reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_benchmark_smoke_run_reports_every_case(tmp_path):
    out = tmp_path / "kernels.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's loramux, not an installed one
    subprocess.run([sys.executable, "loadtest/bench_kernels.py", "--device", "cpu", "--config", "tiny", "--dtype",
                    "float32", "--slots", "8", "--batches", "3", "--prefill", "2", "16", "--repeat", "1",
                    "--copy-mib", "4", "--json", str(out)], cwd=ROOT, env=env, check=True, timeout=300,
                   capture_output=True)
    report = json.loads(out.read_text())
    assert report["backend"] == "torch" and report["copy_bandwidth_gbs"] > 0
    rows = report["rows"]
    cases = {(r["pool"], r["projection"], r["case"], r["batch"]) for r in rows}
    assert len(cases) == len(rows) == 2 * 4 * 3  # pools x projections x (decode distinct, Zipf, prefill)
    prefill = [r for r in rows if r["case"] == "prefill 2x16"]
    assert all(r["tokens"] == 32 and r["mode"] == "segments" for r in prefill)
    for r in rows:
        assert r["kernel_us"] > 0
        assert abs(r["fraction_of_copy"] - r["bandwidth_gbs"] / report["copy_bandwidth_gbs"]) < 1e-9
    # must-read bytes: distinct adapters at their own rank (mixed pool: 8, 16, 32), x, y read and written
    [one] = [r for r in rows if (r["pool"], r["projection"], r["case"]) == ("mixed", "q/o", "decode distinct")]
    assert one["must_read_bytes"] == ((8 + 16 + 32) * (64 + 64) + 3 * (64 + 2 * 64)) * 4
