"""Compile, for each GPU architecture, the kernels that real launches ask for (run by test_triton_compiles.py).

``_compile_kernels.py`` compiles each kernel variant with general integer arguments. A launch on a GPU is
specialised further on its arguments: an integer equal to 1 becomes a constant (one row, rows of one element,
a gradient given per row with stride 1), and pointers and integers divisible by 16 are marked so (which lets
the compiler vectorise loads). Neither the interpreter nor the general variants see those programs.

Here the launchers run on CPU tensors with each launch replaced by a recorder, with the row split that an
H100's 132 SMs would give. For each distinct specialisation the launches ask for, the script builds the
signature and attributes the way Triton's launcher does (``create_function_from_signature`` and
``JITFunction._pack_args``, Triton internals) and compiles it down to ``ptxas``: for sm_90 every launch at
``SHAPES`` x ``DTYPES``; with the argument ``archs``, for each other architecture of ``EXTRA_ARCHS`` that this
Triton can target (a trivial kernel compiles for it) a representative subset: every kernel variant at
``SUBSET_SHAPES`` x ``SUBSET_DTYPES``.
Must run where ``TRITON_INTERPRET`` is unset. Prints one line per compiled variant (``ok <kernel> sm_<arch>:``),
``unsupported sm_<arch>: <why>`` for an architecture this Triton cannot target, and exits non-zero on the first
failure; exits with status 3 and a message when this Triton lacks the internals used here.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, NamedTuple

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

try:
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature
except ImportError as error:  # pragma: no cover - depends on the installed Triton
    print(f"this Triton ({triton.__version__}) lacks the launcher internals used here: {error}")
    sys.exit(3)

from segkd.ops import _triton_backend, _triton_weighting

FULL_ARCH = 90  # every recorded launch is compiled for this one
# The other architectures people train on: T4, A100, RTX 30xx, L4 / RTX 40xx, B200, RTX 50xx.
EXTRA_ARCHS = (75, 80, 86, 89, 100, 120)
TARGET = GPUTarget("cuda", FULL_ARCH, 32)
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
    (1, 1100, 4),  # more channels than one 1024-element step of the finalize kernel
]
# Also run as views one element into their storage: pointers not divisible by 16, as slices of a tensor give.
MISALIGNED_SHAPES = [(1, 3, 35), (8, 19, 8192)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
WEIGHTINGS = ["uniform", "hwd", "given"]
REDUCTIONS = ["mean", "sum", "none"]
# The subset for EXTRA_ARCHS: rows read whole (odd sizes, nothing divisible by 16) and rows split into segments
# (aligned), in the three training dtypes; every kernel variant (forward x sqdist x split, combine, backward with
# and without coefficients, finalize x weighting x split) appears, most specialisations of integers do not.
SUBSET_SHAPES = [(1, 3, 35), (8, 19, 8192)]
SUBSET_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SUBSET_REDUCTIONS = ["mean", "none"]


def target(arch: int) -> GPUTarget:
    """The CUDA target of compute capability ``arch`` (e.g. 86 for sm_86), warps of 32 threads."""
    return GPUTarget("cuda", arch, 32)


class Launch(NamedTuple):
    """One recorded launch: the kernel and what Triton's binder made of its arguments."""

    kernel: JITFunction
    bound: dict[str, Any]
    specialization: list[tuple[str, Any]]
    options: dict[str, Any]
    kwargs: dict[str, Any]
    target: GPUTarget = TARGET

    @property
    def key(self) -> tuple[str, str]:
        """Equal for launches that compile to the same program."""
        programs = repr((self.target.arch, self.specialization, sorted(self.options.items())))
        return self.kernel.fn.__name__, programs

    def compile(self) -> tuple[Any, dict[Any, Any]]:
        """The compiled kernel for its target, and its constexprs (the specialised integers among them)."""
        backend = make_backend(self.target)
        packed = self.kernel._pack_args(backend, self.kwargs, self.bound, self.specialization, self.options)
        options, signature, constexprs, attrs = packed
        source = ASTSource(self.kernel, signature, constexprs, attrs)
        return triton.compile(source, target=self.target, options=options.__dict__), constexprs


class _Recorder:
    """Stands in for a kernel: ``recorder[grid](*args, **kwargs)`` records the launch instead of running it."""

    def __init__(self, kernel: JITFunction, backend: Any, launches: list[Launch], target: GPUTarget) -> None:
        self._kernel, self._launches, self._target = kernel, launches, target
        self._binder = create_function_from_signature(kernel.signature, kernel.params, backend)

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        def launch(*args: Any, **kwargs: Any) -> None:
            bound, specialization, options = self._binder(*args, **kwargs)
            self._launches.append(Launch(self._kernel, bound, specialization, options, dict(kwargs), self._target))

        return launch


@contextlib.contextmanager
def recording(programs: int = H100_PROGRAMS, target: GPUTarget = TARGET) -> Iterator[list[Launch]]:
    """Inside the block the launchers record their launches for ``target`` into the yielded list.

    Rows are split as for a GPU that wants ``programs`` programs.
    """
    backend = make_backend(target)
    launches: list[Launch] = []
    recorders: dict[Any, _Recorder] = {}

    def recorder(kernel: JITFunction, device: torch.device) -> _Recorder:
        if kernel not in recorders:
            recorders[kernel] = _Recorder(kernel, backend, launches, target)
        return recorders[kernel]

    saved = _triton_backend._kernel_for, _triton_backend._target_programs
    _triton_backend._kernel_for = recorder  # type: ignore[assignment]
    _triton_backend._target_programs = lambda device: programs  # type: ignore[assignment]
    try:
        yield launches
    finally:
        _triton_backend._kernel_for, _triton_backend._target_programs = saved


def record_launches(
    arch: int = FULL_ARCH,
    shapes: list[tuple[int, int, int]] = SHAPES,
    misaligned: list[tuple[int, int, int]] = MISALIGNED_SHAPES,
    dtypes: list[torch.dtype] = DTYPES,
    reductions: list[str] = REDUCTIONS,
) -> dict[tuple[str, str], Launch]:
    """Run every launcher path at ``shapes`` x ``dtypes`` (and the ``misaligned`` views) for ``arch``; the distinct
    launches by key."""
    cases = [(shape, dtype, 0) for shape, dtype in itertools.product(shapes, dtypes)]
    cases += [(shape, dtype, 1) for shape, dtype in itertools.product(misaligned, dtypes)]
    with recording(target=target(arch)) as launches:
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
            for mode, reduction in itertools.product(WEIGHTINGS, reductions):
                given = weights if mode == "given" else None
                _triton_weighting.weighted_forward(student, teacher, given, 4.0, channels, mode, 0.0, 0.5, reduction)
    distinct: dict[tuple[str, str], Launch] = {}
    for launch in launches:
        distinct.setdefault(launch.key, launch)
    return distinct


@triton.jit
def _probe_kernel(x_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets) * 2.0)


def unsupported_reason(arch: int) -> str | None:
    """``None`` when this Triton (and its ``ptxas``) can target ``arch``, else the first line of why not."""
    source = ASTSource(_probe_kernel, {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {(1,): 128})
    try:
        triton.compile(source, target=target(arch))
    except Exception as error:  # an unknown target, a ptxas without it: this Triton cannot compile for it
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    return None


_SEEN: list[Launch] = []  # filled before the workers fork, read by index in them


def _compile(index: int) -> tuple[str, str, list[str]]:
    """Compile the ``index``-th distinct launch; return its kernel's name, a summary and its arguments equal to 1."""
    launch = _SEEN[index]
    compiled, constexprs = launch.compile()
    name = launch.kernel.fn.__name__
    assert compiled.asm.get("cubin"), f"no cubin for {name}"
    ones = [launch.kernel.arg_names[i] for (i,) in constexprs if not launch.kernel.params[i].is_constexpr]
    divisible = sum(1 for kind in launch.specialization if len(kind) > 1 and kind[1] == "D")
    fused = compiled.metadata.enable_fp_fusion  # the launchers ask for FMA contraction whatever Triton's default
    summary = f"{divisible} arguments divisible by 16; equal to 1: {', '.join(ones) or '-'}; fma: {fused}"
    return f"{name} sm_{launch.target.arch}", summary, ones


def main() -> None:
    """``python _compile_launches.py``: every launch for sm_90; ``python _compile_launches.py archs``: the subset
    for each of ``EXTRA_ARCHS``."""
    if sys.argv[1:] == ["archs"]:
        for arch in EXTRA_ARCHS:
            reason = unsupported_reason(arch)
            if reason is not None:
                print(f"unsupported sm_{arch}: {reason}", flush=True)
                continue
            _SEEN.extend(record_launches(arch, SUBSET_SHAPES, [], SUBSET_DTYPES, SUBSET_REDUCTIONS).values())
    else:
        _SEEN.extend(record_launches().values())
    ones_by_kernel: dict[str, set[str]] = {}
    workers = min(4, os.cpu_count() or 1)  # compiling is CPU-bound Python and ptxas: one process per core
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        for label, summary, ones in pool.map(_compile, range(len(_SEEN))):
            name, arch = label.split(" ")
            if arch == f"sm_{FULL_ARCH}":
                ones_by_kernel.setdefault(name, set()).update(ones)
            print(f"ok {label}: {summary}", flush=True)
    for name, ones in sorted(ones_by_kernel.items()):
        print(f"{name}: compiled with each of these equal to 1: {', '.join(sorted(ones))}")


if __name__ == "__main__":
    main()
