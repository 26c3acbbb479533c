"""MGD: against a float64 reference written here (loop convolutions, the original's mask rule)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segkd.losses.mgd import MGDLoss, mgd_loss, mgd_mask
from segkd.testing.reference.mgd import mgd_loss_reference


def _loop_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Stride-1 convolution with zero padding k // 2, one output pixel at a time."""
    x, weight, bias = x.double(), weight.double(), bias.double()
    n_img, _, height, width = x.shape
    out_c, _, k_h, k_w = weight.shape
    out = torch.zeros(n_img, out_c, height, width, dtype=torch.float64)
    for n in range(n_img):
        for i in range(height):
            for j in range(width):
                acc = bias.clone()
                for u in range(k_h):
                    for v in range(k_w):
                        y, z = i + u - k_h // 2, j + v - k_w // 2
                        if 0 <= y < height and 0 <= z < width:
                            acc = acc + weight[:, :, u, v] @ x[n, :, y, z]
                out[n, :, i, j] = acc
    return out


def _original_mask(shape, ratio, seed):
    """The original rule: u ~ U[0, 1) per image and position, zero where u > 1 - ratio."""
    u = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    return torch.where(u > 1 - ratio, 0, 1).double()


def _loop_loss(criterion: MGDLoss, student, teacher, mask, reduction="mean"):
    aligned = student.double()
    if criterion.align is not None:
        aligned = _loop_conv(aligned, criterion.align.weight, criterion.align.bias)
    first, last = criterion.generation[0], criterion.generation[2]
    hidden = _loop_conv(aligned * mask, first.weight, first.bias).clamp_min(0.0)
    generated = _loop_conv(hidden, last.weight, last.bias)
    per_image = ((generated - teacher.double()) ** 2).sum(dim=(1, 2, 3)) * criterion.alpha
    return {"mean": per_image.sum() / student.shape[0], "sum": per_image.sum(), "none": per_image}[reduction]


def _setup(cs=3, ct=5, n=2, h=4, w=5, seed=0, alpha=1.0, ratio=0.5, dtype=torch.float64):
    torch.manual_seed(seed)
    criterion = MGDLoss(cs, ct, alpha=alpha, mask_ratio=ratio, generator=torch.Generator().manual_seed(123))
    criterion = criterion.to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    student = torch.randn(n, cs, h, w, generator=gen, dtype=dtype)
    teacher = torch.randn(n, ct, h, w, generator=gen, dtype=dtype)
    return criterion, student, teacher


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("cs", "ct"), [(3, 5), (4, 4)], ids=["align", "no-align"])
def test_matches_loop_reference(reduction, cs, ct):
    criterion, student, teacher = _setup(cs, ct, ratio=0.5)
    criterion.reduction = reduction
    assert (criterion.align is None) == (cs == ct)
    got = criterion(student, teacher)
    mask = _original_mask((2, 1, 4, 5), 0.5, seed=123)
    assert 0 < mask.sum() < mask.numel()  # the mask does something
    expected = _loop_loss(criterion, student, teacher, mask, reduction)
    assert got.dtype == torch.float64
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_agrees_with_segkd_testing_reference():
    criterion, student, teacher = _setup(ratio=0.75)
    mask = _original_mask((2, 1, 4, 5), 0.75, seed=123)
    gen_w = (
        criterion.generation[0].weight,
        criterion.generation[0].bias,
        criterion.generation[2].weight,
        criterion.generation[2].bias,
    )
    align_w = (criterion.align.weight, criterion.align.bias)
    with torch.no_grad():
        for reduction in ("mean", "sum", "none"):
            torch.testing.assert_close(
                mgd_loss_reference(student, teacher, mask, gen_w, align_w, alpha=0.5, reduction=reduction),
                _loop_loss(criterion, student, teacher, mask, reduction) * 0.5,
            )


def test_mask_ratio_zero_keeps_everything():
    criterion, student, teacher = _setup(ratio=0.0)
    expected = _loop_loss(criterion, student, teacher, torch.ones(2, 1, 4, 5, dtype=torch.float64))
    torch.testing.assert_close(criterion(student, teacher), expected)


def test_mask_shape_rule_and_fraction():
    mask = mgd_mask((3, 40, 50), 0.75, generator=torch.Generator().manual_seed(5))
    assert mask.shape == (3, 1, 40, 50)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mask.double(), _original_mask((3, 1, 40, 50), 0.75, seed=5))
    assert abs(1 - mask.mean().item() - 0.75) < 0.02
    assert mgd_mask((2, 3, 3), 0.0).min().item() == 1.0


def test_same_seed_same_loss_different_seed_different_loss():
    criterion, student, teacher = _setup()
    losses = []
    for seed in (7, 7, 8):
        criterion.generator = torch.Generator().manual_seed(seed)
        losses.append(criterion(student, teacher).item())
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]
    # one generator: a fresh mask at every call
    criterion.generator = torch.Generator().manual_seed(7)
    assert criterion(student, teacher).item() == losses[0]
    assert criterion(student, teacher).item() != losses[0]


def test_global_rng_without_generator():
    criterion, student, teacher = _setup()
    criterion.generator = None
    torch.manual_seed(3)
    first = criterion(student, teacher)
    torch.manual_seed(3)
    torch.testing.assert_close(criterion(student, teacher), first, rtol=0, atol=0)


def test_gradcheck_student_and_parameters():
    criterion, student, teacher = _setup(cs=2, ct=3, n=1, h=3, w=3, ratio=0.5)
    student.requires_grad_(True)
    params = (criterion.align.weight, criterion.generation[0].weight, criterion.generation[2].bias)

    def run(s, *_):
        criterion.generator = torch.Generator().manual_seed(1)  # the same mask at every evaluation
        return criterion(s, teacher)

    assert torch.autograd.gradcheck(run, (student, *params))


def test_gradients_reach_student_and_all_parameters_not_teacher():
    criterion, student, teacher = _setup()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    criterion(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad.abs().sum() > 0
    for name, param in criterion.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_module_equals_function():
    criterion, student, teacher = _setup(alpha=2e-5)
    criterion.generator = torch.Generator().manual_seed(4)
    got = criterion(student, teacher)
    expected = mgd_loss(
        student, teacher, criterion.align, criterion.generation, 2e-5, 0.5, generator=torch.Generator().manual_seed(4)
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_alpha_scales_linearly_and_sum_is_batch_times_mean():
    criterion, student, teacher = _setup()
    base = mgd_loss(student, teacher, criterion.align, criterion.generation, 1.0, 0.5, generator=torch.Generator())
    scaled = mgd_loss(student, teacher, criterion.align, criterion.generation, 3.0, 0.5, generator=torch.Generator())
    total = mgd_loss(
        student, teacher, criterion.align, criterion.generation, 1.0, 0.5, "sum", generator=torch.Generator()
    )
    torch.testing.assert_close(scaled, 3 * base)
    torch.testing.assert_close(total, 2 * base)


def test_trainable_parts_in_state_dict():
    criterion = MGDLoss(3, 5)
    assert sorted(criterion.state_dict()) == [
        "align.bias",
        "align.weight",
        "generation.0.bias",
        "generation.0.weight",
        "generation.2.bias",
        "generation.2.weight",
    ]
    assert criterion.align.kernel_size == (1, 1)
    assert criterion.generation[0].kernel_size == (3, 3)
    assert criterion.generation[2].out_channels == 5
    assert all(p.requires_grad for p in criterion.parameters())
    same = MGDLoss(4, 4)
    assert same.align is None
    assert "align.weight" not in same.state_dict()
    assert (criterion.alpha, criterion.mask_ratio) == (2e-5, 0.75)


def test_fp32_sum_under_bfloat16_autocast():
    criterion, student, teacher = _setup(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = criterion(student, teacher)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_mask_ratio_out_of_range(ratio):
    with pytest.raises(ValueError, match=r"`mask_ratio` to be in \[0.0, 1.0\)"):
        MGDLoss(3, 5, mask_ratio=ratio)
    criterion, student, teacher = _setup()
    with pytest.raises(ValueError, match="`mask_ratio`"):
        mgd_loss(student, teacher, criterion.align, criterion.generation, mask_ratio=ratio)


def test_bad_settings():
    with pytest.raises(ValueError, match="`alpha` to be >= 0"):
        MGDLoss(3, 5, alpha=-1.0)
    with pytest.raises(ValueError, match="`student_channels` to be >= 1"):
        MGDLoss(0, 5)
    with pytest.raises(TypeError, match=r"`generator` to be a torch\.Generator or None"):
        MGDLoss(3, 5, generator=0)
    with pytest.raises(ValueError, match="`reduction` to be one of"):
        MGDLoss(3, 5, reduction="batchmean")


def test_channels_differ_from_declared():
    criterion, student, teacher = _setup()
    with pytest.raises(ValueError, match=r"`student` to have 3 channels in dimension 1 \(student_channels=3\)"):
        criterion(student[:, :2], teacher)
    with pytest.raises(ValueError, match=r"`teacher` to have 5 channels in dimension 1 \(teacher_channels=5\)"):
        criterion(student, teacher[:, :4])


def test_spatial_and_batch_mismatch():
    criterion, student, teacher = _setup()
    with pytest.raises(ValueError, match=r"same shape except in dimension 1.*\(2, 3, 4, 5\) and \(2, 5, 4, 4\)"):
        criterion(student, teacher[..., :4])
    with pytest.raises(ValueError, match="same shape except in dimension 1"):
        criterion(student, teacher[:1])


def test_wrong_dims_and_dtype():
    criterion, student, teacher = _setup()
    with pytest.raises(ValueError, match=r"`student` to have 4 dimensions \(N, C, h, w\)"):
        mgd_loss(student.flatten(2), teacher, criterion.align, criterion.generation)
    with pytest.raises(TypeError, match="`teacher` to have a floating-point dtype"):
        criterion(student, teacher.long())


def test_function_needs_align_for_different_widths():
    criterion, student, teacher = _setup()
    with pytest.raises(
        ValueError,
        match=r"`student \(no `align` layer\)` and `teacher` to have the same shape, got \(2, 3, 4, 5\) and \(2, 5, 4",
    ):
        mgd_loss(student, teacher, None, criterion.generation)
    with pytest.raises(ValueError, match=r"`align\(student\)` and `teacher` to have the same shape"):
        mgd_loss(student, teacher, nn.Identity(), criterion.generation)
