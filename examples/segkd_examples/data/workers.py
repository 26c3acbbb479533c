"""How many data-loader worker processes a rank starts by default: what this machine can run."""

from __future__ import annotations

import os

__all__ = ["MAX_DEFAULT_WORKERS", "default_workers", "usable_cpus"]

#: Most workers a rank starts by default (more rarely helps the pipeline's per-item cost).
MAX_DEFAULT_WORKERS = 4


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one (Linux), else ``os.cpu_count()``."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        try:
            return max(len(getaffinity(0)), 1)
        except OSError:
            pass
    return max(os.cpu_count() or 1, 1)


def default_workers(local_world_size: int | None = None) -> int:
    """``min(4, usable CPUs // processes on this machine)`` (0 means loading in the main process).

    Args:
        local_world_size: processes sharing this machine; by default ``LOCAL_WORLD_SIZE`` (set by ``torchrun``),
            else 1.

    Raises:
        ValueError: ``local_world_size < 1`` or ``LOCAL_WORLD_SIZE`` not a positive integer.
    """
    if local_world_size is None:
        raw = os.environ.get("LOCAL_WORLD_SIZE", "").strip() or "1"
        try:
            local_world_size = int(raw)
        except ValueError:
            raise ValueError(f"Expected LOCAL_WORLD_SIZE to be a positive integer, got {raw!r}.") from None
    if local_world_size < 1:
        raise ValueError(f"Expected `local_world_size` to be >= 1, got {local_world_size}.")
    return min(MAX_DEFAULT_WORKERS, usable_cpus() // local_world_size)
