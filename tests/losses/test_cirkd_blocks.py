"""CIRKD's blocked similarities: value and gradient equal to the unblocked formula, bounded saved memory, bad sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segkd.losses.cirkd import (
    CIRKDLoss,
    CIRKDMemoryLoss,
    CIRKDMiniBatchLoss,
    cirkd_memory_kl,
    cirkd_minibatch_loss,
)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _kl_rows(z_t: torch.Tensor, z_s: torch.Tensor) -> torch.Tensor:
    log_p = F.log_softmax(z_t, dim=-1)
    return (log_p.exp() * (log_p - F.log_softmax(z_s, dim=-1))).sum(dim=-1).clamp_min(0)


def _minibatch_unblocked(student, teacher, tau, pool, reduction):
    """segkd's formula before blocking: all ``(B, B, L, L)`` similarities at once, plain autograd."""
    teacher = teacher.detach()
    if pool is not None and pool > 1:
        student = F.avg_pool2d(student, pool, stride=pool, ceil_mode=True)
        teacher = F.avg_pool2d(teacher, pool, stride=pool, ceil_mode=True)

    def similarities(feat):
        unit = F.normalize(feat.flatten(2), dim=1)
        return torch.matmul(unit.transpose(1, 2).unsqueeze(1), unit.unsqueeze(0)) / tau

    terms = _kl_rows(similarities(teacher), similarities(student)).mean(dim=-1)
    return {"mean": terms.mean(), "sum": terms.sum(), "none": terms}[reduction]


def _memory_unblocked(embed, teacher, labels, entries, contrast_tau, kd_tau):
    """One memory term before blocking: all ``V x M`` logits at once (labels already at the embedding size)."""
    anchors = (labels != 255).flatten()
    dim = embed.shape[1]
    student = F.normalize(embed, dim=1).permute(0, 2, 3, 1).reshape(-1, dim)[anchors]
    target = F.normalize(teacher, dim=1).permute(0, 2, 3, 1).reshape(-1, dim)[anchors]
    scale = 1.0 / (contrast_tau * kd_tau)
    return _kl_rows(target @ entries.t() * scale, student @ entries.t() * scale).mean() * kd_tau**2


def _value_and_grad(fn, student, upstream=None):
    student = student.detach().clone().requires_grad_()
    value = fn(student)
    value.backward(upstream if upstream is not None else torch.ones_like(value))
    return value.detach(), student.grad


def _assert_same(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-13)


# ----------------------------------------------------------------------------------------------- mini-batch


@pytest.mark.parametrize(("batch", "height", "width", "pool"), [(2, 3, 5, None), (1, 4, 3, None), (3, 5, 5, 2)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_minibatch_blocks_equal_the_unblocked_formula(batch, height, width, pool, reduction):
    student, teacher = _randn(batch, 4, height, width, seed=1), _randn(batch, 6, height, width, seed=2)
    length = (-(-height // (pool or 1))) * (-(-width // (pool or 1)))
    # Upstream gradients that differ per pair catch a gradient kept for the wrong pair.
    upstream = _randn(batch, batch, seed=3) if reduction == "none" else None
    want = _value_and_grad(lambda s: _minibatch_unblocked(s, teacher, 0.3, pool, reduction), student, upstream)
    for block_size in [*sorted({1, 2, 4, length - 1 or 1, length, length + 1, 1000}), None]:
        got = _value_and_grad(
            lambda s, b=block_size: cirkd_minibatch_loss(s, teacher, 0.3, pool, reduction, block_size=b),
            student,
            upstream,
        )
        _assert_same(got, want)


def test_minibatch_blocks_without_gradient_and_through_the_module():
    student, teacher = _randn(2, 3, 4, 4, seed=4), _randn(2, 5, 4, 4, seed=5)
    want = _minibatch_unblocked(student, teacher, 0.1, None, "none")
    with torch.no_grad():
        got = cirkd_minibatch_loss(student.requires_grad_(), teacher, reduction="none", block_size=3)
    torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-13)
    module = CIRKDMiniBatchLoss(tau=0.1, reduction="sum", block_size=5)
    torch.testing.assert_close(module(student, teacher), want.sum(), rtol=1e-10, atol=1e-13)
    assert "block_size=5" in repr(module)


def test_minibatch_blocks_zero_student_vector_passes_no_gradient():
    student, teacher = _randn(2, 3, 2, 3, seed=6), _randn(2, 4, 2, 3, seed=7)
    student[0, :, 1, 1] = 0.0
    _, grad = _value_and_grad(lambda s: cirkd_minibatch_loss(s, teacher, block_size=2), student)
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[0, :, 1, 1], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize(("block_size", "reduction", "pool"), [(1, "none", None), (2, "mean", None), (3, "sum", 2)])
def test_minibatch_blocks_gradcheck(block_size, reduction, pool):
    student, teacher = _randn(2, 3, 3, 3, seed=8).requires_grad_(), _randn(2, 4, 3, 3, seed=9)
    assert torch.autograd.gradcheck(
        lambda s: cirkd_minibatch_loss(s, teacher, 0.5, pool, reduction, block_size=block_size), (student,)
    )


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn`` runs (inputs of the graph included)."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return total


def test_minibatch_blocks_keep_nothing_quadratic_for_backward():
    # B = 2, C = 3, L = 400: the unblocked graph keeps two B^2 L^2 tensors (266 times the B C L = 2400
    # feature numbers each); the blocked one keeps a few feature-sized tensors (unit vectors, the
    # gradient: 1, or 2 B per pair with reduction="none"), measured 4.7 and 7.7 of them.
    student, teacher = _randn(2, 3, 20, 20, seed=10).requires_grad_(), _randn(2, 4, 20, 20, seed=11)
    pair_bytes = 2 * 2 * 400 * 400 * 8
    unblocked = _saved_bytes(lambda: _minibatch_unblocked(student, teacher, 0.1, None, "mean"))
    assert unblocked >= 2 * pair_bytes
    for reduction in ("mean", "none"):
        blocked = _saved_bytes(lambda r=reduction: cirkd_minibatch_loss(student, teacher, reduction=r, block_size=7))
        assert blocked <= 8 * 2400 * 8


# ----------------------------------------------------------------------------------------------- memory


def _memory_inputs(seed: int):
    embed, teacher = _randn(2, 5, 3, 4, seed=seed), _randn(2, 5, 3, 4, seed=seed + 1)
    labels = torch.randint(0, 3, (2, 3, 4), generator=torch.Generator().manual_seed(seed + 2))
    labels[0, 0, :3] = 255
    labels[1, 2, 1] = 255
    pixels = F.normalize(_randn(11, 5, seed=seed + 3), dim=1)
    regions = F.normalize(_randn(4, 5, seed=seed + 4), dim=1)
    return embed, teacher, labels, pixels, regions


@pytest.mark.parametrize(("contrast_tau", "kd_tau"), [(0.1, 1.0), (0.5, 2.0)])
def test_memory_blocks_equal_the_unblocked_formula(contrast_tau, kd_tau):
    embed, teacher, labels, pixels, regions = _memory_inputs(seed=20)  # V = 20 anchors
    for index, entries in enumerate((pixels, regions)):
        want = _value_and_grad(
            lambda e, m=entries: _memory_unblocked(e, teacher, labels, m, contrast_tau, kd_tau), embed
        )
        for block_size in (1, 3, 7, 19, 20, 21, None):
            got = _value_and_grad(
                lambda e, b=block_size, i=index: cirkd_memory_kl(
                    e, teacher, labels, pixels, regions, contrast_tau, kd_tau, block_size=b
                )[i],
                embed,
            )
            _assert_same(got, want)


def test_memory_blocks_gradcheck_and_no_grad():
    embed, teacher, labels, pixels, regions = _memory_inputs(seed=30)
    embed.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda e: torch.stack(cirkd_memory_kl(e, teacher, labels, pixels, regions, 0.5, block_size=3)), (embed,)
    )
    with torch.no_grad():
        got = cirkd_memory_kl(embed, teacher, labels, pixels, regions, block_size=2)[0]
    torch.testing.assert_close(got, _memory_unblocked(embed, teacher, labels, pixels, 0.1, 1.0).detach())


def test_memory_blocks_keep_nothing_quadratic_for_backward():
    embed, teacher = _randn(2, 4, 10, 10, seed=40).requires_grad_(), _randn(2, 4, 10, 10, seed=41)
    labels = torch.zeros(2, 10, 10, dtype=torch.long)
    entries = F.normalize(_randn(500, 4, seed=42), dim=1)
    logits_bytes = 200 * 500 * 8
    unblocked = _saved_bytes(lambda: _memory_unblocked(embed, teacher, labels, entries, 0.1, 1.0))
    assert unblocked >= 2 * logits_bytes
    blocked = _saved_bytes(lambda: cirkd_memory_kl(embed, teacher, labels, entries, entries, block_size=16))
    assert blocked <= 8 * 800 * 8  # measured 5.6 feature-sized tensors; the V x M logits are 125


def test_memory_module_and_cirkd_loss_pass_the_block_size():
    memory = CIRKDMemoryLoss(3, 4, 5, pixel_memory_size=6, region_memory_size=3, block_size=4)
    assert memory.block_size == 4
    criterion = CIRKDLoss(3, 4, 5, pixel_memory_size=6, region_memory_size=3, block_size=8)
    assert criterion.minibatch.block_size == criterion.memory.block_size == 8
    assert CIRKDLoss(3, 4, 5, pixel_memory_size=6, region_memory_size=3).memory.block_size is None


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("block_size", "error", "match"),
    [
        (0, ValueError, ">= 1, got 0"),
        (-3, ValueError, ">= 1"),
        (2.0, TypeError, "int, got float"),
        (True, TypeError, "int"),
    ],
)
def test_bad_block_size_names_the_argument(block_size, error, match):
    student, teacher = _randn(2, 3, 2, 2, seed=50), _randn(2, 3, 2, 2, seed=51)
    labels = torch.zeros(2, 2, 2, dtype=torch.long)
    entries = F.normalize(_randn(4, 3, seed=52), dim=1)
    pattern = f"`block_size`.*{match}"
    with pytest.raises(error, match=pattern):
        cirkd_minibatch_loss(student, teacher, block_size=block_size)
    with pytest.raises(error, match=pattern):
        cirkd_memory_kl(student, teacher, labels, entries, entries, block_size=block_size)
    with pytest.raises(error, match=pattern):
        CIRKDMiniBatchLoss(block_size=block_size)
    with pytest.raises(error, match=pattern):
        CIRKDMemoryLoss(3, 4, 5, block_size=block_size)
    with pytest.raises(error, match=pattern):
        CIRKDLoss(3, 4, 5, block_size=block_size)


def test_double_backward_through_blocks_is_refused_not_silent() -> None:
    # A create_graph=True gradient of a blocked term would have no graph: the penalty would lose its term.
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, 4, 4, generator=gen, dtype=torch.float64)
    loss = cirkd_minibatch_loss(student, teacher, block_size=3)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(loss, student, create_graph=True)
    (grad,) = torch.autograd.grad(cirkd_minibatch_loss(student, teacher, block_size=3), student)  # first order: fine
    assert torch.isfinite(grad).all()
