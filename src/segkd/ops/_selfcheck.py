"""First-use self-check of the Triton backend, for ``backend="auto"``.

The first time ``auto`` would send a ``(device, dtype)`` to Triton, :func:`triton_works` runs the Triton
launchers and the PyTorch reference on a small fixed input, forward and backward, on whole rows and on rows
split into segments, through ``channel_kl`` and through the fused HWD loss, and compares them within
:data:`TOLERANCES`. A compile error, a launch error or a mismatch gives one ``RuntimeWarning`` that names the
GPU, the dtype and what failed, and the verdict is cached: ``auto`` uses the torch backend for that
``(device, dtype)`` from then on. Devices below :data:`MIN_CAPABILITY` (what the compile test does not cover)
are left to the torch backend without a check or a warning.

The check never runs while ``torch.compile`` traces (:func:`passed` then reads the cached verdict only) or
while the current CUDA stream is being captured into a graph (the call uses the torch backend and nothing
is cached), nor re-entrantly; one lock makes concurrent first calls run it once.
"""

from __future__ import annotations

import importlib
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from segkd.ops import _torch_backend, _weighting

__all__ = ["MIN_CAPABILITY", "TOLERANCES", "compiled_for", "passed", "reset", "run_check", "triton_works"]

# The oldest architecture the compile test (tests/ops/test_triton_compiles.py) compiles for: sm_75 (T4).
MIN_CAPABILITY = (7, 5)
# (rtol, atol) of each comparison, Triton against the torch backend, by the inputs' dtype. Forward values are
# fp32 (fp64 for fp64 inputs) whatever the dtype; the gradient has the inputs' dtype and each backend rounds
# it once, so it may differ by one unit in the last place (bf16: 2^-8 relative). atol is relative to the
# largest magnitude of the reference value compared. These are the bounds of tests/ops/test_channel_kl_triton.py
# and of the fuzz tests (docs/reliability.md) for logits of a few units.
TOLERANCES: dict[torch.dtype, dict[str, tuple[float, float]]] = {
    torch.float64: {"forward": (1e-10, 1e-13), "gradient": (1e-10, 1e-13)},
    torch.float32: {"forward": (1e-4, 4e-6), "gradient": (1e-4, 4e-6)},
    torch.float16: {"forward": (1e-4, 4e-6), "gradient": (2e-3, 4e-6)},
    torch.bfloat16: {"forward": (1e-4, 4e-6), "gradient": (1.6e-2, 4e-6)},
}
TAU = 2.0
GRAD_LOSS = 0.75  # the incoming gradient of the loss
WHOLE_ROWS = (2, 3, 300)  # (N, C, L): rows read whole, a length no multiple of 16
SPLIT_ROWS = (1, 3, 2348)  # few long rows: split into a whole chunk and a short last segment

_TRITON_LAUNCHERS = "segkd.ops._triton_backend"
_TRITON_WEIGHTING = "segkd.ops._triton_weighting"
_lock = threading.RLock()
_state = threading.local()  # .running: this thread is inside run_check
_verdicts: dict[tuple[str, int | None, torch.dtype], bool] = {}


def _key(device: torch.device, dtype: torch.dtype) -> tuple[str, int | None, torch.dtype]:
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return device.type, index, dtype


def passed(device: torch.device, dtype: torch.dtype) -> bool:
    """The cached verdict for ``(device, dtype)``: ``True`` only once the check has passed there; never runs it."""
    return _verdicts.get(_key(device, dtype), False)


# A constant for torch.compile, as channel_kl._triton_available: Dynamo runs it instead of tracing a dict lookup.
passed._dynamo_marked_constant = True  # type: ignore[attr-defined]


def reset() -> None:
    """Forget every verdict (the next ``auto`` call on each ``(device, dtype)`` checks again)."""
    with _lock:
        _verdicts.clear()


def compiled_for(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernels are compile-tested for ``device``: CUDA of compute capability ``MIN_CAPABILITY`` or more.

    The compile test covers fp32, bf16 and fp16 on every architecture from sm_75, and fp64 on sm_90; other
    device types (the interpreter on CPU, reachable only when a test makes ``auto`` consider it) pass.
    """
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def triton_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``auto`` may use Triton for ``(device, dtype)``: checked on first use, then cached.

    Not compile-tested (:func:`compiled_for`): ``False``. While compiling, capturing a CUDA graph, or
    re-entered from the check itself: the cached verdict, ``False`` if there is none yet, and nothing is run.
    """
    key = _key(device, dtype)
    verdict = _verdicts.get(key)
    if verdict is not None:
        return verdict
    if torch.compiler.is_compiling() or getattr(_state, "running", False) or _capturing(device):
        return False
    with _lock:
        verdict = _verdicts.get(key)
        if verdict is None:
            verdict = compiled_for(device, dtype) and _check_and_warn(device, dtype)
            _verdicts[key] = verdict
    return verdict


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _check_and_warn(device: torch.device, dtype: torch.dtype) -> bool:
    _state.running = True
    try:
        failure = run_check(device, dtype)
    finally:
        _state.running = False
    if failure is None:
        return True
    warnings.warn(
        f"segkd: the Triton kernels failed their first-use self-check on {_device_name(device)} for {dtype} "
        f"({failure}). backend='auto' uses the PyTorch backend for this device and dtype from now on; "
        "backend='triton' still runs the kernels, SEGKD_DISABLE_TRITON=1 skips them and this check.",
        RuntimeWarning,
        stacklevel=5,
    )
    return False


def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return f"{device} (Triton interpreter)"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} ({device}, sm_{major}{minor})"


def _module(name: str) -> Any:
    return sys.modules.get(name) or importlib.import_module(name)


def run_check(device: torch.device, dtype: torch.dtype) -> str | None:
    """Run the Triton launchers against the torch backend on ``device`` in ``dtype``: ``None``, or what failed.

    Exceptions (a compile or launch error) are caught and described; a CUDA error that poisons the context
    shows up again in the next operation, whichever backend runs it.
    """
    step = "importing the Triton launchers"
    try:
        triton, weighting = _module(_TRITON_LAUNCHERS), _module(_TRITON_WEIGHTING)
        with torch.no_grad(), torch.inference_mode(False), torch.autocast(device.type, enabled=False):
            for step, compare in _steps(triton, weighting, device, dtype):
                failure = compare()
                if failure is not None:
                    return f"{step}: {failure}"
    except Exception as error:  # any compile or launch error means: do not use Triton here
        return f"{step}: {type(error).__name__}: {_first_line(error)}"
    return None


def _first_line(error: BaseException) -> str:
    """The message's first line; Triton's ``CompilationError`` puts a source excerpt first, its message last."""
    text = (getattr(error, "error_message", None) or str(error)).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def _inputs(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device, seed: int) -> tuple[Tensor, ...]:
    images, channels, length = shape
    generator = torch.Generator().manual_seed(seed)
    pair = torch.randn(2, images * channels, length, generator=generator, dtype=torch.float64) * 3.0
    student, teacher = pair.to(dtype).to(device).unbind(0)
    grad_kl = torch.randn(images * channels, generator=generator, dtype=torch.float64)
    return student, teacher, grad_kl


def _steps(
    triton: Any, weighting: Any, device: torch.device, dtype: torch.dtype
) -> list[tuple[str, Callable[[], str | None]]]:
    """The labelled comparisons, run in order; each returns ``None`` or the mismatch it found."""
    steps: list[tuple[str, Callable[[], str | None]]] = []
    for label, shape, seed in (("whole rows", WHOLE_ROWS, 0), ("split rows", SPLIT_ROWS, 1)):
        student, teacher, grad_kl = _inputs(shape, dtype, device, seed)
        length = shape[2]
        block = min(triton.next_power_of_2(length), triton.FORWARD_MAX_BLOCK_L)
        plan = (1, length) if label == "whole rows" else (triton.cdiv(length, block), block)
        steps.append(
            (f"channel_kl forward and backward, {label}", _channel_kl_step(triton, student, teacher, grad_kl, plan))
        )
        hwd = _hwd_step(triton, weighting, student, teacher, shape[1], plan)
        steps.append((f"HWD loss forward and backward, {label}", hwd))
    return steps


def _channel_kl_step(
    triton: Any, student: Tensor, teacher: Tensor, grad_kl: Tensor, plan: tuple[int, int]
) -> Callable[[], str | None]:
    """``channel_kl``'s launchers with the forward ``plan`` (whole or split rows), then the backward."""

    def step() -> str | None:
        kl, sqdist, stats_s, stats_t = triton.forward(student, teacher, TAU, True, plan)
        ref_kl, ref_sqdist, lse_s, lse_t = _torch_backend.forward(student, teacher, TAU, True)
        dtype = student.dtype
        if sqdist is None or ref_sqdist is None:
            return "no squared distance returned"
        mismatch = _compare("KL", kl, ref_kl, dtype, "forward")
        mismatch = mismatch or _compare("squared distance", sqdist, ref_sqdist, dtype, "forward")
        if mismatch:
            return mismatch
        grad_rows = grad_kl.to(ref_kl.dtype).to(student.device)
        grad = triton.backward(student, teacher, stats_s, stats_t, grad_rows, TAU)
        ref = _torch_backend.backward(student, teacher, lse_s, lse_t, grad_rows, TAU)
        return _compare("gradient", grad, ref, dtype, "gradient")

    return step


def _hwd_step(
    triton: Any, weighting: Any, student: Tensor, teacher: Tensor, channels: int, plan: tuple[int, int]
) -> Callable[[], str | None]:
    """The fused HWD loss with the forward ``plan`` (rows, then the finalize), then its one-launch backward."""

    def step() -> str | None:
        loss, coef, stats_s, stats_t = weighting.weighted_forward(
            student, teacher, None, TAU, channels, "hwd", 0.0, 0.5, "mean", plan
        )
        ref_kl, ref_sqdist, lse_s, lse_t = _torch_backend.forward(student, teacher, TAU, True)
        ref_loss, ref_coef = _weighting.finalize(ref_kl, ref_sqdist, channels, "hwd", 0.0, 0.5, TAU * TAU, "mean")
        dtype = student.dtype
        mismatch = _compare("loss", loss, ref_loss, dtype, "forward")
        mismatch = mismatch or _compare("coefficients", coef, ref_coef, dtype, "forward")
        if mismatch:
            return mismatch
        grad_loss = torch.full((1,), GRAD_LOSS, dtype=ref_kl.dtype, device=student.device)
        grad = triton.backward(student, teacher, stats_s, stats_t, grad_loss, TAU, coef=coef)
        ref = _torch_backend.backward(student, teacher, lse_s, lse_t, (ref_coef * GRAD_LOSS).contiguous(), TAU)
        return _compare("gradient", grad, ref, dtype, "gradient")

    return step


def _compare(what: str, value: Tensor, reference: Tensor, dtype: torch.dtype, kind: str) -> str | None:
    """``None`` when ``value`` is within :data:`TOLERANCES` of ``reference``, else the largest difference."""
    rtol, atol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])[kind]
    if value.shape != reference.shape:
        return f"{what} has shape {tuple(value.shape)}, expected {tuple(reference.shape)}"
    value, reference = value.to(torch.float64), reference.to(torch.float64)
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    error = (value - reference).abs()
    bound = atol * scale + rtol * reference.abs()
    if bool(torch.isfinite(value).all()) and bool((error <= bound).all()):
        return None
    worst = float(torch.nan_to_num(error / bound.clamp_min(1e-300), nan=float("inf")).max())
    return f"{what} differs from the torch backend by up to {float(error.max()):.3g} ({worst:.3g}x the tolerance)"
