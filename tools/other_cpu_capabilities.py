"""Print the PyTorch CPU kernel sets other than this machine's own, for `make test-other-cpus`.

PyTorch picks its CPU kernels by the processor's vector units (``torch.backends.cpu.get_cpu_capability()``);
``ATEN_CPU_CAPABILITY`` selects a lower set on the same machine. A user's CPU may have fewer units than ours, so
the numerically sensitive tests run again under each lower set this machine can emulate: ``default`` (no
vector kernels) always, and ``avx2`` too where the machine has AVX-512.
"""

from __future__ import annotations

import os

# Lower sets each native set can run, most different first. Arm and POWER builds have only "default" below.
LOWER_SETS = {"AVX512": ["default", "avx2"], "AVX2": ["default"]}


def other_capabilities(native: str) -> list[str]:
    """Return the ``ATEN_CPU_CAPABILITY`` values to test under, given the native capability's name."""
    native = native.upper()
    return LOWER_SETS.get(native, [] if native == "DEFAULT" else ["default"])


def main() -> None:
    """Print the lower kernel sets of this machine, space-separated (nothing on a machine with none)."""
    os.environ.pop("ATEN_CPU_CAPABILITY", None)  # the native set, whatever the caller's environment says
    import torch

    print(" ".join(other_capabilities(torch.backends.cpu.get_cpu_capability())))


if __name__ == "__main__":
    main()
