"""Every Triton kernel variant compiles for an sm_90 GPU, checked on a machine without one.

The CPU tests run the kernels under the Triton interpreter, which executes them as NumPy code and
cannot see errors that only the compiler reports; ``_compile_kernels.py`` sends each variant through
Triton's whole pipeline down to ``ptxas``, in a subprocess without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("_compile_kernels.py")


def _nvidia_backend_available() -> bool:
    try:
        return importlib.util.find_spec("triton.backends.nvidia") is not None
    except ImportError:  # triton itself missing
        return False


@pytest.mark.triton
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.skipif(not _nvidia_backend_available(), reason="this Triton has no NVIDIA backend")
def test_every_kernel_variant_compiles_for_cuda(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    compiled = [line for line in done.stdout.splitlines() if line.startswith("ok ")]
    # 16 forward (4 dtypes x split x sqdist), 2 combine, 5 backward, 12 finalize variants.
    assert len(compiled) == 35, done.stdout
