"""examples/bench_pipeline.py runs (tiny models on CPU) and reports both measurements."""

from __future__ import annotations

import importlib.util

from _pipeline import ROOT


def test_bench_pipeline_smoke():
    spec = importlib.util.spec_from_file_location("bench_pipeline", ROOT / "examples" / "bench_pipeline.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--device", "cpu", "--student", "tiny_student", "--teacher", "tiny_teacher", "--size", "32"]
    results = bench.main([*args, "--amp", "none", "--workers", "0", "--classes", "8", "--iters", "2", "--warmup", "1"])
    assert [r["measurement"] for r in results] == ["models", "pipeline+hwd"]
    for r in results:
        assert r["images_per_s"] == r["batch_size"] / r["s_per_step"]
        assert r["images_per_s"] > 0
