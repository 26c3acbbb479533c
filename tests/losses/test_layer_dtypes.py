"""Issue 15, class 7: modules with trainable layers take a student of another floating dtype outside autocast.

MGD's generator, CIRKD's projection head and SKD's discriminator compute in their own dtype: an fp16,
bf16 or fp64 student fed to fp32 layers gives exactly what the same student cast to fp32 gives, and
its gradient is that gradient rounded to the student's dtype. (It used to fail with torch's
dtype-mismatch error.)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import segkd

TINY = {"pixel_memory_size": 12, "region_memory_size": 5, "pixel_contrast_size": 9, "region_contrast_size": 6}


def _randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _labels() -> Tensor:
    return torch.randint(0, 3, (2, 8, 8), generator=torch.Generator().manual_seed(9))


def _mgd(student_channels: int) -> nn.Module:
    return segkd.MGDLoss(student_channels, 5, alpha=1.0)


def _memory() -> nn.Module:
    return segkd.CIRKDMemoryLoss(3, 3, 5, generator=torch.Generator().manual_seed(0), **TINY)  # type: ignore[arg-type]


def _cirkd() -> nn.Module:
    return segkd.CIRKDLoss(3, 3, 5, generator=torch.Generator().manual_seed(0), **TINY)  # type: ignore[arg-type]


# name -> (factory, inputs with the student parts in `dtype`, the indices of the inputs that go into the layers)
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.dtype], tuple[Tensor, ...]], tuple[int, ...]]] = {
    "MGDLoss": (lambda: _mgd(3), lambda d: (_randn(2, 3, 4, 4, seed=1).to(d), _randn(2, 5, 4, 4, seed=2)), (0,)),
    "MGDLoss-no-align": (
        lambda: _mgd(5),
        lambda d: (_randn(2, 5, 4, 4, seed=1).to(d), _randn(2, 5, 4, 4, seed=2)),
        (0,),
    ),
    "CIRKDMemoryLoss": (
        _memory,
        lambda d: (_randn(2, 3, 4, 4, seed=1).to(d), _randn(2, 5, 4, 4, seed=2), _labels()),
        (0,),
    ),
    "CIRKDLoss": (
        _cirkd,
        lambda d: (
            _randn(2, 3, 4, 4, seed=1).to(d),
            _randn(2, 3, 4, 4, seed=2),
            _randn(2, 3, 4, 4, seed=3).to(d),
            _randn(2, 5, 4, 4, seed=4),
            _labels(),
        ),
        (2,),
    ),
    "SKDDiscriminator": (
        lambda: segkd.SKDDiscriminator(3, conv_dim=2),
        lambda d: (_randn(1, 3, 64, 64, seed=1).to(d),),
        (0,),
    ),
}
STUDENT_DTYPES = [torch.float16, torch.bfloat16, torch.float64]


def _run(module: nn.Module, inputs: tuple[Tensor, ...], cast: tuple[int, ...]) -> tuple[list[Tensor], Tensor]:
    """The outputs and the gradient of the first input, feeding the inputs at ``cast`` in fp32."""
    student = inputs[0].detach().clone().requires_grad_(True)
    fed = [student, *inputs[1:]]
    fed = [x.float() if i in cast else x for i, x in enumerate(fed)]
    torch.manual_seed(0)
    out: Any = copy.deepcopy(module)(*fed)
    if isinstance(out, tuple) and isinstance(out[-1], dict):  # (total, terms) bundles
        out = (out[0], *out[1].values())
    outputs = list(out) if isinstance(out, tuple) else [out]
    outputs[0].float().sum().backward()
    assert student.grad is not None
    return [o.detach() for o in outputs], student.grad


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", STUDENT_DTYPES, ids=str)
def test_a_student_of_another_dtype_meets_fp32_layers(name: str, dtype: torch.dtype) -> None:
    factory, make_inputs, layer_inputs = CASES[name]
    torch.manual_seed(0)
    module = factory()
    inputs = make_inputs(dtype)
    expected, expected_grad = _run(module, inputs, layer_inputs)  # cast by hand
    actual, grad = _run(module, inputs, ())  # cast by the module
    assert grad.dtype == dtype
    # Exact, except that CIRKD's mini-batch term reads an fp64 feature in fp64 where the hand-cast run
    # rounds it to fp32 first: then agreement to fp32 rounding of the inputs (2^-24, a few times over),
    # and its terms come out in fp64 there.
    approximate = (name, dtype) == ("CIRKDLoss", torch.float64)
    rtol = 1e-6 if approximate else 0.0
    torch.testing.assert_close(grad, expected_grad.to(dtype), rtol=rtol, atol=0)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=rtol, atol=0, check_dtype=not approximate)


@pytest.mark.parametrize("name", list(CASES))
def test_fp64_layers_compute_in_fp64(name: str) -> None:
    factory, make_inputs, _ = CASES[name]
    torch.manual_seed(0)
    module = factory().double()
    outputs, grad = _run(module, make_inputs(torch.float32), ())
    assert grad.dtype == torch.float32
    assert outputs[0].dtype == torch.float64


def test_skd_bundle_takes_a_half_precision_student() -> None:
    torch.manual_seed(0)
    bundle = segkd.SKDLoss(3, conv_dim=2, adversarial_weight=1.0)
    logits_s = _randn(1, 3, 64, 64, seed=1).half().requires_grad_(True)
    feat_s = _randn(1, 3, 4, 4, seed=3).half()
    total, terms = bundle(logits_s, _randn(1, 3, 64, 64, seed=2), feat_s, _randn(1, 5, 4, 4, seed=4))
    total.backward()
    assert logits_s.grad is not None
    assert logits_s.grad.dtype == torch.float16
    assert all(torch.isfinite(v) for v in terms.values())
    assert torch.isfinite(bundle.discriminator_loss(logits_s, _randn(1, 3, 64, 64, seed=2)))


def test_autocast_still_chooses_the_layer_dtype() -> None:
    torch.manual_seed(0)
    module = segkd.MGDLoss(3, 5, alpha=1.0)
    student = _randn(2, 3, 4, 4, seed=1).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(student, _randn(2, 5, 4, 4, seed=2))
    loss.backward()
    assert loss.dtype == torch.float32  # the squared error is summed in fp32
    assert student.grad is not None
    assert student.grad.dtype == torch.float32
