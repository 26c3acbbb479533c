"""Registers and spills of the Triton kernels as the launchers configure them, from ``ptxas -v`` (no GPU needed).

Not a test. The launches of a CWD and an HWD forward+backward at the benchmark's shapes
(``bench_channel_kl.py``), fp32 and bf16 (fp16 too with ``--fp16``), are recorded on CPU tensors with the row
split an H100 would get, and specialised on their arguments as Triton's launcher does on a GPU (integers equal
to 1 as constants, pointers and integers divisible by 16 marked so: the recorder of
``tests/ops/_compile_launches.py``). Each distinct one is compiled through Triton's pipeline for each
architecture asked for (``--arch``, default sm_90), and its PTX assembled again with the ``ptxas`` that the
Triton wheel bundles for that architecture, with ``-v``: registers per thread, spill stores and loads (bytes),
and the occupancy that follows from the registers (at most 65536 registers per SM; 2048 threads per SM, 1536 on
sm_86/sm_89/sm_120, 1024 on sm_75). ``--summary`` prints one line per architecture and kernel instead of one per
launch. Run it without ``TRITON_INTERPRET`` (``triton.jit`` reads it when the kernels are decorated)::

    python benchmarks/triton_registers.py
    python benchmarks/triton_registers.py --arch 75 80 86 89 90 100 120 --fp16 --summary
"""

from __future__ import annotations

import argparse
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
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

from segkd.ops import _triton_backend, _triton_weighting

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "ops"))
from _compile_launches import recording, target  # the launch recorder the compile test uses

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (N, C, H * W): the benchmark shapes, and rows whose length is not a multiple of 16 (65x65, from 513x513 crops).
SHAPES = [(8, 19, 64 * 128), (8, 150, 64 * 64), (8, 171, 64 * 64), (16, 150, 128 * 128), (8, 21, 65 * 65)]
REGISTERS_PER_SM = 65536
THREADS_PER_SM = {75: 1024, 86: 1536, 89: 1536, 120: 1536}  # 2048 on the others (sm_80, sm_90, sm_100)


def ptxas_path(arch: int) -> Path:
    """The ptxas Triton itself uses for this target."""
    return Path(get_ptxas(arch).path)


def ptxas_info(ptx: str, arch: int) -> dict[str, int]:
    """Registers and spill bytes of the one kernel in ``ptx``, from ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        done = subprocess.run(
            [
                str(ptxas_path(arch)),
                "-v",
                "--regAllocOptLevel=2",
                f"--gpu-name={sm_arch_from_capability(arch)}",
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


def programs_per_sm(registers: int, num_warps: int, arch: int) -> int:
    threads = 32 * num_warps
    return min(THREADS_PER_SM.get(arch, 2048) // threads, REGISTERS_PER_SM // max(1, registers * threads))


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


def table_rows(arch: int, dtypes: list[str]) -> dict[tuple[str, int, int, str], list[str]]:
    """``(label, num_warps, registers, spills) -> launched by`` for the CWD and HWD launches compiled for ``arch``."""
    table: dict[tuple[str, str], tuple[Any, str, list[str]]] = {}
    for dtype, (images, channels, length), (loss, mode) in itertools.product(
        dtypes, SHAPES, (("CWD", "uniform"), ("HWD", "hwd"))
    ):
        student = torch.empty(images * channels, length, dtype=DTYPES[dtype])
        with recording(target=target(arch)) as launches:
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
        info = ptxas_info(str(compiled.asm["ptx"]), arch)
        spills = f"{info['spill_stores']} / {info['spill_loads']}"
        row = rows.setdefault((label, compiled.metadata.num_warps, info["registers"], spills), [])
        row.extend(user for user in users if user not in row)
    return rows


def summary(arch: int, rows: dict[tuple[str, int, int, str], list[str]]) -> list[str]:
    """One line per kernel (forward whole rows, forward split, combine, backward, finalize) for ``arch``."""
    groups: dict[str, list[tuple[int, int, str]]] = {}
    for label, warps, registers, spills in rows:
        kernel = label.split(" ")[0]
        if kernel == "forward":
            kernel = "forward (split)" if "split" in label else "forward (whole rows)"
        groups.setdefault(kernel, []).append((registers, warps, spills))
    lines = []
    for kernel, entries in groups.items():
        registers = [entry[0] for entry in entries]
        spilled = [entry[2] for entry in entries if entry[2] != "0 / 0"]
        fewest = min(programs_per_sm(r, w, arch) for r, w, _ in entries)
        lines.append(
            f"| sm_{arch} | {kernel} | {min(registers)}-{max(registers)} | {', '.join(spilled) or 'none'} | {fewest} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--fp16", action="store_true", help="also the fp16 launches")
    parser.add_argument("--summary", action="store_true", help="one line per architecture and kernel")
    args = parser.parse_args()
    dtypes = ["fp32", "bf16", "fp16"] if args.fp16 else ["fp32", "bf16"]
    print(f"triton {triton.__version__}; dtypes {', '.join(dtypes)}")
    if args.summary:
        print("| arch | kernel | registers | spill stores / loads (bytes) | fewest programs per SM |")
        print("|---|---|---|---|---|")
    for arch in args.arch:
        version = subprocess.run([str(ptxas_path(arch)), "--version"], capture_output=True, text=True).stdout
        lines = version.strip().splitlines()
        rows = table_rows(arch, dtypes)
        if args.summary:
            print("\n".join(summary(arch, rows)), flush=True)
            continue
        print(f"{sm_arch_from_capability(arch)}; {ptxas_path(arch).name}: {lines[-1] if lines else '?'}")
        print("| kernel | launched by | num_warps | registers | spill stores / loads (bytes) | programs per SM |")
        print("|---|---|---|---|---|---|")
        for (label, warps, registers, spills), users in rows.items():
            per_sm = programs_per_sm(registers, warps, arch)
            print(f"| {label} | {', '.join(users)} | {warps} | {registers} | {spills} | {per_sm} |", flush=True)


if __name__ == "__main__":
    main()
