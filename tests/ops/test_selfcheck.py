"""The first-use self-check of the Triton backend (``segkd.ops._selfcheck``) and ``backend="auto"``'s fallback.

On CPU ``auto`` never considers Triton, so these tests widen the dispatcher's ``_auto_considers_triton`` to CPU
tensors, where the kernels run under the Triton interpreter; broken launchers (an exception, slightly wrong
values) are patched in. Results are compared with the float64 references of ``segkd.testing.reference``.
"""

from __future__ import annotations

import importlib
import threading
import time
import warnings
from typing import Any

import pytest
import torch

pytest.importorskip("triton")

from segkd.ops import (
    _selfcheck,
    _triton_backend,
    _triton_kernels,
    _triton_weighting,
    channel_kl,
    resolve_backend,
    weighted_channel_kl,
)
from segkd.testing.reference import channel_kl_reference, hwd_loss_reference

channel_kl_module = importlib.import_module("segkd.ops.channel_kl")
CPU = torch.device("cpu")
INTERPRETED = _triton_backend._is_interpreted(_triton_kernels.channel_kl_forward_kernel)

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not INTERPRETED, reason="needs the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py)"),
]


@pytest.fixture
def auto_on_cpu(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.device, torch.dtype]]:
    """``auto`` considers Triton for CPU tensors, with no verdict cached; yields the list of checks run."""
    monkeypatch.setattr(channel_kl_module, "_auto_considers_triton", lambda device: True)
    monkeypatch.delenv("SEGKD_DISABLE_TRITON", raising=False)
    monkeypatch.setattr(_selfcheck, "_verdicts", {})
    checks: list[tuple[torch.device, torch.dtype]] = []
    real_run_check = _selfcheck.run_check

    def counting_run_check(device: torch.device, dtype: torch.dtype) -> str | None:
        checks.append((device, dtype))
        return real_run_check(device, dtype)

    monkeypatch.setattr(_selfcheck, "run_check", counting_run_check)
    return checks


@pytest.fixture
def triton_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts the Triton launchers' forward and backward calls (the self-check's among them)."""
    calls: list[str] = []
    for name in ("forward", "backward"):
        real = getattr(_triton_backend, name)

        def counting(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(_triton_backend, name, counting)
    return calls


def _pair(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=generator, dtype=torch.float64) * 3).to(dtype)
    teacher = (torch.randn(shape, generator=generator, dtype=torch.float64) * 3).to(dtype)
    return student.requires_grad_(), teacher


def _assert_channel_kl_right(student: torch.Tensor, teacher: torch.Tensor, tau: float = 2.0) -> None:
    """``channel_kl`` (auto) and its gradient against the float64 reference."""
    kl = channel_kl(student, teacher, tau)
    (grad,) = torch.autograd.grad(kl.sum(), student)
    student64 = student.detach().double().requires_grad_()
    ref_kl, _ = channel_kl_reference(student64, teacher.double(), tau)
    (ref_grad,) = torch.autograd.grad(ref_kl.sum(), student64)
    torch.testing.assert_close(kl.double(), ref_kl, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=4e-6)


def _break(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, error: Exception) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(module, name, broken)


def test_passing_check_runs_once_and_auto_then_uses_triton(
    auto_on_cpu: list[tuple[torch.device, torch.dtype]], triton_calls: list[str]
) -> None:
    student, teacher = _pair((2, 3, 5, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_channel_kl_right(student, teacher)
        assert auto_on_cpu == [(CPU, torch.float32)]
        assert _selfcheck.passed(CPU, torch.float32)
        checked = len(triton_calls)
        _assert_channel_kl_right(student, teacher)
    assert auto_on_cpu == [(CPU, torch.float32)]  # cached: not run again
    assert triton_calls[checked:] == ["forward", "backward"]  # the call itself ran on Triton
    assert resolve_backend("auto", CPU, torch.float32) == "triton"


def test_compile_error_falls_back_to_torch_with_one_warning(
    auto_on_cpu: list[tuple[torch.device, torch.dtype]], monkeypatch: pytest.MonkeyPatch
) -> None:
    compile_error = importlib.import_module("triton.compiler.errors").CompilationError
    real_kernel_for = _triton_backend._kernel_for

    class Fp32ForwardFailsToCompile:
        def __init__(self, kernel: Any) -> None:
            self.kernel = kernel

        def __getitem__(self, grid: Any) -> Any:
            def launch(*args: Any, **kwargs: Any) -> Any:
                if args[0].dtype == torch.float32:
                    raise compile_error(None, None, "unsupported conversion from fp32")  # type: ignore[arg-type]
                return self.kernel[grid](*args, **kwargs)

            return launch

    def kernel_for(kernel: Any, device: torch.device) -> Any:
        compiled = real_kernel_for(kernel, device)
        return Fp32ForwardFailsToCompile(compiled) if kernel is _triton_kernels.channel_kl_forward_kernel else compiled

    monkeypatch.setattr(_triton_backend, "_kernel_for", kernel_for)
    student, teacher = _pair((2, 3, 5, 7))
    message = (
        r"Triton kernels failed their first-use self-check on cpu \(Triton interpreter\) for torch\.float32 "
        r"\(channel_kl forward and backward, whole rows: CompilationError: unsupported conversion from fp32\)\. "
        r"backend='auto' uses the PyTorch backend for this device and dtype from now on"
    )
    with pytest.warns(RuntimeWarning, match=message):
        _assert_channel_kl_right(student, teacher)
    assert not _selfcheck.passed(CPU, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the verdict is cached
        _assert_channel_kl_right(student, teacher)
        assert resolve_backend("auto", CPU, torch.float32) == "torch"
        # Cached per dtype: bf16 compiles here, passes its own check and runs on Triton.
        assert resolve_backend("auto", CPU, torch.bfloat16) == "triton"
    assert auto_on_cpu == [(CPU, torch.float32), (CPU, torch.bfloat16)]
    with pytest.raises(compile_error, match="unsupported conversion"):  # backend="triton" skips the check, raises
        channel_kl(student, teacher, 2.0, backend="triton")
    assert len(auto_on_cpu) == 2


def test_slightly_wrong_gradient_falls_back(
    auto_on_cpu: list[tuple[torch.device, torch.dtype]], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_backward = _triton_backend.backward

    def off_by_a_thousandth(*args: Any, **kwargs: Any) -> torch.Tensor:
        return real_backward(*args, **kwargs) * 1.001

    monkeypatch.setattr(_triton_backend, "backward", off_by_a_thousandth)
    student, teacher = _pair((2, 3, 5, 7))
    message = (
        r"for torch\.float32 \(channel_kl forward and backward, whole rows: gradient differs from the torch backend"
    )
    with pytest.warns(RuntimeWarning, match=message):
        _assert_channel_kl_right(student, teacher)
    assert resolve_backend("auto", CPU, torch.float32) == "torch"


def test_launch_error_in_the_loss_kernel_falls_back_for_hwd(
    auto_on_cpu: list[tuple[torch.device, torch.dtype]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The row kernels work; the finalize of the fused loss fails to launch.
    error = RuntimeError("Triton Error [CUDA]: too many resources requested for launch")
    _break(monkeypatch, _triton_weighting, "_launch", error)
    student, teacher = _pair((2, 4, 6, 5), seed=3)
    message = r"\(HWD loss forward and backward, whole rows: RuntimeError: Triton Error \[CUDA\]: too many resources"
    with pytest.warns(RuntimeWarning, match=message):
        loss = weighted_channel_kl(student, teacher, 2.0, "hwd", mu=0.0, beta=0.5)
    (grad,) = torch.autograd.grad(loss, student)
    student64 = student.detach().double().requires_grad_()
    reference = hwd_loss_reference(student64, teacher.double(), tau=2.0, mu=0.0, beta=0.5)
    (ref_grad,) = torch.autograd.grad(reference, student64)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)


def test_mismatch_in_split_rows_is_caught(
    auto_on_cpu: list[tuple[torch.device, torch.dtype]], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_forward = _triton_backend.forward

    def wrong_when_split(
        student: torch.Tensor, teacher: torch.Tensor, tau: float, need_sqdist: bool, plan: Any = None
    ) -> tuple[Any, ...]:
        kl, sqdist, stats_s, stats_t = real_forward(student, teacher, tau, need_sqdist, plan)
        if plan is not None and plan[0] > 1:
            kl = kl * (1 + 1e-3)
        return kl, sqdist, stats_s, stats_t

    monkeypatch.setattr(_triton_backend, "forward", wrong_when_split)
    failure = _selfcheck.run_check(CPU, torch.float16)  # whole rows pass, so the split step is the first to fail
    assert failure is not None
    assert failure.startswith(
        "channel_kl forward and backward, split rows: KL differs from the torch backend by up to "
    )


def test_disabled_triton_skips_the_check(
    auto_on_cpu: list[tuple[torch.device, torch.dtype]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEGKD_DISABLE_TRITON", "1")
    assert resolve_backend("auto", CPU, torch.float32) == "torch"
    assert resolve_backend("triton", CPU, torch.float32) == "torch"
    assert auto_on_cpu == []


def test_explicit_triton_backend_skips_the_check(
    auto_on_cpu: list[tuple[torch.device, torch.dtype]], triton_calls: list[str]
) -> None:
    student, teacher = _pair((1, 2, 9))
    channel_kl(student, teacher, 2.0, backend="triton").sum().backward()
    assert triton_calls == ["forward", "backward"]
    assert auto_on_cpu == []


def test_check_does_not_run_while_compiling(
    auto_on_cpu: list[tuple[torch.device, torch.dtype]], triton_calls: list[str]
) -> None:
    student, teacher = _pair((1, 2, 3, 3))

    def loss_fn(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return channel_kl(s, t, 2.0).sum()

    ref_kl, _ = channel_kl_reference(student.detach().double(), teacher.double(), 2.0)
    torch._dynamo.reset()
    try:
        # No verdict yet: the traced graph uses the torch backend, and nothing is checked or cached.
        value = torch.compile(loss_fn, backend="eager", fullgraph=True)(student, teacher)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(value.double(), ref_kl.sum(), rtol=2e-5, atol=2e-6)
    assert auto_on_cpu == []
    assert triton_calls == []
    assert _selfcheck._verdicts == {}
    # With a verdict (passed in eager mode before), the traced graph uses Triton.
    _selfcheck._verdicts[_selfcheck._key(CPU, torch.float32)] = True
    try:
        compiled = torch.compile(loss_fn, backend="eager", fullgraph=True)
        value = compiled(student, teacher)
    finally:
        torch._dynamo.reset()
    assert triton_calls == ["forward"]
    torch.testing.assert_close(value.double(), ref_kl.sum(), rtol=2e-5, atol=2e-6)
    assert auto_on_cpu == []


def test_check_does_not_run_while_capturing_a_cuda_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_selfcheck, "_verdicts", {})
    monkeypatch.setattr(_selfcheck, "compiled_for", lambda device, dtype: True)
    monkeypatch.setattr(_selfcheck, "_capturing", lambda device: True)
    monkeypatch.setattr(_selfcheck, "run_check", lambda device, dtype: pytest.fail("ran during a capture"))
    assert not _selfcheck.triton_works(torch.device("cuda", 0), torch.float32)
    assert _selfcheck._verdicts == {}  # nothing cached: an eager call later checks


def test_old_gpus_are_left_to_torch_without_a_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_selfcheck, "_verdicts", {})
    monkeypatch.setattr(_selfcheck, "_capturing", lambda device: False)
    checked: list[torch.dtype] = []
    monkeypatch.setattr(_selfcheck, "run_check", lambda device, dtype: checked.append(dtype))
    capability = [(7, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _selfcheck.triton_works(torch.device("cuda", 0), torch.float32)  # V100: below sm_75
        capability[0] = (7, 5)
        assert _selfcheck.triton_works(torch.device("cuda", 1), torch.float32)  # T4: checked (stubbed: passes)
    assert checked == [torch.float32]


def test_concurrent_first_calls_run_one_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_selfcheck, "_verdicts", {})
    runs: list[int] = []

    def slow_check(device: torch.device, dtype: torch.dtype) -> None:
        runs.append(1)
        time.sleep(0.05)
        # Re-entered from inside the check (as a loss inside it would): no second check, no deadlock.
        assert not _selfcheck.triton_works(device, dtype)

    monkeypatch.setattr(_selfcheck, "run_check", slow_check)
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda: results.append(_selfcheck.triton_works(CPU, torch.float16))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert runs == [1]
    assert results == [True] * 8
