"""Registers and spills of the Triton kernels as the launchers configure them, from ``ptxas -v`` (no GPU needed).

Not a test. The launches of a CWD and an HWD forward+backward at the benchmark's shapes
(``bench_channel_kl.py``), fp32 and bf16, are recorded on CPU tensors with the row split an H100 would get,
and specialised on their arguments as Triton's launcher does on a GPU (integers equal to 1 as constants,
pointers and integers divisible by 16 marked so: the recorder of ``tests/ops/_compile_launches.py``). Each
distinct one is compiled for sm_90 through Triton's pipeline, and its PTX assembled again with the ``ptxas``
that the Triton wheel bundles, with ``-v``: registers per thread, spill stores and loads (bytes), and the
occupancy that follows from the registers (at most 65536 registers per SM, 2048 threads per SM). Run it
without ``TRITON_INTERPRET`` (``triton.jit`` reads it when the kernels are decorated)::

    python benchmarks/triton_registers.py
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

import torch
import triton
from triton.backends.nvidia.compiler import get_ptxas

from segkd.ops import _triton_backend, _triton_weighting

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "ops"))
from _compile_launches import recording  # the launch recorder the compile test uses

ARCH = 90
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (N, C, H * W): the benchmark shapes, and rows whose length is not a multiple of 16 (65x65, from 513x513 crops).
SHAPES = [(8, 19, 64 * 128), (8, 150, 64 * 64), (8, 171, 64 * 64), (16, 150, 128 * 128), (8, 21, 65 * 65)]
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


def programs_per_sm(registers: int, num_warps: int) -> int:
    threads = 32 * num_warps
    return min(THREADS_PER_SM // threads, REGISTERS_PER_SM // max(1, registers * threads))


def describe(launch: Any, dtype: str) -> str:
    """``forward fp32, sqdist, split`` and the like, from the kernel and its constexprs."""
    kernel = launch.kernel.fn.__name__
    constants = launch.bound
    if kernel == "channel_kl_forward_kernel":
        parts = ["sqdist" if constants["NEED_SQDIST"] else "KL only", "split" if constants["SPLIT"] else "whole rows"]
        return f"forward {dtype}, {', '.join(parts)}"
    if kernel == "channel_kl_combine_kernel":
        return f"combine, {'sqdist' if constants['NEED_SQDIST'] else 'KL only'}"
    if kernel == "channel_kl_backward_kernel":
        return f"backward {dtype}"
    mode = {0: "uniform", 1: "HWD", 2: "given"}[constants["MODE"]]
    split = ", split" if constants["SPLIT"] else ""
    return f"finalize {mode}{split}, {constants['IMAGES']} x {constants['BLOCK_C']}"


def main() -> None:
    version = subprocess.run([str(PTXAS), "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    print(f"sm_{ARCH}a; {PTXAS.name}: {version[-1] if version else '?'}; triton {triton.__version__}")
    print("| kernel | launched by | num_warps | registers | spill stores / loads (bytes) | programs per SM |")
    print("|---|---|---|---|---|---|")
    table: dict[tuple[str, str], tuple[Any, str, list[str]]] = {}
    for dtype, (images, channels, length), (loss, mode) in itertools.product(
        DTYPES, SHAPES, (("CWD", "uniform"), ("HWD", "hwd"))
    ):
        student = torch.empty(images * channels, length, dtype=DTYPES[dtype])
        with recording() as launches:
            _, coef, stats_s, stats_t = _triton_weighting.weighted_forward(
                student, student, None, 4.0, channels, mode, 0.0, 0.5, "mean"
            )
            _triton_backend.backward(student, student, stats_s, stats_t, torch.ones(1), 4.0, coef=coef)
        for launch in launches:
            entry = table.setdefault(launch.key, (launch, describe(launch, dtype), []))
            entry[2].append(f"{loss} {images}x{channels}x{length}")
    # Launches that differ only in what Triton specialised (e.g. a row count divisible by 16 or not) and
    # assemble to the same registers and spills are one row of the table.
    rows: dict[tuple[str, int, int, str], list[str]] = {}
    for launch, label, users in table.values():
        compiled, _ = launch.compile()
        info = ptxas_info(str(compiled.asm["ptx"]))
        spills = f"{info['spill_stores']} / {info['spill_loads']}"
        row = rows.setdefault((label, compiled.metadata.num_warps, info["registers"], spills), [])
        row.extend(user for user in users if user not in row)
    for (label, warps, registers, spills), users in rows.items():
        per_sm = programs_per_sm(registers, warps)
        print(f"| {label} | {', '.join(users)} | {warps} | {registers} | {spills} | {per_sm} |", flush=True)


if __name__ == "__main__":
    main()
