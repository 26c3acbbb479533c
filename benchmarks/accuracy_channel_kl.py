"""Accuracy of ``channel_kl``'s backends against a 40-digit reference (not a test; prints a table).

For each case, ``(6, 40)`` rows of student and teacher logits in the given dtype (the reference
sees the rounded inputs, so only the backends' own arithmetic is measured), the largest relative
error over the rows of ``kl`` and ``sqdist`` from ``segkd.ops._triton_backend.forward`` (on CPU
under the Triton interpreter; once as it runs, once with the rows split into segments of 8 columns)
and ``segkd.ops._torch_backend.forward``. The reference computes
``log p = x / tau - logsumexp(x / tau)`` per row in ``mpmath`` at 40 digits (``mpmath`` comes with
PyTorch's ``sympy`` dependency). Cases: fp64 near-identical rows (``teacher = 2 randn``,
``student = teacher + eps randn``) and independent rows; fp32/bf16/fp16 rows with a large common
offset (``offset + spread randn``), independent or near-identical (noise ``spread / 100``), and
rows of large independent logits (``scale randn``). A relative error of ``1`` or more where the
reference KL is below ~``1e-30`` (one-hot rows that round to equal) means nothing.

Usage::

    TRITON_INTERPRET=1 OMP_NUM_THREADS=1 python benchmarks/accuracy_channel_kl.py
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported: CPU tensors run interpreted

import mpmath
import numpy as np
import torch

from segkd.ops import _torch_backend, _triton_backend

mpmath.mp.dps = 40


def reference(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """kl and sqdist per row, in 40-digit arithmetic from the rounded inputs."""
    kls, sqdists = [], []
    inverse = 1 / mpmath.mpf(tau)
    for s_row, t_row in zip(student.double().tolist(), teacher.double().tolist(), strict=True):
        log_p = []
        for row in (s_row, t_row):
            scaled = [mpmath.mpf(x) * inverse for x in row]
            top = max(scaled)
            log_z = mpmath.log(mpmath.fsum(mpmath.exp(x - top) for x in scaled))
            log_p.append([x - top - log_z for x in scaled])
        pairs = list(zip(*log_p, strict=True))
        kls.append(float(mpmath.fsum(mpmath.exp(lt) * (lt - ls) for ls, lt in pairs)))
        sqdists.append(float(mpmath.fsum((mpmath.exp(ls) - mpmath.exp(lt)) ** 2 for ls, lt in pairs)))
    return np.array(kls), np.array(sqdists)


def relative_error(value: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.max(np.abs(value.double().numpy() - ref) / np.maximum(np.abs(ref), 1e-300)))


@contextlib.contextmanager
def split_rows() -> Iterator[None]:
    """The Triton forward with its rows split into segments of 8 columns (combined by the KL chain rule)."""
    saved = _triton_backend._target_programs, _triton_backend.MIN_SEGMENT_ELEMENTS, _triton_backend.FORWARD_MAX_BLOCK_L
    _triton_backend._target_programs = lambda device: 1 << 30  # type: ignore[assignment]
    _triton_backend.MIN_SEGMENT_ELEMENTS = _triton_backend.FORWARD_MAX_BLOCK_L = 8
    try:
        yield
    finally:
        _triton_backend._target_programs, _triton_backend.MIN_SEGMENT_ELEMENTS, _triton_backend.FORWARD_MAX_BLOCK_L = (
            saved
        )


def row(name: str, student: torch.Tensor, teacher: torch.Tensor, tau: float) -> str:
    ref_kl, ref_sqdist = reference(student, teacher, tau)
    cells = [name]
    runs = ((_triton_backend, contextlib.nullcontext()), (_triton_backend, split_rows()), (_torch_backend, None))
    for backend, context in runs:
        with context or contextlib.nullcontext():
            kl, sqdist = backend.forward(student, teacher, tau, True)[:2]  # (kl, sqdist, row statistics...)
        assert sqdist is not None
        cells += [f"{relative_error(kl, ref_kl):.1e}", f"{relative_error(sqdist, ref_sqdist):.1e}"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    warnings.filterwarnings("ignore")
    gen = torch.Generator().manual_seed(0)
    base, noise, other = (torch.randn(6, 40, generator=gen, dtype=torch.float64) for _ in range(3))
    print("| case | triton kl | triton sqdist | split kl | split sqdist | torch kl | torch sqdist |")
    print("|---|---|---|---|---|---|---|")
    for eps in (1e-1, 1e-2, 1e-4):
        print(row(f"fp64, near-identical eps={eps:g}, tau=1", 2 * base + eps * noise, 2 * base, 1.0))
    for eps in (1e-2, 1e-4):
        student, teacher = (2 * base + eps * noise).float(), (2 * base).float()
        print(row(f"fp32, near-identical eps={eps:g}, tau=1", student, teacher, 1.0))
    for tau in (0.3, 1.7):
        print(row(f"fp64, independent 3 randn, tau={tau}", 3 * base, 3 * other, tau))
    for dtype, offset, spread, tau in (
        (torch.float32, 1e4, 3.0, 1.0),
        (torch.float32, 1e3, 3.0, 0.5),
        (torch.float32, 1e3, 1.0, 0.3),
        (torch.float32, 1e4, 30.0, 4.0),
        (torch.bfloat16, 1e3, 30.0, 1.0),
        (torch.bfloat16, 1e4, 300.0, 0.5),
        (torch.float16, 1e3, 10.0, 0.5),
    ):
        label = f"{str(dtype)[6:]}, {offset:g} + {spread:g} randn, tau={tau}"
        teacher = (offset + spread * base).to(dtype)
        print(row(label, (offset + spread * other).to(dtype), teacher, tau))
        near = (offset + spread * base + spread * 1e-2 * noise).to(dtype)
        print(row(label + ", near-identical", near, teacher, tau))
    for dtype, scale, tau in ((torch.float32, 1e4, 1.0), (torch.float32, 1e3, 0.3), (torch.bfloat16, 1e3, 0.5)):
        student, teacher = (scale * base).to(dtype), (scale * other).to(dtype)
        print(row(f"{str(dtype)[6:]}, independent {scale:g} randn, tau={tau}", student, teacher, tau))


if __name__ == "__main__":
    main()
