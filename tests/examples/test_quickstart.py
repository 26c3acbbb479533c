"""examples/quickstart.py (the minimal HWD example without the pipeline) runs end to end and prints its table."""

import os
import subprocess
import sys
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"


def test_quickstart_runs_and_prints_both_students() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--teacher-iters", "4", "--student-iters", "3", "--seeds", "1", "--size", "16"]
    result = subprocess.run(
        [sys.executable, str(QUICKSTART), *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = [line for line in lines if line.startswith("| student")]
    assert len(rows) == 2, result.stdout
    for row in rows:
        miou = float(row.split("|")[2])
        assert 0.0 <= miou <= 100.0
