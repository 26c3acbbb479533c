"""`import segkd` stays cheap: it loads torch and segkd, not the compiler stack or test/plot libraries.

No timing here (too noisy on shared machines): the tests check which modules an import pulls in, and that
the Triton availability check stays a constant for torch.compile without importing torch._dynamo to say so.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

# `segkd.ops.channel_kl` the attribute is the function; the module is needed for monkeypatching.
channel_kl_module = importlib.import_module("segkd.ops.channel_kl")

# torch._dynamo pulls in sympy, torch.fx's symbolic shapes and Triton: ~1 s on top of `import torch`.
HEAVY_MODULES = ("torch._dynamo", "torch._inductor", "triton", "hypothesis", "matplotlib")
NO_CUSTOM_OP = channel_kl_module._channel_kl_forward_op is None  # torch < 2.4


def _modules_loaded_by(statement: str) -> set[str]:
    probe = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


@pytest.mark.parametrize("statement", ["import segkd", "import segkd.functional, segkd.ops"])
def test_import_does_not_load_compiler_or_test_libraries(statement: str) -> None:
    loaded = _modules_loaded_by(statement)
    assert {"torch", "segkd", "segkd.ops.channel_kl", "segkd.losses.hwd"} <= loaded  # the probe saw the import
    assert sorted(name for name in HEAVY_MODULES if name in loaded) == []
    assert not any(name.startswith("segkd.testing") for name in loaded)


def test_triton_check_is_marked_like_assume_constant_result() -> None:
    # channel_kl sets by hand the attribute(s) that the public decorator sets; if a torch release changes
    # how the decorator marks a function, this fails instead of torch.compile silently breaking the graph.
    def probe() -> bool:
        return True

    marked = torch.compiler.assume_constant_result(probe)
    assert marked is probe
    assert vars(probe), "torch.compiler.assume_constant_result no longer marks the function with an attribute"
    assert vars(probe).items() <= vars(channel_kl_module._triton_available).items()


@pytest.mark.skipif(NO_CUSTOM_OP, reason="torch.library.custom_op needs torch >= 2.4")
def test_triton_check_does_not_break_the_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    # The check imports the launcher module with importlib, where Dynamo would break the graph unless the
    # check is a constant. The torch launcher stands in for the Triton one (same signature), so this runs
    # without Triton; fullgraph=True turns a graph break into an error.
    monkeypatch.setattr(
        channel_kl_module, "_triton_module", lambda: importlib.import_module("segkd.ops._torch_backend")
    )
    monkeypatch.delenv("SEGKD_DISABLE_TRITON", raising=False)
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 4, 5, generator=generator, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 5, generator=generator)

    def loss_fn(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return channel_kl_module.channel_kl(s, t, 2.0, backend="triton").sum()

    compiled = torch.compile(loss_fn, backend="eager", fullgraph=True)
    try:
        torch.testing.assert_close(compiled(student, teacher), loss_fn(student, teacher))
    finally:
        torch._dynamo.reset()
