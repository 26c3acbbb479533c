"""Registers and spills of the Triton kernels as the launchers configure them, from ``ptxas -v`` (no GPU needed).

Not a test. Each kernel variant that a CWD or HWD forward+backward launches at the benchmark's shapes
(``bench_channel_kl.py``: chunks of 2048, one row per program, the launchers' ``num_warps``) is compiled
for an sm_90 target through Triton's pipeline, and its PTX is assembled again with the ``ptxas`` that the
Triton wheel bundles, with ``-v``: registers per thread, spill stores and loads (bytes), and the
occupancy that follows from the registers (at most 65536 registers per SM, 2048 threads per SM). Run it
without ``TRITON_INTERPRET`` (``triton.jit`` reads it when the kernels are decorated)::

    python benchmarks/triton_registers.py
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from segkd.ops import _triton_backend, _triton_kernels, _triton_weighting

ARCH = 90
REGISTERS_PER_SM, THREADS_PER_SM = 65536, 2048
PTXAS = Path(get_ptxas(ARCH).path)  # the ptxas Triton itself uses for this target


def ptxas_info(ptx: str) -> dict[str, int]:
    """Registers and spill bytes of the one kernel in ``ptx``, from ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        done = subprocess.run(
            [
                str(PTXAS),
                "-v",
                "--regAllocOptLevel=2",
                f"--gpu-name=sm_{ARCH}a",
                str(source),
                "-o",
                str(Path(tmp) / "k.o"),
            ],
            capture_output=True,
            text=True,
        )
    log = done.stderr + done.stdout
    if done.returncode:
        raise RuntimeError(f"ptxas failed: {log}")
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {
        "registers": int(registers.group(1)) if registers else -1,
        "spill_stores": int(spills.group(1)) if spills else -1,
        "spill_loads": int(spills.group(2)) if spills else -1,
    }


def compile_ptx(kernel: Any, types: dict[str, str], constexprs: dict[str, Any], num_warps: int) -> str:
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in names}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", ARCH, 32), options={"num_warps": num_warps})
    return str(compiled.asm["ptx"])


def report(label: str, kernel: Any, types: dict[str, str], constexprs: dict[str, Any], num_warps: int) -> None:
    info = ptxas_info(compile_ptx(kernel, types, constexprs, num_warps))
    threads = 32 * num_warps
    per_sm = min(THREADS_PER_SM // threads, REGISTERS_PER_SM // max(1, info["registers"] * threads))
    print(
        f"| {label} | {num_warps} | {info['registers']} | {info['spill_stores']} / {info['spill_loads']} | {per_sm} |",
        flush=True,
    )


def main() -> None:
    block_l = _triton_backend.FORWARD_MAX_BLOCK_L
    warps = _triton_backend._num_warps(block_l)  # one row of >= 2048 columns per program at the bench shapes
    scalars = {"inv_tau": "fp32", "inv_tau_lo": "fp32"}
    version = subprocess.run([str(PTXAS), "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    print(f"sm_{ARCH}a; {PTXAS.name}: {version[-1] if version else '?'}; triton {triton.__version__}")
    print("| kernel | num_warps | registers | spill stores / loads (bytes) | programs per SM |")
    print("|---|---|---|---|---|")
    for dtype in ("fp32", "bf16"):
        for need_sqdist, split in ((False, False), (True, False), (False, True), (True, True)):
            types = {"student_ptr": f"*{dtype}", "teacher_ptr": f"*{dtype}", **scalars}
            types |= dict.fromkeys(("kl_ptr", "sqdist_ptr", "stats_s_ptr", "stats_t_ptr", "partials_ptr"), "*fp32")
            constexprs = {"NEED_SQDIST": need_sqdist, "SPLIT": split, "ROWS": 1, "BLOCK_L": block_l}
            constexprs |= {"ACC": tl.float32, "EXACT_TAU": False}
            name = f"forward {dtype}, {'HWD' if need_sqdist else 'CWD'}, {'split' if split else 'whole rows'}"
            report(name, _triton_kernels.channel_kl_forward_kernel, types, constexprs, warps)
        types = {"student_ptr": f"*{dtype}", "teacher_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}", **scalars}
        types |= dict.fromkeys(("stats_s_ptr", "stats_t_ptr", "grad_kl_ptr", "coef_ptr"), "*fp32")
        constexprs = {"ROWS": 1, "BLOCK_L": _triton_backend.BACKWARD_MAX_BLOCK_L, "ACC": tl.float32}
        constexprs |= {"EXACT_TAU": False, "HAS_COEF": True}
        report(f"backward {dtype}", _triton_kernels.channel_kl_backward_kernel, types, constexprs, warps)
    floats = ("inv_tau", "inv_tau_lo", "mu", "mu_lo", "log_beta", "log_beta_lo", "scale", "scale_lo")
    types = dict.fromkeys(("kl_ptr", "aux_ptr", "loss_ptr", "coef_ptr", "stats_s_ptr", "stats_t_ptr"), "*fp32")
    types |= dict.fromkeys(floats, "fp32")
    for batch, channels in ((8, 19), (8, 150), (16, 150)):
        images, block_c = _triton_weighting._tile(batch, channels)
        for mode, split in ((0, False), (1, False), (1, True)):
            constexprs = {"MODE": mode, "REDUCTION": 0, "BETA_IS_ONE": False, "SPLIT": split}
            constexprs |= {"SPLIT_SQDIST": split and mode == 1, "IMAGES": images, "BLOCK_C": block_c}
            name = f"finalize {'HWD' if mode else 'CWD'}{' split' if split else ''}, N={batch} C={channels}"
            warps = _triton_weighting._num_warps(images * block_c)
            report(name, _triton_weighting.weighted_finalize_kernel, types, constexprs, warps)


if __name__ == "__main__":
    main()
