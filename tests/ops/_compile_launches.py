"""Compile, for an H100, the kernels that real launches at a set of shapes ask for (run by test_triton_compiles.py).

``_compile_kernels.py`` compiles each kernel variant with general integer arguments. A launch on a GPU is
specialised further on its arguments: an integer equal to 1 becomes a constant (one row, rows of one element,
a gradient given per row with stride 1), and pointers and integers divisible by 16 are marked so (which lets
the compiler vectorise loads). Neither the interpreter nor the general variants see those programs.

Here the launchers run on CPU tensors with each launch replaced by a recorder, with the row split that an
H100's 132 SMs would give. For each distinct specialisation the launches ask for, the script builds the
signature and attributes the way Triton's launcher does (``create_function_from_signature`` and
``JITFunction._pack_args``, Triton internals) and compiles it down to ``ptxas`` for sm_90. Must run where
``TRITON_INTERPRET`` is unset. Prints one line per compiled variant and exits non-zero on the first failure;
exits with status 3 and a message when this Triton lacks the internals used here.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

try:
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature
except ImportError as error:  # pragma: no cover - depends on the installed Triton
    print(f"this Triton ({triton.__version__}) lacks the launcher internals used here: {error}")
    sys.exit(3)

from segkd.ops import _triton_backend, _triton_weighting

TARGET = GPUTarget("cuda", 90, 32)
H100_PROGRAMS = _triton_backend.PROGRAMS_PER_SM * 132
# (N, C, L): what each shape exercises on an H100.
SHAPES = [
    (1, 1, 1),  # one row of one element: the sizes, strides and grid are all 1
    (1, 1, 8192),  # one long row, split into segments
    (1, 3, 35),  # odd sizes, nothing divisible by 16
    (2, 3, 16),  # small and divisible by 16
    (8, 19, 8192),  # Cityscapes at 64x128: 152 rows, split
    (8, 150, 4096),  # ADE20K at 64x64
    (16, 150, 16384),  # the largest benchmark shape
    (1, 1100, 4),  # more channels than the finalize kernel's block: the PyTorch finalize takes over
]
# Also run as views one element into their storage: pointers not divisible by 16, as slices of a tensor give.
MISALIGNED_SHAPES = [(1, 3, 35), (8, 19, 8192)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
WEIGHTINGS = ["uniform", "hwd", "given"]
REDUCTIONS = ["mean", "sum", "none"]


class _Recorder:
    """Stands in for a kernel: ``recorder[grid](*args, **kwargs)`` records the specialisation instead of launching."""

    def __init__(self, kernel: JITFunction, backend: Any, seen: dict[tuple[str, str], tuple[Any, ...]]) -> None:
        self._kernel, self._backend, self._seen = kernel, backend, seen

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        def launch(*args: Any, **kwargs: Any) -> None:
            binder = create_function_from_signature(self._kernel.signature, self._kernel.params, self._backend)
            bound, specialization, options = binder(*args, **kwargs)
            key = (self._kernel.fn.__name__, repr((specialization, sorted(options.items()))))
            self._seen.setdefault(key, (self._kernel, bound, specialization, options, dict(kwargs)))

        return launch


def record_launches() -> dict[tuple[str, str], tuple[Any, ...]]:
    """Run every launcher path at ``SHAPES`` x ``DTYPES`` and return the distinct launches by specialisation."""
    backend = make_backend(TARGET)
    seen: dict[tuple[str, str], tuple[Any, ...]] = {}
    _triton_backend._kernel_for = lambda kernel, device: _Recorder(kernel, backend, seen)  # type: ignore[assignment]
    _triton_backend._target_programs = lambda device: H100_PROGRAMS  # type: ignore[assignment]
    cases = [(shape, dtype, 0) for shape, dtype in itertools.product(SHAPES, DTYPES)]
    cases += [(shape, dtype, 1) for shape, dtype in itertools.product(MISALIGNED_SHAPES, DTYPES)]
    for (images, channels, length), dtype, offset in cases:
        rows = images * channels
        student = torch.empty(offset + rows * length, dtype=dtype)[offset:].view(rows, length)
        teacher = torch.empty(offset + rows * length, dtype=dtype)[offset:].view(rows, length)
        for need_sqdist in (False, True):
            _, _, stats_s, stats_t = _triton_backend.forward(student, teacher, 4.0, need_sqdist)
        stat_dtype = stats_s.dtype
        _triton_backend.backward(student, teacher, stats_s, stats_t, torch.empty(rows, dtype=stat_dtype), 4.0)
        coef = torch.empty(rows, dtype=stat_dtype)
        for grad_loss in (torch.empty(1, dtype=stat_dtype), torch.empty(rows, dtype=stat_dtype)):
            _triton_backend.backward(student, teacher, stats_s, stats_t, grad_loss, 4.0, coef=coef)
        weights = torch.empty(rows, dtype=stat_dtype)
        for mode, reduction in itertools.product(WEIGHTINGS, REDUCTIONS):
            given = weights if mode == "given" else None
            _triton_weighting.weighted_forward(student, teacher, given, 4.0, channels, mode, 0.0, 0.5, reduction)
    return seen


_SEEN: list[tuple[str, tuple[Any, ...]]] = []  # filled before the workers fork, read by index in them


def _compile(index: int) -> tuple[str, str, list[str]]:
    """Compile the ``index``-th recorded launch as Triton's launcher would; return its name, summary and 1-args."""
    name, (kernel, bound, specialization, options, kwargs) = _SEEN[index]
    backend = make_backend(TARGET)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    assert compiled.asm.get("cubin"), f"no cubin for {name}"
    ones = [kernel.arg_names[i] for (i,) in constexprs if not kernel.params[i].is_constexpr]
    divisible = sum(1 for value in attrs.values() if value)
    return name, f"{divisible} arguments divisible by 16; equal to 1: {', '.join(ones) or '-'}", ones


def main() -> None:
    _SEEN.extend((name, launch) for (name, _), launch in record_launches().items())
    ones_by_kernel: dict[str, set[str]] = {}
    workers = min(4, os.cpu_count() or 1)  # compiling is CPU-bound Python and ptxas: one process per core
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        for name, summary, ones in pool.map(_compile, range(len(_SEEN))):
            ones_by_kernel.setdefault(name, set()).update(ones)
            print(f"ok {name}: {summary}", flush=True)
    for name, ones in sorted(ones_by_kernel.items()):
        print(f"{name}: compiled with each of these equal to 1: {', '.join(sorted(ones))}")


if __name__ == "__main__":
    main()
