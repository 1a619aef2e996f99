"""The benchmarks' scratch folders: removed when a run ends, kept (and named) when it fails."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import sys
from loadtest.bench_common import scratch_dir
folder = scratch_dir("loramux-scratch-test-")
(folder / "server.log").write_text("why it failed")
print(folder, flush=True)
if sys.argv[1] == "fail":
    raise RuntimeError("the benchmark failed")
"""


@pytest.mark.parametrize("outcome", ["ok", "fail"])
def test_a_scratch_folder_is_removed_unless_the_run_fails(outcome):
    run = subprocess.run([sys.executable, "-c", SCRIPT, outcome], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    folder = Path(run.stdout.strip())
    assert folder.name.startswith("loramux-scratch-test-")
    try:
        if outcome == "ok":
            assert run.returncode == 0 and not folder.exists()
        else:
            assert run.returncode != 0 and (folder / "server.log").read_text() == "why it failed"
            assert f"kept {folder}" in run.stderr
    finally:
        shutil.rmtree(folder, ignore_errors=True)
