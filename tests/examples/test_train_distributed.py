"""The pipeline as users launch it: torchrun with two gloo processes, a failing rank, a run killed with SIGKILL.

Every subprocess has a timeout; OMP_NUM_THREADS=1 keeps two processes within a 2-core CI machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from _pipeline import (
    LAUNCH,
    PYTHON,
    ROOT,
    assert_same_tensors,
    cli_args,
    model_state,
    run,
    subprocess_env,
    tiny_config,
    torchrun_cmd,
)

from segkd_examples import checkpoint as ckpt

pytestmark = pytest.mark.skipif(os.name == "nt", reason="torchrun/gloo subprocess tests run on POSIX CI")


def test_torchrun_two_processes_with_evaluation(tmp_path):
    teacher = tmp_path / "teacher"
    proc = run([PYTHON, str(LAUNCH), *cli_args(tiny_config(teacher, train_teacher=True, max_iters=2))], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "hwd"
    cfg = tiny_config(
        out,
        method="hwd",
        kd_weight=3.0,
        kd={"mu": 1.0},
        teacher_ckpt=str(teacher / "best.pt"),
        max_iters=4,
        eval_every=2,
        synthetic_val_length=5,  # odd: the two ranks evaluate 3 and 2 images
    )
    proc = run(torchrun_cmd(2, *cli_args(cfg)), timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["kind"] == "eval"] == [2, 4]
    assert [r["iter"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert all("kd_hwd" in r for r in records if r["kind"] == "train")
    state = ckpt.load_checkpoint(out / "last.pt")
    assert state["world_size"] == 2
    assert len(state["rng"]) == 2  # every rank's generators, for an exact resume
    assert (out / "best.pt").is_file()
    assert "done: best mIoU" in proc.stdout

    # The confusion matrix summed over 2 ranks (3 + 2 images) gives the single-process mIoU, and the one logged.
    best = max((r for r in records if r["kind"] == "eval"), key=lambda r: r["miou"])
    evaluate = str(ROOT / "examples" / "evaluate.py")
    cmd = torchrun_cmd(2, "--checkpoint", str(out / "best.pt"), "--json", str(tmp_path / "two.json"))
    cmd[cmd.index(str(LAUNCH))] = evaluate
    proc = run(cmd, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run(
        [PYTHON, evaluate, "--checkpoint", str(out / "best.pt"), "--json", str(tmp_path / "one.json")], timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    one = json.loads((tmp_path / "one.json").read_text())
    assert two["iou"] == one["iou"]
    assert two["miou"] == pytest.approx(one["miou"], abs=1e-12)
    assert one["miou"] == pytest.approx(best["miou"], abs=1e-12)


def test_a_failing_rank_stops_the_job_with_its_message(tmp_path):
    cfg = tiny_config(tmp_path, max_iters=50, eval_every=50, dist_timeout=30.0)
    env = subprocess_env(SEGKD_TEST_FAIL_RANK="1", SEGKD_TEST_FAIL_ITER="2")
    start = time.monotonic()
    proc = run(torchrun_cmd(2, *cli_args(cfg)), timeout=120, env=env)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "[rank 1/2] FAILED: RuntimeError: injected failure on rank 1 at step 2" in output
    assert elapsed < 90, f"the job took {elapsed:.0f} s to stop"


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    common = {"max_iters": 24, "eval_every": 8, "ckpt_every": 4, "deterministic": True, "synthetic_length": 12}
    straight = tiny_config(tmp_path / "straight", **common)
    proc = run([PYTHON, str(LAUNCH), *cli_args(straight)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    killed = tiny_config(tmp_path / "killed", **common)
    env = subprocess_env(SEGKD_TEST_STEP_SLEEP="0.15")
    child = subprocess.Popen(
        [PYTHON, str(LAUNCH), *cli_args(killed)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = 0
    try:
        deadline = time.monotonic() + 120
        assert child.stdout is not None
        for line in child.stdout:  # "iter 10/24: ..." once per iteration (log_every=1)
            if line.startswith("iter ") and "/" in line.split()[1]:
                seen = int(line.split()[1].split("/")[0])
                if seen >= 10:
                    child.send_signal(signal.SIGKILL)
                    break
            assert time.monotonic() < deadline, "the run did not reach iteration 10 in time"
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    last = ckpt.load_checkpoint(tmp_path / "killed" / "last.pt")
    assert 8 <= last["iteration"] <= seen  # at most ckpt_every (+1 in flight) iterations lost
    assert seen - last["iteration"] <= 4

    resumed = tiny_config(tmp_path / "killed", resume="auto", **common)
    proc = run([PYTHON, str(LAUNCH), *cli_args(resumed)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_tensors(model_state(tmp_path / "straight" / "last.pt"), model_state(tmp_path / "killed" / "last.pt"))


@pytest.mark.parametrize("method", ["mgd", "skd"])
def test_torchrun_losses_with_trainable_parts(tmp_path, method):
    # MGD's generator is in DDP with the student; SKD's discriminator has its own optimiser outside DDP.
    teacher = tmp_path / "teacher"
    size = 512 if method == "skd" else 32  # the SKD discriminator needs logits of at least 64x64
    base = {"synthetic_size": size, "crop_size": [size, size], "synthetic_val_length": 2, "batch_size": 2}
    proc = run(
        [PYTHON, str(LAUNCH), *cli_args(tiny_config(teacher, train_teacher=True, max_iters=1, **base))], timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    kd = {"conv_dim": 8} if method == "skd" else {}
    cfg = tiny_config(
        tmp_path / method,
        method=method,
        kd=kd,
        teacher_ckpt=str(teacher / "best.pt"),
        max_iters=2,
        eval_every=2,
        **base,
    )
    disc_dir = tmp_path / "disc"
    disc_dir.mkdir()
    proc = run(torchrun_cmd(2, *cli_args(cfg)), timeout=180, env=subprocess_env(SEGKD_TEST_DISC_DIR=str(disc_dir)))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    if method == "skd":
        # Outside DDP the discriminator is broadcast from rank 0 at start and all-reduced after: equal on both ranks.
        rank0, rank1 = (torch.load(disc_dir / f"rank{r}.pt", weights_only=True) for r in (0, 1))
        assert_same_tensors(rank0, rank1)
    state = ckpt.load_checkpoint(tmp_path / method / "last.pt")
    assert state["world_size"] == 2
    assert any(k.startswith("loss.") for k in state["distiller"])
    records = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert all(f"kd_{method}" in r for r in train)
    if method == "skd":
        assert state["disc_optimizer"]["state"]  # the discriminator took Adam steps
        assert all("disc" in r for r in train)
