"""Process-group set-up for ``python`` and ``torchrun`` launches, and failure handling that never hangs.

``torchrun`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; a plain
``python`` launch has none of them and runs as a single process without a process group. The backend is
NCCL when the process drives a CUDA device and gloo otherwise.

Failure policy: whatever a rank raises is logged with the rank's number, the process group is torn down
(with a watchdog, since tearing down can itself block on a dead peer), and the exception propagates so
the process exits non-zero. ``torchrun`` then stops the other ranks. Collectives carry a timeout
(``dist_timeout``), so a rank blocked on a peer that died outside torchrun's view fails after that timeout
instead of hanging forever.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "cleanup",
    "gather_objects",
    "init_distributed",
    "run_guarded",
]

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        """Whether a process group with more than one rank is running."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and prints."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"Expected the environment variable {name} to be an integer, got {value!r}.") from None


def init_distributed(*, timeout_s: float = 1800.0, device: str | None = None) -> DistInfo:
    """Read ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` and start the process group when ``WORLD_SIZE > 1``.

    Args:
        timeout_s: timeout of every collective, in seconds (gloo and NCCL).
        device: ``"cpu"`` or ``"cuda"`` to force one; by default CUDA when available.

    Returns:
        The rank, world size, device and backend of this process.

    Raises:
        ValueError: inconsistent environment (``RANK >= WORLD_SIZE``) or an unknown ``device``.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world_size:
        raise ValueError(f"Expected 0 <= RANK < WORLD_SIZE, got RANK={rank} and WORLD_SIZE={world_size}.")
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"Expected `device` to be 'cpu', 'cuda' or None, got {device!r}.")
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank % max(torch.cuda.device_count(), 1))
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    backend = None
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
        if use_cuda:
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    elif dist.is_initialized():
        backend = dist.get_backend()
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev, backend=backend)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it (no-op in a single process)."""
    if _initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not _initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank."""
    if not _initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup(*, timeout_s: float = 10.0) -> None:
    """Destroy the process group; if that blocks for ``timeout_s`` (a dead peer), exit the process instead."""
    if not _initialized():
        return
    done = threading.Event()

    def _watchdog() -> None:
        if not done.wait(timeout_s):
            sys.stderr.write(f"process-group teardown blocked for {timeout_s:.0f} s; exiting.\n")
            sys.stderr.flush()
            os._exit(1)

    threading.Thread(target=_watchdog, daemon=True).start()
    try:
        dist.destroy_process_group()
    finally:
        done.set()


def run_guarded(fn: Callable[[], T], *, teardown_timeout_s: float = 10.0, debug: bool = False) -> T:
    """Run ``fn``; on any exception log it with this rank's number, tear the group down and re-raise.

    The message goes to stderr as ``[rank R/W] FAILED: ExceptionType: message`` (after the traceback, each
    line tagged with the rank, when there are several processes), so the job's log names the rank that
    failed, whichever launcher collected the output. A known error (:func:`segkd_examples.failures.is_known_error`:
    a bad config, checkpoint or dataset file, a loss's argument check) gets that one line only, its message on
    one line, unless ``debug``; the caller then exits without a traceback (``examples/train_ddp.py`` does).
    """
    try:
        result = fn()
    except BaseException as exc:
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            raise
        from segkd_examples.failures import DEBUG_ENV, is_known_error, one_line

        rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
        brief = not debug and is_known_error(exc)
        if world > 1 and not brief:  # interleaved logs: tag every line of this rank's traceback
            lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
            tagged = (f"[rank {rank}/{world}] {line}" for chunk in lines for line in chunk.splitlines(True))
            sys.stderr.write("".join(tagged))
        if brief:
            hint = f" (traceback: --debug or {DEBUG_ENV}=1)"
            sys.stderr.write(f"[rank {rank}/{world}] FAILED: {one_line(exc)}{hint}\n")
        else:
            sys.stderr.write(f"[rank {rank}/{world}] FAILED: {type(exc).__name__}: {exc}\n")
        sys.stderr.flush()
        if _initialized():
            # Peers blocked in a collective with this rank are released by torchrun (it stops the job when
            # one rank exits non-zero) or, failing that, by the collective timeout.
            _abort_group(teardown_timeout_s)
        raise
    cleanup(timeout_s=teardown_timeout_s)
    return result


def _abort_group(timeout_s: float) -> None:
    abort = getattr(dist, "abort_process_group", None)
    if abort is not None:
        done = threading.Event()

        def _watchdog() -> None:
            if not done.wait(timeout_s):
                os._exit(1)

        threading.Thread(target=_watchdog, daemon=True).start()
        try:
            abort()
            return
        except Exception:  # fall back to an orderly teardown below
            pass
        finally:
            done.set()
    with contextlib.suppress(Exception):
        cleanup(timeout_s=timeout_s)
