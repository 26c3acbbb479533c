"""How a failed run reports itself: one line for the errors a user can fix, the traceback for the rest.

Known errors are the pipeline's own (:class:`~segkd_examples.config.ConfigError`,
:class:`~segkd_examples.checkpoint.CheckpointError`, :class:`~segkd_examples.data.DatasetRootError`,
:class:`~segkd_examples.data.DatasetFileError`, :class:`~segkd_examples.metrics.LabelRangeError`) and the
``ValueError`` / ``TypeError`` that segkd's losses raise for a bad argument: their message names the file, key or
value to change, so a traceback would only bury it. Any other exception is a bug or an environment problem and
keeps its traceback. ``--debug`` or ``SEGKD_DEBUG=1`` shows the traceback of known errors too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["DEBUG_ENV", "debug_requested", "is_known_error", "one_line"]

#: Environment variable that turns on tracebacks for known errors (``1``, ``true``, ``yes`` or ``on``).
DEBUG_ENV = "SEGKD_DEBUG"

_WORKER = re.compile(
    r"^Caught \w+ in (DataLoader worker process \d+)\.\nOriginal Traceback \(most recent call last\):\n"
)


def debug_requested(flag: bool | None = None) -> bool:
    """Whether tracebacks are wanted: ``flag`` (``--debug``) or ``SEGKD_DEBUG`` set to a true value."""
    if flag:
        return True
    return os.environ.get(DEBUG_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _known_types() -> tuple[type[BaseException], ...]:
    from segkd_examples.checkpoint import CheckpointError
    from segkd_examples.config import ConfigError
    from segkd_examples.data import DatasetFileError, DatasetRootError
    from segkd_examples.metrics import LabelRangeError

    return (ConfigError, CheckpointError, DatasetRootError, DatasetFileError, LabelRangeError)


def _raised_by_segkd(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc``'s traceback is in the segkd package (its argument checks)."""
    import segkd

    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    package = Path(segkd.__file__).resolve().parent
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(package)


def is_known_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an error whose message says what to fix (see the module docstring)."""
    if isinstance(exc, _known_types()):
        return True
    return isinstance(exc, (ValueError, TypeError)) and _raised_by_segkd(exc)


def one_line(exc: BaseException) -> str:
    """``"Type: message"`` on one line; an error re-raised from a DataLoader worker shows the worker's message."""
    message = str(exc)
    where = ""
    worker = _WORKER.match(message)
    if worker:  # torch re-raises the worker's exception with its traceback as the message
        lines = message[worker.end() :].splitlines()
        start = max((i + 1 for i, line in enumerate(lines) if line[:1].isspace()), default=0)  # after the frames
        message = "\n".join(lines[start:]).split(": ", 1)[-1]
        where = f" (in {worker.group(1)})"
    return f"{type(exc).__name__}{where}: {' '.join(message.split())}"
