"""Compile every Triton kernel variant for a CUDA GPU without one (run by test_triton_compiles.py).

The interpreter that runs the kernels on CPU in CI executes them as NumPy code: it does not see what only
the compiler rejects (a constexpr used as a tensor, an unsupported loop bound, a type mismatch in a branch).
Here each variant the launchers can ask for goes through Triton's whole pipeline (Triton IR, LLVM, PTX and
``ptxas``, which the Triton wheel bundles) for an sm_90 target. Must run in a process where
``TRITON_INTERPRET`` is unset, since ``triton.jit`` reads it when the kernels are decorated.
Prints one line per variant and exits non-zero on the first failure.
"""

from __future__ import annotations

import inspect
import itertools
import os
import sys
from typing import Any

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from segkd.ops import _triton_kernels, _triton_weighting

TARGET = GPUTarget("cuda", 90, 32)
STORAGE = {"bf16": tl.float32, "fp16": tl.float32, "fp32": tl.float32, "fp64": tl.float64}


def compile_variant(kernel: Any, pointers: dict[str, str], floats: tuple[str, ...], constexprs: dict[str, Any]) -> None:
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        else:
            signature[name] = "fp32" if name in floats else "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=TARGET)
    assert compiled.asm.get("cubin"), "no cubin"
    label = ", ".join(f"{k}={getattr(v, 'name', v)}" for k, v in constexprs.items())
    print(f"ok {kernel.fn.__name__}({label})", flush=True)


def main() -> None:
    inverse = ("inv_tau", "inv_tau_lo")
    for dtype, split, need_sqdist in itertools.product(STORAGE, (False, True), (False, True)):
        acc = STORAGE[dtype]
        stats = "*fp64" if acc == tl.float64 else "*fp32"
        pointers = {"student_ptr": f"*{dtype}", "teacher_ptr": f"*{dtype}"}
        pointers |= dict.fromkeys(("kl_ptr", "sqdist_ptr", "stats_s_ptr", "stats_t_ptr", "partials_ptr"), stats)
        constexprs = {"NEED_SQDIST": need_sqdist, "SPLIT": split, "ROWS": 1, "BLOCK_L": 2048}
        constexprs |= {"ACC": acc, "EXACT_TAU": acc == tl.float64}
        compile_variant(_triton_kernels.channel_kl_forward_kernel, pointers, inverse, constexprs)
    for acc in (tl.float32, tl.float64):
        stats = "*fp64" if acc == tl.float64 else "*fp32"
        pointers = dict.fromkeys(("partials_ptr", "kl_ptr", "sqdist_ptr", "stats_s_ptr", "stats_t_ptr"), stats)
        constexprs = {"NEED_SQDIST": True, "BLOCK_R": 128, "ACC": acc, "EXACT_TAU": acc == tl.float64}
        compile_variant(_triton_kernels.channel_kl_combine_kernel, pointers, inverse, constexprs)
    for dtype, has_coef in [(name, True) for name in STORAGE] + [("fp32", False)]:
        acc = STORAGE[dtype]
        stats = "*fp64" if acc == tl.float64 else "*fp32"
        pointers = {"student_ptr": f"*{dtype}", "teacher_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}"}
        pointers |= dict.fromkeys(("stats_s_ptr", "stats_t_ptr", "grad_kl_ptr", "coef_ptr"), stats)
        constexprs = {"ROWS": 1, "BLOCK_L": 2048, "ACC": acc, "EXACT_TAU": acc == tl.float64, "HAS_COEF": has_coef}
        compile_variant(_triton_kernels.channel_kl_backward_kernel, pointers, inverse, constexprs)
    finalize_floats = (*inverse, "mu", "mu_lo", "log_beta", "log_beta_lo", "scale", "scale_lo")
    pointers = dict.fromkeys(("kl_ptr", "aux_ptr", "loss_ptr", "coef_ptr", "stats_s_ptr", "stats_t_ptr"), "*fp32")
    for mode, reduction, split in itertools.product((0, 1, 2), (0, 2), (False, True)):
        constexprs = {"MODE": mode, "REDUCTION": reduction, "BETA_IS_ONE": mode != 1, "SPLIT": split}
        constexprs |= {"SPLIT_SQDIST": split and mode == 1, "IMAGES": 8, "BLOCK_C": 32}
        compile_variant(_triton_weighting.weighted_finalize_kernel, pointers, finalize_floats, constexprs)


if __name__ == "__main__":
    main()
