"""Run outputs on rank 0: ``metrics.jsonl``, optional TensorBoard, a progress bar with ETA, console lines."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "Progress", "json_safe", "read_metrics"]


def json_safe(value: Any) -> Any:
    """``value`` with tensors as numbers and NaN as ``null`` (JSON has no NaN)."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)  # JSON has no NaN/Inf
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return value


class MetricsLog:
    """Appends one JSON object per line to ``<out>/metrics.jsonl`` and mirrors scalars to TensorBoard.

    On resume from iteration ``k``, records with ``iter > k`` (written by the interrupted run after its last
    checkpoint) are dropped first, so the file reads as one uninterrupted run.

    Args:
        out: the run folder.
        enabled: ``False`` on ranks other than 0 (every call becomes a no-op).
        resume_iter: the iteration the run resumes from, or ``None`` for a fresh run (the file is truncated).
        tensorboard: also write TensorBoard events when the ``tensorboard`` package is installed.
    """

    def __init__(self, out: Path, *, enabled: bool, resume_iter: int | None, tensorboard: bool = False) -> None:
        self.path = out / "metrics.jsonl"
        self.enabled = enabled
        self._tb: Any = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if resume_iter is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut off by a kill
                if int(record.get("iter", 0)) <= resume_iter:
                    kept.append(line)
        self.path.write_text("".join(f"{line}\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("tensorboard is not installed; writing metrics.jsonl only.", file=sys.stderr)
            else:
                self._tb = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=resume_iter)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (must hold ``iter``) and send its scalars to TensorBoard."""
        if not self.enabled:
            return
        record = json_safe(record)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = int(record["iter"])
            for key, value in record.items():
                if key != "iter" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)

    def close(self) -> None:
        """Flush TensorBoard."""
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read every record of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Progress:
    """A tqdm bar with ETA on rank 0, only on a terminal (or when forced); silent otherwise."""

    def __init__(self, total: int, initial: int, *, enabled: bool) -> None:
        self._bar: Any = None
        if not enabled or not sys.stderr.isatty():
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, initial=initial, desc="train", unit="it", dynamic_ncols=True)

    @property
    def active(self) -> bool:
        """Whether a bar is shown (console log lines are then written through it)."""
        return self._bar is not None

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by ``n`` iterations and show ``postfix``."""
        if self._bar is None:
            return
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(n)

    def write(self, text: str) -> None:
        """Print a line without breaking the bar."""
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        """Remove the bar."""
        if self._bar is not None:
            self._bar.close()
