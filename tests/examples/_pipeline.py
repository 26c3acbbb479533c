"""Helpers shared by the pipeline tests: tiny configs, subprocess launches with timeouts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from segkd_examples.config import TrainConfig, config_from_dict

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LAUNCH = HERE / "_launch.py"
PYTHON = sys.executable


def tiny_config(out: Path, **overrides: Any) -> TrainConfig:
    """A run of tiny models on small synthetic images that takes well under a second per iteration."""
    values: dict[str, Any] = {
        "dataset": "synthetic",
        "synthetic_length": 16,
        "synthetic_val_length": 4,
        "synthetic_size": 32,
        "crop_size": [32, 32],
        "student": "tiny_student",
        "teacher": "tiny_teacher",
        "batch_size": 4,
        "workers": 0,
        "max_iters": 4,
        "eval_every": 2,
        "log_every": 1,
        "lr": 0.05,
        "progress": False,
        "out": str(out),
    }
    values.update(overrides)
    return config_from_dict(values).validate()


def cli_args(cfg: TrainConfig) -> list[str]:
    """``--set key=value`` arguments that reproduce ``cfg`` on the command line."""
    import yaml

    args = ["--no-progress"]
    for key, value in cfg.__dict__.items():
        if value is None or key == "progress":
            continue
        args += ["--set", f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]
    return args


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [
        PYTHON,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "--monitor-interval=0.5",
        str(LAUNCH),
        *args,
    ]


def run(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=ROOT, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def model_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_tensors(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{key} differs"
