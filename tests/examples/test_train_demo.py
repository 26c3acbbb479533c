"""The demo (``make demo``) end to end, with a handful of iterations."""

from __future__ import annotations

import importlib.util

from _pipeline import ROOT


def test_demo_writes_a_table_2_shaped_results_file(tmp_path):
    spec = importlib.util.spec_from_file_location("demo", ROOT / "examples" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    rows = demo.main(["--out", str(tmp_path), "--iters", "2", "--teacher-iters", "2", "--seeds", "0", "1"])
    assert [r["label"] for r in rows] == ["Teacher", "Student (no KD)", "+ CWD", "+ HWD"]
    assert all(len(r["miou"]) == (1 if r["label"] == "Teacher" else 2) for r in rows)
    text = (tmp_path / "results.md").read_text()
    assert "| Method | Model | Params (M) | Iterations | mIoU (%) | vs. no KD | images/s |" in text
    assert "| + HWD | tiny_student |" in text
    assert "does NOT rank HWD against CWD" in text
    for run in ("teacher", "none_seed0", "cwd_seed1", "hwd_seed1"):
        assert (tmp_path / run / "best.pt").is_file()
