"""The ``reduction`` step shared by the float64 references (private; independent of :mod:`segkd._checks`)."""

from __future__ import annotations

from torch import Tensor


def reduce_terms(terms: Tensor, reduction: str, mean_divisor: float | None = None) -> Tensor:
    """Reduce per-element loss terms the way a reference's ``reduction`` argument says.

    Args:
        terms: the unreduced terms (what ``reduction="none"`` returns).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        mean_divisor: what ``"mean"`` divides the sum by; ``None`` for ``terms.mean()``.

    Returns:
        ``terms.mean()`` (or ``terms.sum() / mean_divisor``), ``terms.sum()`` or ``terms``.

    Raises:
        ValueError: an unknown ``reduction``.
    """
    if reduction == "mean":
        return terms.mean() if mean_divisor is None else terms.sum() / mean_divisor
    if reduction == "sum":
        return terms.sum()
    if reduction == "none":
        return terms
    raise ValueError(f"Expected reduction 'mean', 'sum' or 'none', got {reduction!r}.")
