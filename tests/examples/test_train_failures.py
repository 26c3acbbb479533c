"""Failed runs: one line (and exit status 1) for errors a user can fix, the traceback for bugs or with --debug."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch
from _pipeline import LAUNCH, PYTHON, ROOT, cli_args, run, subprocess_env, tiny_config, torchrun_cmd

from segkd_examples.checkpoint import CheckpointError
from segkd_examples.config import ConfigError
from segkd_examples.data import DatasetFileError, DatasetRootError
from segkd_examples.failures import debug_requested, is_known_error, one_line
from segkd_examples.metrics import LabelRangeError
from segkd_examples.models import build_model

TRAIN = str(ROOT / "examples" / "train_ddp.py")


def _train_ddp():
    spec = importlib.util.spec_from_file_location("train_ddp", ROOT / "examples" / "train_ddp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _failed_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("[rank ") and " FAILED: " in line]


def _text_teacher(tmp_path, **overrides):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello world\n")
    cfg = tiny_config(tmp_path / "out", method="hwd", teacher_ckpt=str(notes), **overrides)
    return cli_args(cfg)


def test_known_error_prints_one_line_and_exits_1(tmp_path):
    proc = run([PYTHON, TRAIN, *_text_teacher(tmp_path)], timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    (line,) = _failed_lines(proc.stderr)
    assert line.startswith("[rank 0/1] FAILED: CheckpointError: The teacher checkpoint ")
    assert "notes.txt (12 bytes) is not a PyTorch checkpoint" in line
    assert line.endswith("(traceback: --debug or SEGKD_DEBUG=1)")


def test_debug_flag_reraises_a_known_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SEGKD_DEBUG", raising=False)
    with pytest.raises(CheckpointError, match=r"notes\.txt \(12 bytes\) is not a PyTorch checkpoint"):
        _train_ddp().main([*_text_teacher(tmp_path), "--debug"])
    (line,) = _failed_lines(capsys.readouterr().err)
    assert "(traceback: --debug" not in line


def test_debug_environment_variable_shows_the_traceback_of_a_known_error(tmp_path):
    proc = run([PYTHON, TRAIN, *_text_teacher(tmp_path)], timeout=120, env=subprocess_env(SEGKD_DEBUG="1"))
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert "in load_checkpoint\n    raise CheckpointError(" in proc.stderr
    assert "[rank 0/1] FAILED: CheckpointError: The teacher checkpoint" in proc.stderr


def test_unknown_error_keeps_its_traceback(tmp_path):
    cfg = tiny_config(tmp_path / "out")
    proc = run([PYTHON, str(LAUNCH), *cli_args(cfg)], timeout=120, env=subprocess_env(SEGKD_TEST_FAIL_RANK="0"))
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert "[rank 0/1] FAILED: RuntimeError: injected failure on rank 0 at step 0\n" in proc.stderr


def test_known_error_on_two_ranks_prints_one_line_per_rank(tmp_path):
    start = time.monotonic()
    proc = run(torchrun_cmd(2, *_text_teacher(tmp_path)), timeout=180)
    assert proc.returncode != 0
    assert time.monotonic() - start < 150
    lines = _failed_lines(proc.stderr)
    assert sorted(line.split(" FAILED")[0] for line in lines) == ["[rank 0/2]", "[rank 1/2]"]
    assert all("CheckpointError: The teacher checkpoint" in line and "notes.txt" in line for line in lines)
    assert "] Traceback" not in proc.stderr  # no rank printed a traceback (torchrun's launcher prints its own)
    assert "segkd_examples" not in proc.stderr.split("ChildFailedError")[0].replace("FAILED: CheckpointError", "")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"dataset": "cityscapes", "data_root": "{tmp}/citys"}, "DatasetRootError: Expected the Cityscapes images in "),
        ({"method": "hwd", "kd": {"tau": -1.0}}, "ValueError: Expected `tau` to be"),
        ({"method": "hwd", "kd": {"temperature": 4.0}}, "ConfigError: Unknown `kd` parameter(s) ['temperature']"),
        ({"method": "hwd", "teacher_ckpt": "{tmp}"}, "CheckpointError: The teacher checkpoint "),
    ],
    ids=["dataset-root", "loss-value", "kd-key", "directory"],
)
def test_each_known_error_exits_1_with_one_line(tmp_path, capsys, overrides, expected):
    (tmp_path / "citys").mkdir()
    values = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in overrides.items()}
    if values.get("method") == "hwd" and "teacher_ckpt" not in values:
        values["teacher_ckpt"] = str(tmp_path / "teacher.pt")
        torch.save(build_model("tiny_teacher", 8).state_dict(), values["teacher_ckpt"])
    cfg = tiny_config(tmp_path / "out", **values)
    with pytest.raises(SystemExit) as info:
        _train_ddp().main(cli_args(cfg))
    assert info.value.code == 1
    (line,) = _failed_lines(capsys.readouterr().err)
    assert line.startswith(f"[rank 0/1] FAILED: {expected}"), line


def test_known_errors_are_the_pipelines_and_segkds_argument_checks():
    from segkd.losses.hwd import HWDLoss

    for error in (ConfigError("x"), CheckpointError("x"), DatasetRootError("x"), DatasetFileError("x")):
        assert is_known_error(error)
    assert is_known_error(LabelRangeError("x"))
    with pytest.raises(ValueError, match="tau") as from_segkd:
        HWDLoss(tau=-1.0)
    assert is_known_error(from_segkd.value)
    with pytest.raises(ValueError, match="only one of size or scale_factor") as from_torch:
        torch.nn.functional.interpolate(torch.zeros(1, 1, 2, 2), size=(4, 4), scale_factor=2.0)
    with pytest.raises(RuntimeError) as runtime:
        torch.zeros(2, 3) @ torch.zeros(2, 3)
    for error in (from_torch.value, runtime.value, ValueError("raised here"), KeyError("k"), FloatingPointError()):
        assert not is_known_error(error)


def test_debug_requested_by_flag_or_environment(monkeypatch):
    monkeypatch.delenv("SEGKD_DEBUG", raising=False)
    assert not debug_requested(False)
    assert debug_requested(True)
    for value, expected in (("1", True), ("true", True), ("ON", True), ("0", False), ("", False), ("no", False)):
        monkeypatch.setenv("SEGKD_DEBUG", value)
        assert debug_requested(None) is expected


class _BadFiles(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        raise DatasetFileError(f"Cannot decode the image /data/img{index}.png (missing, truncated or corrupt?):\nEOF")


def test_an_error_from_a_data_loader_worker_is_shown_with_its_own_message():
    loader = torch.utils.data.DataLoader(_BadFiles(), batch_size=1, num_workers=1)
    with pytest.raises(DatasetFileError) as info:
        next(iter(loader))
    assert "Original Traceback" in str(info.value)  # torch puts the worker's traceback in the message
    assert is_known_error(info.value)
    assert one_line(info.value) == (
        "DatasetFileError (in DataLoader worker process 0): Cannot decode the image /data/img0.png "
        "(missing, truncated or corrupt?): EOF"
    )
