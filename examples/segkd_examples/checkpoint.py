"""Training checkpoints: atomic writes, safe loading, exact RNG state.

A checkpoint holds only tensors and plain Python values (dict, list, int, float, str, bool, None), so it
loads with ``torch.load(..., weights_only=True)``: a downloaded file cannot run code. It is written to a
temporary file in the same folder, flushed and fsynced, then renamed over the old one (``os.replace`` is
atomic on POSIX and Windows), so a crash or a ``kill -9`` during the write leaves the previous checkpoint
intact.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "FORMAT",
    "CheckpointError",
    "capture_rng_state",
    "load_checkpoint",
    "load_state_dict_strict",
    "restore_rng_state",
    "save_checkpoint",
]

FORMAT = "segkd-train-v1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and says why."""


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` to ``path`` atomically.

    The data goes to a temporary file next to ``path``, which is flushed, fsynced and then renamed
    over ``path``; the folder is fsynced too so that the rename survives a power cut. A failure at any
    point leaves ``path`` as it was.

    Args:
        state: tensors and plain values only.
        path: destination; its folder is created if missing.

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(dict(state), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return path
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str | os.PathLike[str], *, what: str = "checkpoint") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True, map_location="cpu")``.

    Args:
        path: the file.
        what: what the file is meant to be, for messages ("resume checkpoint", "teacher checkpoint").

    Returns:
        The loaded mapping.

    Raises:
        CheckpointError: missing, empty, truncated, corrupt or unreadable file (text or any other data that is
            not a checkpoint), a directory, a file that needs pickled Python objects (refused because loading it
            could run code), or a file that is not a mapping; the message names the file.
    """
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in (".pt", ".pth"))[:5]
        hint = f"; it holds {', '.join(inside)}" if inside else ""
        raise CheckpointError(f"The {what} {path} is a directory, expected a checkpoint file{hint}.")
    if not path.exists():
        raise CheckpointError(f"The {what} {path} does not exist.")
    if not path.is_file():
        raise CheckpointError(f"The {what} {path} is not a regular file (a device, socket or pipe).")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"The {what} {path} is empty (0 bytes): it was probably cut off while being written.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if detail:
            raise CheckpointError(
                f"The {what} {path} holds a pickled Python object ({detail.group(1)}) that is refused: "
                "torch.load(weights_only=True) loads only tensors and plain values, because unpickling an object "
                "can run arbitrary code. Re-save the file with plain tensors and values."
            ) from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)\n\n", str(exc), re.S)
        why = reason.group(1).strip() if reason else str(exc).splitlines()[0]
        raise CheckpointError(
            f"The {what} {path} ({size} bytes) is corrupt or not a PyTorch checkpoint and cannot be read: {why}"
        ) from None
    except PermissionError as exc:
        raise CheckpointError(f"The {what} {path} cannot be read: {exc.strerror}.") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(
            f"The {what} {path} ({size} bytes) is truncated or corrupt and cannot be read: {exc}"
        ) from None
    except Exception as exc:  # the unpickler fails on text and other garbage with any error type
        raise CheckpointError(
            f"The {what} {path} ({size} bytes) is not a PyTorch checkpoint (a text file or other data?) and cannot "
            f"be read: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"The {what} {path} holds a {type(data).__name__}, expected a mapping of named entries.")
    return data


def load_state_dict_strict(
    module: nn.Module, state_dict: Mapping[str, Any], *, path: str | os.PathLike[str], what: str
) -> None:
    """Load ``state_dict`` into ``module`` strictly, naming the first missing/unexpected keys and bad shapes.

    Raises:
        CheckpointError: any key missing or unexpected, or any shape mismatch (wrong architecture or number
            of classes); the message names ``path``.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:5])})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (first: {'; '.join(mismatched[:5])})")
        raise CheckpointError(
            f"The {what} {path} does not match the model ({type(module).__name__}): " + "; ".join(parts) + "."
        )
    module.load_state_dict(state_dict, strict=True)


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, as tensors and plain values."""
    py_version, py_keys, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)  # noqa: NPY002 (global state)
    state: dict[str, Any] = {
        "python": {"version": py_version, "keys": torch.tensor(py_keys, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(k) for k in py["keys"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(  # noqa: NPY002 (global state)
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
    )
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
