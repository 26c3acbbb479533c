"""The ``reduction`` argument, applied the same way by every loss."""

from __future__ import annotations

from torch import Tensor


def reduce_terms(terms: Tensor, reduction: str) -> Tensor:
    """Reduce per-element loss terms: ``"mean"`` averages every element, ``"sum"`` adds them, ``"none"`` keeps them.

    ``reduction`` must already be validated by :func:`segkd._checks.check_reduction`.
    """
    if reduction == "mean":
        return terms.mean()
    if reduction == "sum":
        return terms.sum()
    return terms
