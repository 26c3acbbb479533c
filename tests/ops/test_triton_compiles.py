"""Every Triton kernel variant compiles for an sm_90 GPU, and for the other GPUs people train on, without one.

The CPU tests run the kernels under the Triton interpreter, which executes them as NumPy code and
cannot see errors that only the compiler reports; ``_compile_kernels.py`` sends each variant through
Triton's whole pipeline down to ``ptxas``, and ``_compile_launches.py`` each specialisation that real
launches at a set of shapes would ask for on an H100 (integers equal to 1 as constants, arguments
divisible by 16 marked so), and a representative subset of them (every kernel variant, fp32, bf16 and fp16)
for sm_75, sm_80, sm_86, sm_89, sm_100 and sm_120, in subprocesses without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("_compile_kernels.py")
LAUNCHES_SCRIPT = Path(__file__).with_name("_compile_launches.py")
MISSING_INTERNALS = 3  # _compile_launches.py's exit status when this Triton lacks the internals it uses


def _nvidia_backend_available() -> bool:
    try:
        return importlib.util.find_spec("triton.backends.nvidia") is not None
    except ImportError:  # triton itself missing
        return False


def _run_without_interpreter(
    script: Path, cache: Path, fp_fusion_default: str = "1", *args: str
) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(cache), "TRITON_DEFAULT_FP_FUSION": fp_fusion_default, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=900)


pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed"),
    pytest.mark.skipif(not _nvidia_backend_available(), reason="this Triton has no NVIDIA backend"),
]


def test_every_kernel_variant_compiles_for_cuda(tmp_path: Path) -> None:
    done = _run_without_interpreter(SCRIPT, tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    compiled = [line for line in done.stdout.splitlines() if line.startswith("ok ")]
    # 16 forward (4 dtypes x split x sqdist), 2 combine, 5 backward, 12 finalize variants.
    assert len(compiled) == 35, done.stdout


def test_launch_specialisations_compile_for_cuda(tmp_path: Path) -> None:
    # With Triton's default FMA contraction off (Triton 3.10's default), as the launchers set it on every launch.
    done = _run_without_interpreter(LAUNCHES_SCRIPT, tmp_path, fp_fusion_default="0")
    if done.returncode == MISSING_INTERNALS:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    compiled = [line for line in done.stdout.splitlines() if line.startswith("ok ")]
    assert len(compiled) > 100, done.stdout
    # The specialisations the general variants miss were among them (the script's last lines).
    ones = dict(line.split(": compiled with each of these equal to 1: ") for line in done.stdout.splitlines()[-4:])
    assert {"num_rows", "row_length"} <= set(ones["channel_kl_forward_kernel"].split(", "))
    assert {"num_rows", "row_length", "grad_kl_stride"} <= set(ones["channel_kl_backward_kernel"].split(", "))
    assert {"num_images", "channels"} <= set(ones["weighted_finalize_kernel"].split(", "))
    forward = [line for line in compiled if line.startswith("ok channel_kl_forward_kernel")]
    assert forward
    assert all(line.endswith("fma: True") for line in forward), forward[:3]


# Kernel variants of the subset: forward (fp32, bf16, fp16) x split x sqdist, combine x sqdist, backward x dtype x
# coefficients, finalize x weighting x reduction x split; each at least once per architecture.
SUBSET_VARIANTS = {
    "channel_kl_forward_kernel": 12,
    "channel_kl_combine_kernel": 2,
    "channel_kl_backward_kernel": 6,
    "weighted_finalize_kernel": 12,
}


def test_launches_compile_for_every_architecture(tmp_path: Path) -> None:
    done = _run_without_interpreter(LAUNCHES_SCRIPT, tmp_path, "0", "archs")
    if done.returncode == MISSING_INTERNALS:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    lines = done.stdout.splitlines()
    unsupported = {line.split(":")[0].removeprefix("unsupported ") for line in lines if line.startswith("unsupported")}
    assert not unsupported & {"sm_80", "sm_86", "sm_89"}, done.stdout  # every Triton that segkd supports has these
    compiled: dict[str, dict[str, int]] = {}
    for line in lines:
        if line.startswith("ok "):
            kernel, arch = line.removeprefix("ok ").split(":")[0].split(" ")
            compiled.setdefault(arch, {}).setdefault(kernel, 0)
            compiled[arch][kernel] += 1
    expected = {f"sm_{arch}" for arch in (75, 80, 86, 89, 100, 120)} - unsupported
    assert set(compiled) == expected, done.stdout
    for arch, kernels in compiled.items():
        assert set(kernels) == set(SUBSET_VARIANTS), (arch, kernels)
        assert all(kernels[name] >= least for name, least in SUBSET_VARIANTS.items()), (arch, kernels)
