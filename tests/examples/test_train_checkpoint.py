"""Checkpoints: atomic writes (also under SIGKILL), weights_only loading, clear errors for bad files."""

from __future__ import annotations

import argparse
import random
import re
import signal
import subprocess
import textwrap
import time

import numpy as np
import pytest
import torch
from _pipeline import PYTHON, ROOT, subprocess_env
from torch import nn

from segkd_examples import checkpoint as ckpt


def test_round_trip_with_weights_only(tmp_path):
    state = {"format": ckpt.FORMAT, "iteration": 7, "model": {"w": torch.arange(3.0)}, "best": None, "names": ["a"]}
    path = ckpt.save_checkpoint(state, tmp_path / "sub" / "last.pt")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert loaded["iteration"] == 7
    assert torch.equal(loaded["model"]["w"], torch.arange(3.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint({"iteration": 1}, path)

    def broken_save(obj, handle):
        handle.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint({"iteration": 2}, path)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


_WRITER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, "examples")
    from segkd_examples.checkpoint import save_checkpoint
    payload = torch.arange(4_000_000, dtype=torch.float32)  # 16 MB: most of the time is spent writing
    save_checkpoint({"version": 0, "payload": payload}, sys.argv[1])
    print("ready", flush=True)
    version = 0
    while True:
        version += 1
        save_checkpoint({"version": version, "payload": payload + version}, sys.argv[1])
    """
)


def test_sigkill_during_a_write_keeps_a_complete_checkpoint(tmp_path):
    # Kill the writer while a temporary file exists (i.e. mid-write), three times; the checkpoint must load
    # complete each time, and at least one kill must have caught a write in progress (its temp file is left).
    caught_mid_write = 0
    for attempt in range(3):
        folder = tmp_path / str(attempt)
        folder.mkdir()
        path = folder / "last.pt"
        child = subprocess.Popen(
            [PYTHON, "-c", _WRITER, str(path)], cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, text=True
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            deadline = time.monotonic() + 30
            while not list(folder.glob(".last.pt.*.tmp")):
                assert time.monotonic() < deadline, "no write in progress seen"
                time.sleep(0.002)
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        finally:
            child.kill()
        caught_mid_write += bool(list(folder.glob(".last.pt.*.tmp")))
        state = ckpt.load_checkpoint(path)
        assert torch.equal(state["payload"], torch.arange(4_000_000, dtype=torch.float32) + state["version"])
    assert caught_mid_write >= 1


def test_missing_empty_truncated_and_garbage_files(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match=r"resume checkpoint .*nope\.pt does not exist"):
        ckpt.load_checkpoint(tmp_path / "nope.pt", what="resume checkpoint")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match=r"empty\.pt is empty \(0 bytes\)"):
        ckpt.load_checkpoint(empty)
    good = ckpt.save_checkpoint({"w": torch.ones(1000)}, tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1500])
    with pytest.raises(ckpt.CheckpointError, match=r"truncated\.pt \(1500 bytes\) is truncated or corrupt"):
        ckpt.load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ckpt.CheckpointError, match=r"garbage\.pt .*(corrupt|cannot be read)"):
        ckpt.load_checkpoint(garbage)
    not_a_mapping = tmp_path / "list.pt"
    torch.save([torch.ones(1)], not_a_mapping)
    with pytest.raises(ckpt.CheckpointError, match=r"list\.pt holds a list, expected a mapping"):
        ckpt.load_checkpoint(not_a_mapping)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(ckpt.CheckpointError, match=r"evil\.pt holds a pickled Python object \(argparse\.Namespace\)"):
        ckpt.load_checkpoint(path)


def test_strict_load_names_missing_unexpected_and_mismatched_keys(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 5, 1))
    state = dict(model.state_dict())
    state["1.weight"] = torch.zeros(6, 4, 1, 1)  # wrong number of classes
    del state["0.bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_state_dict_strict(model, state, path=tmp_path / "t.pt", what="teacher checkpoint")
    message = str(info.value)
    assert "teacher checkpoint" in message
    assert "t.pt" in message
    assert "1 missing keys (first: 0.bias)" in message
    assert "1 unexpected keys (first: extra.weight)" in message
    assert "1.weight: checkpoint (6, 4, 1, 1) vs model (5, 4, 1, 1)" in message


def test_rng_state_round_trip_through_a_file(tmp_path):
    random.seed(1)
    np.random.seed(2)  # noqa: NPY002 - the global generator is what the checkpoint must restore
    torch.manual_seed(3)
    ckpt.save_checkpoint({"rng": ckpt.capture_rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(2))  # noqa: NPY002
    random.seed(9)
    np.random.seed(9)  # noqa: NPY002
    torch.manual_seed(9)
    ckpt.restore_rng_state(ckpt.load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = (random.random(), np.random.rand(), torch.rand(2))  # noqa: NPY002
    assert got[0] == expected[0]
    assert got[1] == expected[1]
    assert torch.equal(got[2], expected[2])


def test_every_torch_load_in_the_pipeline_uses_weights_only():
    call = re.compile(r"torch\.load\((?:[^()]|\([^()]*\))*\)", re.S)
    offenders = []
    for source in (ROOT / "examples").rglob("*.py"):
        for match in call.finditer(source.read_text()):
            if "weights_only=True" not in match.group(0):
                offenders.append(f"{source.relative_to(ROOT)}: {match.group(0)}")
    assert not offenders, offenders


@pytest.mark.parametrize(
    "content",
    [b"hello world\n", b"abc", b"(a)\n", b"Ghi", b"teacher: deeplabv3_r101\nmiou: 0.77\n" * 20],
    ids=["keyerror-text", "indexerror-text", "indexerror-paren", "struct-error", "yaml-like"],
)
def test_text_and_other_non_checkpoint_files_raise_checkpoint_error(tmp_path, content):
    # Each of these once escaped as KeyError, IndexError ("pop from empty list") or struct.error from the unpickler.
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    with pytest.raises(ckpt.CheckpointError, match=rf"teacher checkpoint .*notes\.txt \({len(content)} bytes\)"):
        ckpt.load_checkpoint(path, what="teacher checkpoint")


def test_a_directory_is_named_as_a_directory(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    expected = r"resume checkpoint .*run is a directory, expected a checkpoint file\.$"
    with pytest.raises(ckpt.CheckpointError, match=expected):
        ckpt.load_checkpoint(run, what="resume checkpoint")
    ckpt.save_checkpoint({"w": torch.ones(1)}, run / "last.pt")
    (run / "best.pt").write_bytes(b"x")
    (run / "config.yaml").write_text("lr: 1\n")
    expected = r"run is a directory, expected a checkpoint file; it holds best\.pt, last\.pt\."
    with pytest.raises(ckpt.CheckpointError, match=expected):
        ckpt.load_checkpoint(run, what="resume checkpoint")
