"""``segkd.ops.weighted_channel_kl`` (the fused weighted KL loss) against a float64 reference.

The reference is written here from the formula with ``segkd.testing.reference`` (float64, no
import from ``segkd.ops``): ``tau^2 * reduce(w * KL)``, its gradient by float64 autograd with the
weights held constant. Both backends are tested; the Triton one runs under the interpreter on CPU
(the root conftest.py sets ``TRITON_INTERPRET=1``), so shapes are small. The Triton finalize kernel
is also compared with the PyTorch finalize directly, on the edge cases of HWD's weights.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # effective only if nothing imported Triton earlier

from segkd.functional import cwd_loss, hwd_loss, weighted_channel_kl
from segkd.ops import _weighting, available_backends
from segkd.testing.reference import channel_kl_reference, hwd_weights_from_divergence_reference

HAS_TRITON = "triton" in available_backends()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _triton_runs_here() -> bool:
    if not HAS_TRITON:
        return False
    if DEVICE.type == "cuda":
        return True
    backend = importlib.import_module("segkd.ops._triton_backend")
    kernels = importlib.import_module("segkd.ops._triton_kernels")
    return bool(backend._is_interpreted(kernels.channel_kl_forward_kernel))


TRITON_OK = _triton_runs_here()
needs_triton = pytest.mark.skipif(
    not TRITON_OK, reason="Triton not installed, or imported before TRITON_INTERPRET=1 on a CPU-only machine"
)
BACKENDS = ["torch", pytest.param("triton", marks=[needs_triton, pytest.mark.triton])]
# "triton-split": the Triton backend with its rows split into segments (the tests/ops/conftest.py fixture);
# "torch-recompute": the torch backend as on CUDA, saving inputs and row statistics rather than p_S - p_T.
BACKENDS_WITH_SPLIT = [
    *BACKENDS,
    "torch-recompute",
    pytest.param("triton-split", marks=[needs_triton, pytest.mark.triton]),
]


def _backend(name: str, request: pytest.FixtureRequest, rows: int, row_length: int) -> str:
    """The concrete backend of a ``BACKENDS_WITH_SPLIT`` name, set up as the name says."""
    if name == "torch-recompute":
        monkeypatch = request.getfixturevalue("monkeypatch")
        monkeypatch.setattr(importlib.import_module("segkd.ops.weighted_kl"), "keeps_direction", lambda *_: False)
        return "torch"
    if name != "triton-split":
        return name
    request.getfixturevalue("split_rows")
    plan = importlib.import_module("segkd.ops._triton_backend").plan_segments
    assert plan(rows, row_length, DEVICE)[0] > 1
    return "triton"


# Tolerances against the float64 reference, on inputs already rounded to the dtype.
TOLERANCES = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 2e-5, "atol": 2e-6},
    torch.bfloat16: {"rtol": 2e-5, "atol": 2e-6},
}
GRAD_TOLERANCES = {
    torch.float64: {"rtol": 1e-9, "atol": 1e-13},
    torch.float32: {"rtol": 1e-4, "atol": 1e-7},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-6},
}


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int, spread: float = 2.0) -> tuple[Any, Any]:
    generator = torch.Generator().manual_seed(seed)
    student = (spread * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)
    teacher = (spread * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)
    return student.to(DEVICE), teacher.to(DEVICE)


def _reference_weights(student: Any, teacher: Any, tau: float, weights: Any, mu: float, beta: float) -> Any:
    """``(N, C)`` float64 weights, from the reference for ``"hwd"``, ones for ``"uniform"``."""
    with torch.no_grad():
        _, sqdist = channel_kl_reference(student.double().cpu(), teacher.double().cpu(), tau)
    if isinstance(weights, str):
        if weights == "uniform":
            return torch.ones_like(sqdist)
        return hwd_weights_from_divergence_reference(sqdist, mu, beta)
    return weights.detach().double().cpu()


def _reference_loss_and_grad(
    student: Any, teacher: Any, tau: float, weights: Any, reduction: str, grad_output: Any, mu: float, beta: float
) -> tuple[Any, Any]:
    w = _reference_weights(student, teacher, tau, weights, mu, beta)
    s = student.detach().double().cpu().requires_grad_(True)
    kl, _ = channel_kl_reference(s, teacher.double().cpu(), tau)
    terms = tau * tau * w * kl
    loss = {"mean": terms.mean, "sum": terms.sum, "none": lambda: terms}[reduction]()
    (grad,) = torch.autograd.grad(loss, s, grad_output.double().cpu())
    return loss.detach(), grad


@pytest.mark.parametrize("backend", BACKENDS_WITH_SPLIT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighting", ["uniform", "hwd", "given"])
def test_matches_float64_reference(
    backend: str, dtype: torch.dtype, reduction: str, weighting: str, request: pytest.FixtureRequest
) -> None:
    backend = _backend(backend, request, 15, 63)
    student, teacher = _inputs((3, 5, 7, 9), dtype, seed=1)
    tau, mu, beta = 2.5, 0.5, 0.1
    weights: Any = weighting
    if weighting == "given":
        weights = torch.rand(3, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
        weights = weights.to(DEVICE)
    student.requires_grad_(True)
    loss = weighted_channel_kl(student, teacher, tau, weights, mu=mu, beta=beta, reduction=reduction, backend=backend)
    grad_output = torch.randn(loss.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    loss.backward(grad_output.to(loss.dtype).to(DEVICE))
    expected_loss, expected_grad = _reference_loss_and_grad(
        student, teacher, tau, weights, reduction, grad_output.to(loss.dtype), mu, beta
    )
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == ((3, 5) if reduction == "none" else ())
    torch.testing.assert_close(loss.detach().double().cpu(), expected_loss, **TOLERANCES[dtype])
    assert student.grad is not None
    assert student.grad.dtype == dtype
    scale = expected_grad.abs().max().item()
    tolerance = GRAD_TOLERANCES[dtype]
    torch.testing.assert_close(
        student.grad.double().cpu(), expected_grad, rtol=tolerance["rtol"], atol=tolerance["atol"] + 4e-6 * scale
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_cwd_and_hwd_are_the_fused_op(backend: str) -> None:
    """CWD is ``weights="uniform"``; HWD (prob) is ``"hwd"``; HWD (logits) is its weights, given."""
    student, teacher = _inputs((2, 4, 5, 6), torch.float32, seed=4)
    torch.testing.assert_close(
        cwd_loss(student, teacher, 3.0, backend=backend),
        weighted_channel_kl(student, teacher, 3.0, "uniform", backend=backend),
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(
        hwd_loss(student, teacher, 3.0, 1.0, 0.1, backend=backend),
        weighted_channel_kl(student, teacher, 3.0, "hwd", mu=1.0, beta=0.1, backend=backend),
        rtol=0,
        atol=0,
    )
    logits_distance = (student.double() - teacher.double()).flatten(2).square().sum(2)
    weights = hwd_weights_from_divergence_reference(logits_distance.cpu(), 1.0, 0.1)
    expected = _reference_loss_and_grad(student, teacher, 3.0, weights, "mean", torch.tensor(1.0), 1.0, 0.1)[0]
    actual = hwd_loss(student, teacher, 3.0, 1.0, 0.1, distance="logits", backend=backend)
    torch.testing.assert_close(actual.double().cpu(), expected, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_weights(backend: str) -> None:
    """Given ones equal uniform exactly; zero weights give an exact zero loss and gradient."""
    student, teacher = _inputs((2, 3, 4, 4), torch.float32, seed=5)
    student.requires_grad_(True)
    ones = torch.ones(2, 3, device=DEVICE)
    for reduction in ("mean", "sum", "none"):
        uniform = weighted_channel_kl(student, teacher, 2.0, "uniform", reduction=reduction, backend=backend)
        given = weighted_channel_kl(student, teacher, 2.0, ones, reduction=reduction, backend=backend)
        assert torch.equal(uniform, given)
    loss = weighted_channel_kl(student, teacher, 2.0, torch.zeros(2, 3, device=DEVICE), backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert student.grad is not None
    assert torch.count_nonzero(student.grad).item() == 0
    # One-hot weights isolate one channel: the other channels get an exactly zero gradient.
    student.grad = None
    one_hot = torch.zeros(2, 3, device=DEVICE)
    one_hot[1, 2] = 1.0
    weighted_channel_kl(student, teacher, 2.0, one_hot, reduction="sum", backend=backend).backward()
    nonzero = student.grad.flatten(2).abs().sum(2) > 0
    assert nonzero.tolist() == [[False, False, False], [False, False, True]]


def test_gradcheck_float64() -> None:
    student, teacher = _inputs((2, 3, 3, 4), torch.float64, seed=6)
    weights = torch.rand(2, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(DEVICE)
    for reduction in ("mean", "sum", "none"):
        for w in ("uniform", weights):
            assert torch.autograd.gradcheck(
                lambda s, w=w, r=reduction: weighted_channel_kl(s, teacher, 1.7, w, reduction=r, backend="torch"),
                (student.clone().requires_grad_(True),),
            )


@pytest.mark.parametrize("backend", BACKENDS)
def test_hwd_gradient_is_the_weighted_kl_gradient(backend: str) -> None:
    """HWD's weights are constants of the backward: d L / d s = tau / (N C) * w * (p_S - p_T)."""
    student, teacher = _inputs((2, 4, 3, 5), torch.float64, seed=8)
    student.requires_grad_(True)
    weighted_channel_kl(student, teacher, 2.0, "hwd", mu=0.3, beta=0.2, backend=backend).backward()
    weights = _reference_weights(student, teacher, 2.0, "hwd", 0.3, 0.2)
    p_s = torch.softmax(student.detach().double().cpu().flatten(2) / 2.0, dim=2)
    p_t = torch.softmax(teacher.double().cpu().flatten(2) / 2.0, dim=2)
    expected = (2.0 / 8) * weights[:, :, None] * (p_s - p_t)
    assert student.grad is not None
    torch.testing.assert_close(student.grad.flatten(2).cpu(), expected, rtol=1e-9, atol=1e-13)


# ------------------------------------------------------------------------------------------------
# The Triton finalize kernel against the PyTorch finalize, on HWD's edge cases.
# ------------------------------------------------------------------------------------------------

FINALIZE_CASES = {
    "random": lambda g: torch.rand(5, 7, generator=g, dtype=torch.float64),
    "all equal per image": lambda g: torch.full((4, 6), 0.3, dtype=torch.float64),
    "one channel": lambda g: torch.rand(9, 1, generator=g, dtype=torch.float64),
    "one differs": lambda g: torch.tensor([[1.0, 1.0, 1.0, 5.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64),
    "many images": lambda g: torch.rand(300, 19, generator=g, dtype=torch.float64),
    "wide spread": lambda g: torch.rand(3, 150, generator=g, dtype=torch.float64) ** 12,
    "zeros": lambda g: torch.zeros(2, 5, dtype=torch.float64),
}


@pytest.fixture
def poisoned_triton_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every buffer the Triton launchers allocate starts as NaN: an element a kernel skips shows up."""
    backend = importlib.import_module("segkd.ops._triton_backend")

    def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(backend, "_new_output", new_output)  # the finalize allocates through it too


@needs_triton
@pytest.mark.triton
@pytest.mark.usefixtures("poisoned_triton_outputs")
@pytest.mark.parametrize("case", sorted(FINALIZE_CASES))
@pytest.mark.parametrize(
    ("mode", "mu", "beta"),
    [("hwd", 0.0, 0.1), ("hwd", 1.0, 0.1), ("hwd", -1.5, 3.0), ("hwd", 0.2, 1.0), ("hwd", 0.0, 1.0 - 1e-9),
     ("hwd", 2.0, 1e-6), ("uniform", 0.0, 0.1), ("given", 0.0, 0.1)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_finalize_matches_torch(case: str, mode: str, mu: float, beta: float, dtype: torch.dtype) -> None:
    triton_weighting = importlib.import_module("segkd.ops._triton_weighting")
    generator = torch.Generator().manual_seed(9)
    divergence = FINALIZE_CASES[case](generator)
    channels = divergence.shape[1]
    kl = torch.rand(divergence.numel(), generator=generator, dtype=torch.float64).to(dtype).to(DEVICE)
    aux = None if mode == "uniform" else divergence.reshape(-1).to(dtype).to(DEVICE)
    for reduction in ("mean", "sum", "none"):
        expected = _weighting.finalize(kl, aux, channels, mode, mu, beta, 2.25, reduction)
        actual = triton_weighting.finalize(kl, aux, channels, mode, mu, beta, 2.25, reduction)
        tolerance = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 2e-6, "atol": 1e-7}
        for got, want in zip(actual, expected, strict=True):
            assert got.dtype == want.dtype
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, **tolerance)
        if mode == "hwd" and case in ("all equal per image", "one channel", "zeros"):
            assert torch.equal(actual[1], torch.full_like(actual[1], expected[1][0].item())), "weights not uniform"


@needs_triton
@pytest.mark.triton
@pytest.mark.usefixtures("poisoned_triton_outputs")
@pytest.mark.parametrize("weighting", ["uniform", "hwd", "given"])
def test_split_finalize_walks_images_in_steps(
    weighting: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    # The finalize combines the segments of two images per loop step here (7 images: a masked last step),
    # and must write every row's statistics for the backward (outputs start as NaN).
    monkeypatch.setattr(importlib.import_module("segkd.ops._triton_weighting"), "TARGET_BLOCK_ELEMENTS", 8)
    backend = _backend("triton-split", request, 21, 20)
    student, teacher = _inputs((7, 3, 4, 5), torch.float64, seed=12)
    weights: Any = weighting
    if weighting == "given":
        weights = torch.rand(7, 3, generator=torch.Generator().manual_seed(13), dtype=torch.float64).to(DEVICE)
    for reduction in ("mean", "none"):
        losses, grads = [], []
        for name in (backend, "torch"):
            leaf = student.detach().clone().requires_grad_(True)
            loss = weighted_channel_kl(leaf, teacher, 1.5, weights, mu=0.3, beta=0.2, reduction=reduction, backend=name)
            loss.sum().backward()
            losses.append(loss.detach())
            grads.append(leaf.grad)
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-13)


# ------------------------------------------------------------------------------------------------
# Launch count: what a CWD or HWD forward + backward costs in kernels on the Triton backend.
# ------------------------------------------------------------------------------------------------

# Operators that launch no kernel on a GPU (allocation, views, metadata).
_NO_KERNEL = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "view",
    "_unsafe_view",
    "reshape",
    "detach",
    "alias",
    "expand",
    "as_strided",
    "slice",
    "select",
    "squeeze",
    "unsqueeze",
    "t",
    "permute",
    "transpose",
    "lift_fresh",
    "_has_compatible_shallow_copy_type",
    "is_same_size",
    "promote_types",
}


class _OperatorLog(TorchDispatchMode):
    """Records the ATen operators that would launch a kernel (everything but views and allocations)."""

    def __init__(self) -> None:
        super().__init__()
        self.launching: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name not in _NO_KERNEL:
            self.launching.append(name)
        return func(*args, **(kwargs or {}))


@needs_triton
@pytest.mark.triton
@pytest.mark.parametrize(
    "loss_fn",
    [
        pytest.param(lambda s, t: cwd_loss(s, t, 4.0, backend="triton"), id="cwd"),
        pytest.param(lambda s, t: hwd_loss(s, t, 4.0, 1.0, 0.1, backend="triton"), id="hwd"),
    ],
)
@pytest.mark.parametrize("split", [False, True], ids=["whole-rows", "split-rows"])
def test_triton_forward_backward_is_at_most_four_launches(
    loss_fn: Callable[[Any, Any], Any], split: bool, monkeypatch: Any, request: pytest.FixtureRequest
) -> None:
    """Issue 3's kernel budget: <= 4 launches for a CWD or HWD forward + backward (eager PyTorch: 19).

    Counted on CPU: Triton launches by wrapping the kernels, ATen operators by a dispatch mode
    (the ``ones_like`` that ``loss.backward()`` creates as the incoming gradient is one of them).
    With the rows split into segments, the finalize combines them: still three Triton launches.
    """
    _backend("triton-split" if split else "triton", request, 6, 64)
    backend = importlib.import_module("segkd.ops._triton_backend")
    triton_launches: list[str] = []
    original = backend._kernel_for

    def counting_kernel_for(kernel: Any, device: torch.device) -> Any:
        launchable = original(kernel, device)

        class Counted:
            def __getitem__(self, grid: Any) -> Callable[..., Any]:
                def launch(*args: Any, **kwargs: Any) -> Any:
                    triton_launches.append(getattr(kernel, "__name__", str(kernel)))
                    with _disable_current_modes():  # the interpreter's own tensor work is not a launch
                        return launchable[grid](*args, **kwargs)

                return launch

        return Counted()

    monkeypatch.setattr(backend, "_kernel_for", counting_kernel_for)  # the finalize launches through it too
    student, teacher = _inputs((2, 3, 8, 8), torch.float32, seed=10)
    student.requires_grad_(True)
    log = _OperatorLog()
    with log:
        loss_fn(student, teacher).backward()
    assert student.grad is not None
    assert torch.isfinite(student.grad).all()
    launches = triton_launches + log.launching
    assert len(triton_launches) == 3, triton_launches
    assert len(launches) <= 4, launches


@pytest.mark.parametrize("keep", [True, False], ids=["cpu-keeps-difference", "recompute"])
@pytest.mark.parametrize("weighting", ["uniform", "hwd"])
def test_saved_tensors_and_a_second_backward(weighting: str, keep: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # The torch backend on CPU saves p_S - p_T (compute dtype) and the per-row coefficients only; as on
    # CUDA (keeps_direction False) it saves the inputs, the row statistics and the coefficients. Either
    # way a second backward (retain_graph=True) gives the same gradient, the reference one.
    if not keep:
        monkeypatch.setattr(importlib.import_module("segkd.ops.weighted_kl"), "keeps_direction", lambda *_: False)
    student, teacher = _inputs((2, 3, 4, 6), torch.bfloat16, seed=21)
    student = student.cpu().requires_grad_(True)
    teacher = teacher.cpu()
    saved: list[Any] = []

    def pack(tensor: Any) -> Any:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = weighted_channel_kl(student, teacher, 2.0, weighting, backend="torch")  # type: ignore[arg-type]
    shapes = sorted((tuple(t.shape), t.dtype) for t in saved)
    if keep:
        assert shapes == sorted([((6, 24), torch.float32), ((6,), torch.float32)])
    else:
        assert shapes == sorted([((6, 24), torch.bfloat16)] * 2 + [((6,), torch.float32)] * 3)
    loss.backward(retain_graph=True)
    first = student.grad.clone()
    _, expected = _reference_loss_and_grad(student, teacher, 2.0, weighting, "mean", torch.tensor(1.0), 0.0, 0.1)
    torch.testing.assert_close(first.double(), expected, rtol=GRAD_TOLERANCES[torch.bfloat16]["rtol"], atol=1e-6)
    loss.backward()
    torch.testing.assert_close(student.grad, 2 * first, rtol=0, atol=0)


def test_bad_weights() -> None:
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"`weights` to have shape \(N, C\) = \(2, 3\).*got \(3, 2\)"):
        weighted_channel_kl(student, teacher, 1.0, torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"`weights` to have shape \(N, C\) = \(2, 3\).*got \(2, 3, 1\)"):
        weighted_channel_kl(student, teacher, 1.0, torch.ones(2, 3, 1))
    with pytest.raises(TypeError, match="`weights` to have a floating-point dtype"):
        weighted_channel_kl(student, teacher, 1.0, torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="`weights`"):
        weighted_channel_kl(student, teacher, 1.0, "cwd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same device"):
        weighted_channel_kl(student, teacher, 1.0, torch.ones(2, 3, device="meta"))
    with pytest.raises(ValueError, match="tau"):
        weighted_channel_kl(student, teacher, 0.0)
    with pytest.raises(ValueError, match="beta"):
        weighted_channel_kl(student, teacher, 1.0, "hwd", beta=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        weighted_channel_kl(student, teacher, 1.0, reduction="avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same shape"):
        weighted_channel_kl(student, teacher[:, :2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_op_passes_opcheck(backend: str) -> None:
    """Schema, fake implementation, autograd registration and AOT dispatch of the compile-time op."""
    forward_op = importlib.import_module("segkd.ops.weighted_kl")._forward_op
    if forward_op is None:
        pytest.skip("torch.library.custom_op needs torch >= 2.4")
    generator = torch.Generator().manual_seed(11)
    student = torch.randn(6, 35, generator=generator).to(DEVICE)
    teacher = torch.randn(6, 35, generator=generator).to(DEVICE)
    given = torch.rand(6, generator=generator).to(DEVICE)
    for mode, aux in (("uniform", None), ("hwd", None), ("given", given)):
        for reduction in ("mean", "sum", "none"):
            args = (student.clone().requires_grad_(True), teacher, aux, 2.0, 3, mode, 0.5, 0.1, reduction, backend)
            torch.library.opcheck(forward_op, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend: str) -> None:
    """No graph break (fullgraph=True) and the same loss and gradient, for every weighting and reduction."""
    torch._dynamo.reset()
    student, teacher = _inputs((2, 3, 4, 5), torch.float32, seed=12)
    weights = torch.rand(2, 3, generator=torch.Generator().manual_seed(13)).to(DEVICE)

    def loss_fn(s: Any, t: Any) -> Any:
        total = weighted_channel_kl(s, t, 2.0, "hwd", mu=0.5, backend=backend)  # type: ignore[arg-type]
        total = total + weighted_channel_kl(s, t, 2.0, weights, reduction="none", backend=backend).square().sum()  # type: ignore[arg-type]
        return total + weighted_channel_kl(s, t, 3.0, reduction="sum", backend=backend)  # type: ignore[arg-type]

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    s_eager, s_compiled = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    eager = loss_fn(s_eager, teacher)
    eager.backward()
    out = compiled(s_compiled, teacher)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(s_compiled.grad, s_eager.grad)
    torch._dynamo.reset()
