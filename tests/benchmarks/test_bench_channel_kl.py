"""benchmarks/bench_channel_kl.py runs on CPU (tiny shape) and writes JSON rows whose losses agree.

A smoke test of the script only: its timings are never asserted (benchmarks are not timed tests).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_channel_kl.py"


def test_bench_channel_kl_cpu_tiny(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--shapes", "tiny", "--dtypes", "fp32"]
    command += ["--impls", "eager,segkd-torch", "--repeats", "1", "--out", str(out)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    measured = {(row["loss"], row["impl"]) for row in rows}
    assert measured == {(loss, impl) for loss in ("cwd", "hwd") for impl in ("eager", "segkd-torch")}, measured
    for row in rows:
        assert row["shape"] == [2, 19, 32, 32]
        assert row["wall_ms"] > 0
        assert row["peak_mib"] >= 0
        # rel_err is each implementation's loss against segkd's: fp32 eager and segkd agree to rounding.
        assert row["rel_err"] < 1e-5, row
