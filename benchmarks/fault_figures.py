"""Figures of the pipeline's fault tests for docs/reliability.md: faults injected, survived, iterations lost.

Repeats the fault scenarios of tests/examples (the pipeline engineers' tests, whose helpers it imports) with
more injections and prints what each one measured; the tests themselves only assert the bounds. CPU only,
synthetic data, tiny models; about 3-6 minutes on 2 cores.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/fault_figures.py [--kills 10 14 19 22] [--write-kills 10] [--rank-failures 2]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests" / "examples"))

import torch  # noqa: E402
from _pipeline import (  # noqa: E402
    LAUNCH,
    PYTHON,
    cli_args,
    model_state,
    run,
    subprocess_env,
    tiny_config,
    torchrun_cmd,
)
from test_train_checkpoint import _WRITER  # noqa: E402

from segkd_examples import checkpoint as ckpt  # noqa: E402

RUN = {"max_iters": 24, "eval_every": 8, "ckpt_every": 4, "deterministic": True, "synthetic_length": 12}


def sigkill_and_resume(tmp: Path, kill_at: list[int]) -> list[dict[str, object]]:
    """Kill a run with SIGKILL once it logged iteration ``k``, resume it, compare with an uninterrupted run."""
    straight = tiny_config(tmp / "straight", **RUN)
    proc = run([PYTHON, str(LAUNCH), *cli_args(straight)], timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    reference = model_state(tmp / "straight" / "last.pt")
    rows = []
    for k in kill_at:
        out = tmp / f"killed_{k}"
        child = subprocess.Popen(
            [PYTHON, str(LAUNCH), *cli_args(tiny_config(out, **RUN))],
            cwd=ROOT,
            env=subprocess_env(SEGKD_TEST_STEP_SLEEP="0.15"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        seen = 0
        assert child.stdout is not None
        for line in child.stdout:  # "iter 10/24: ..." once per iteration
            if line.startswith("iter ") and "/" in line.split()[1]:
                seen = int(line.split()[1].split("/")[0])
                if seen >= k:
                    child.send_signal(signal.SIGKILL)
                    break
        child.kill()
        child.wait(timeout=60)
        saved = int(ckpt.load_checkpoint(out / "last.pt")["iteration"])
        start = time.monotonic()
        proc = run([PYTHON, str(LAUNCH), *cli_args(tiny_config(out, resume="auto", **RUN))], timeout=300)
        resumed = model_state(out / "last.pt") if proc.returncode == 0 else {}
        same = bool(resumed) and all(torch.equal(reference[key], resumed[key]) for key in reference)
        rows.append(
            {
                "killed_after_iter": seen,
                "exit": child.returncode,
                "checkpoint_iter": saved,
                "iterations_lost": seen - saved,
                "resume_rc": proc.returncode,
                "resume_s": round(time.monotonic() - start, 1),
                "params_bitwise_equal": same,
            }
        )
        print(json.dumps({"sigkill_resume": rows[-1]}), flush=True)
    return rows


def sigkill_during_write(tmp: Path, attempts: int) -> dict[str, int]:
    """Kill a process that rewrites a 16 MB checkpoint in a loop while a temporary file exists."""
    caught = intact = 0
    for attempt in range(attempts):
        folder = tmp / f"write_{attempt}"
        folder.mkdir()
        path = folder / "last.pt"
        child = subprocess.Popen(
            [PYTHON, "-c", _WRITER, str(path)], cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30
        while not list(folder.glob(".last.pt.*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.002)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        caught += bool(list(folder.glob(".last.pt.*.tmp")))
        state = ckpt.load_checkpoint(path)
        intact += bool(torch.equal(state["payload"], torch.arange(4_000_000, dtype=torch.float32) + state["version"]))
    result = {"kills": attempts, "caught_mid_write": caught, "previous_checkpoint_intact": intact}
    print(json.dumps({"sigkill_during_write": result}), flush=True)
    return result


def failing_rank(tmp: Path, repeats: int) -> list[dict[str, object]]:
    """Rank 1 of 2 raises at step 2; time until the whole torchrun job has exited."""
    rows = []
    for repeat in range(repeats):
        cfg = tiny_config(tmp / f"rank_{repeat}", max_iters=50, eval_every=50, dist_timeout=30.0)
        env = subprocess_env(SEGKD_TEST_FAIL_RANK="1", SEGKD_TEST_FAIL_ITER="2")
        start = time.monotonic()
        proc = run(torchrun_cmd(2, *cli_args(cfg)), timeout=300, env=env)
        output = proc.stdout + proc.stderr
        rows.append(
            {
                "exit": proc.returncode,
                "seconds_to_exit": round(time.monotonic() - start, 1),
                "rank_message_shown": "[rank 1/2] FAILED: RuntimeError: injected failure on rank 1 at step 2" in output,
            }
        )
        print(json.dumps({"failing_rank": rows[-1]}), flush=True)
    return rows


def start_up_errors(tmp: Path) -> list[dict[str, object]]:
    """Bad dataset roots and out-of-range label ids: the message each gives and how long until it is given."""
    from segkd_examples import data, engine
    from segkd_examples.distributed import DistInfo
    from segkd_examples.metrics import LabelRangeError

    rows: list[dict[str, object]] = []

    def attempt(name: str, cfg: object, error: type[BaseException]) -> None:
        start = time.monotonic()
        try:
            engine.train(cfg, DistInfo())  # type: ignore[arg-type]
            message, raised = "(no error)", False
        except error as exc:
            message, raised = str(exc), True
        rows.append(
            {"fault": name, "clear_error": raised, "seconds": round(time.monotonic() - start, 2), "message": message}
        )
        print(json.dumps({"start_up": rows[-1]}), flush=True)

    missing = tmp / "no_such_cityscapes"
    attempt(
        "missing dataset root",
        tiny_config(tmp / "o1", dataset="cityscapes", data_root=str(missing)),
        data.DatasetRootError,
    )
    partial = tmp / "cityscapes"
    (partial / "leftImg8bit" / "train").mkdir(parents=True)  # partially extracted: no gtFine, no images
    attempt(
        "partially extracted root",
        tiny_config(tmp / "o2", dataset="cityscapes", data_root=str(partial)),
        data.DatasetRootError,
    )

    real_build = engine.build_datasets

    def corrupt(cfg: object) -> object:
        info, train_set, val_set = real_build(cfg)

        class Stray(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return len(train_set)

            def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
                image, label = train_set[index]
                label = label.clone()
                label[0, :3] = 200  # neither a class id nor 255
                return image, label

        return info, Stray(), val_set

    engine.build_datasets = corrupt
    try:
        attempt("out-of-range label ids", tiny_config(tmp / "o3", max_iters=2), LabelRangeError)
        attempt(
            "out-of-range label ids, label_out_of_range=ignore",
            tiny_config(tmp / "o4", max_iters=2, label_out_of_range="ignore"),
            LabelRangeError,
        )
    finally:
        engine.build_datasets = real_build
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, nargs="*", default=[10, 14, 19, 22], help="iterations to kill after")
    parser.add_argument("--write-kills", type=int, default=10)
    parser.add_argument("--rank-failures", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        start_up_errors(tmp)
        sigkill_during_write(tmp, args.write_kills)
        failing_rank(tmp, args.rank_failures)
        if args.kills:
            sigkill_and_resume(tmp, args.kills)


if __name__ == "__main__":
    main()
