"""Test-session set-up shared by tests/ and the doctests under src/."""

from __future__ import annotations

import os

# The Triton backend runs on CPU tensors only under the interpreter, which must be switched on before
# anything imports triton (torch._dynamo does when it loads). Leave a CUDA machine, or an explicit choice, alone.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

from hypothesis import HealthCheck, settings

# Profiles: "ci" (default, quick), "dev" (a bit more), "deep" (the fuzz run of `make fuzz`).
settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "deep",
    max_examples=10_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("SEGKD_HYPOTHESIS_PROFILE", "ci"))

# Helper scripts that tests launch as subprocesses: not test modules, and not importable as doctests.
collect_ignore_glob = ["tests/examples/_launch*.py", "tests/ops/_compile_*.py"]


def pytest_report_header() -> str:
    """Name the CPU kernel set in the session header: a failure report says which kernels it ran on."""
    import torch

    return f"torch {torch.__version__}, CPU kernels: {torch.backends.cpu.get_cpu_capability()}"


def pytest_configure() -> None:
    """Refuse to run under an ``ATEN_CPU_CAPABILITY`` that PyTorch did not take: that run would test nothing new."""
    wanted = os.environ.get("ATEN_CPU_CAPABILITY")
    if wanted:
        import pytest
        import torch

        used = torch.backends.cpu.get_cpu_capability()
        if used.replace(" ", "_").lower() != wanted.lower():
            raise pytest.UsageError(f"ATEN_CPU_CAPABILITY={wanted} was asked for, but PyTorch uses {used} kernels")
