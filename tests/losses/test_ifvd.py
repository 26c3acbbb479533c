"""IFVD: against a float64 loop reference written here from the formula (and the original code's rules)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from segkd.losses.ifvd import IFVDLoss, ifvd_loss, nearest_labels
from segkd.testing.reference.ifvd import ifvd_loss_reference


def _loop_similarity(feat: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Per pixel: cosine to the masked mean feature of its class (count + 1e-6); 1 where ignored."""
    feat = feat.double()
    n_img, channels, height, width = feat.shape
    # The original resamples the labels with nn.Upsample(mode="nearest") on a float copy.
    small = F.interpolate(labels[:, None].double(), size=(height, width), mode="nearest")[:, 0].long()
    out = torch.ones(n_img, height, width, dtype=torch.float64)
    for n in range(n_img):
        for k in range(num_classes):
            if k == ignore_index:
                continue
            pixels = [(i, j) for i in range(height) for j in range(width) if int(small[n, i, j]) == k]
            if not pixels:
                continue
            centre = [sum(float(feat[n, c, i, j]) for i, j in pixels) / (len(pixels) + 1e-6) for c in range(channels)]
            c_norm = max(math.sqrt(sum(v * v for v in centre)), 1e-8)
            for i, j in pixels:
                f = [float(feat[n, c, i, j]) for c in range(channels)]
                f_norm = max(math.sqrt(sum(v * v for v in f)), 1e-8)
                out[n, i, j] = sum(a * b for a, b in zip(f, centre, strict=True)) / (f_norm * c_norm)
    return out


def _loop_loss(student, teacher, labels, num_classes, ignore_index=255, reduction="mean"):
    diff = _loop_similarity(student, labels, num_classes, ignore_index)
    diff = diff - _loop_similarity(teacher, labels, num_classes, ignore_index)
    terms = diff**2
    return {"mean": terms.mean(), "sum": terms.sum(), "none": terms}[reduction]


def _inputs(seed, n=2, cs=3, ct=5, h=5, w=7, label_hw=(20, 28), num_classes=4, dtype=torch.float64, ignore=255):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(n, cs, h, w, generator=gen, dtype=dtype)
    teacher = torch.randn(n, ct, h, w, generator=gen, dtype=dtype)
    labels = torch.randint(0, num_classes, (n, *label_hw), generator=gen)
    labels[torch.rand(labels.shape, generator=gen) < 0.2] = ignore
    return student, teacher, labels


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    ("h", "w", "label_hw"),
    [(5, 7, (20, 28)), (5, 7, (5, 7)), (4, 3, (17, 9)), (3, 4, (2, 3))],
    ids=["down4x", "same", "odd", "upsample"],
)
def test_matches_loop_reference(reduction, h, w, label_hw):
    student, teacher, labels = _inputs(0, h=h, w=w, label_hw=label_hw)
    got = ifvd_loss(student, teacher, labels, num_classes=4, reduction=reduction)
    expected = _loop_loss(student, teacher, labels, 4, reduction=reduction)
    assert got.dtype == torch.float64
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert expected.sum() > 0  # the comparison is not between two zeros


def test_float32_close_to_float64_and_fp32_output():
    student, teacher, labels = _inputs(1)
    got = ifvd_loss(student.float(), teacher.float(), labels, 4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _loop_loss(student, teacher, labels, 4), rtol=1e-4, atol=1e-6)


def test_bfloat16_input_is_computed_in_fp32():
    student, teacher, labels = _inputs(2)
    s16, t16 = student.bfloat16(), teacher.bfloat16()
    got = ifvd_loss(s16, t16, labels, 4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _loop_loss(s16, t16, labels, 4), rtol=1e-4, atol=1e-6)


def test_agrees_with_segkd_testing_reference():
    student, teacher, labels = _inputs(3, h=4, w=4, label_hw=(16, 16))
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(
            ifvd_loss_reference(student, teacher, labels, 4, reduction=reduction),
            _loop_loss(student, teacher, labels, 4, reduction=reduction),
        )


@pytest.mark.parametrize(
    ("in_hw", "out_hw"), [((64, 64), (8, 8)), ((17, 9), (4, 3)), ((7, 5), (7, 5)), ((3, 2), (7, 5))]
)
def test_nearest_labels_matches_interpolate(in_hw, out_hw):
    labels = torch.randint(0, 300, (2, *in_hw), generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(labels[:, None].double(), size=out_hw, mode="nearest")[:, 0].long()
    got = nearest_labels(labels, out_hw)
    assert got.dtype == labels.dtype
    assert torch.equal(got, expected)


def test_identical_features_give_zero():
    student, _, labels = _inputs(4)
    assert ifvd_loss(student, student.clone(), labels, 4).item() == 0.0


def test_scaling_student_features_keeps_loss():
    # Cosines are scale-invariant and the class centre scales with the features.
    student, teacher, labels = _inputs(5)
    base = ifvd_loss(student, teacher, labels, 4)
    torch.testing.assert_close(ifvd_loss(3.5 * student, teacher, labels, 4), base)


def test_single_pixel_images_give_zero():
    student, teacher, labels = _inputs(6, h=1, w=1, label_hw=(1, 1))
    labels[:] = 2
    loss = ifvd_loss(student, teacher, labels, 4)
    torch.testing.assert_close(loss, _loop_loss(student, teacher, labels, 4))
    assert abs(loss.item()) < 1e-20  # each pixel is its own class centre: similarity 1 for both


def test_absent_classes_do_not_matter():
    student, teacher, labels = _inputs(7, num_classes=3)
    few = ifvd_loss(student, teacher, labels, num_classes=3)
    many = ifvd_loss(student, teacher, labels, num_classes=19)
    torch.testing.assert_close(many, few, rtol=0, atol=0)
    torch.testing.assert_close(many, _loop_loss(student, teacher, labels, 19))


def test_all_ignored_gives_finite_zero_and_zero_gradient():
    student, teacher, labels = _inputs(8)
    labels[:] = 255
    student.requires_grad_(True)
    loss = ifvd_loss(student, teacher, labels, 4)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(student.grad).all()
    assert student.grad.abs().max().item() == 0.0


def test_zero_feature_vectors_are_finite():
    student, teacher, labels = _inputs(9)
    student[:, :, :2] = 0.0  # zero pixels and, for some images, zero class centres
    teacher[:, :, 1:] = 0.0
    student.requires_grad_(True)
    loss = ifvd_loss(student, teacher, labels, 4)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(student.grad).all()
    torch.testing.assert_close(loss.detach(), _loop_loss(student.detach(), teacher, labels, 4))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32])
def test_other_label_dtypes(dtype):
    student, teacher, labels = _inputs(14)
    expected = ifvd_loss(student, teacher, labels, 4)
    torch.testing.assert_close(ifvd_loss(student, teacher, labels.to(dtype), 4), expected, rtol=0, atol=0)
    torch.testing.assert_close(ifvd_loss(student, teacher, labels.to(dtype), 300), expected, rtol=0, atol=0)


@pytest.mark.parametrize("ignore_index", [-1, 0])
def test_other_ignore_index(ignore_index):
    student, teacher, labels = _inputs(10, ignore=ignore_index)
    got = ifvd_loss(student, teacher, labels, 4, ignore_index=ignore_index)
    torch.testing.assert_close(got, _loop_loss(student, teacher, labels, 4, ignore_index=ignore_index))


def test_gradcheck():
    student, teacher, labels = _inputs(11, n=1, cs=2, ct=3, h=3, w=3, label_hw=(6, 6), num_classes=2)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: ifvd_loss(s, teacher, labels, 2), (student,))
    assert torch.autograd.gradcheck(lambda s: ifvd_loss(s, teacher, labels, 2, reduction="none"), (student,))


def test_teacher_gets_no_gradient():
    student, teacher, labels = _inputs(12)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    ifvd_loss(student, teacher, labels, 4).backward()
    assert teacher.grad is None
    assert student.grad is not None
    assert student.grad.abs().sum() > 0


def test_module_equals_function():
    student, teacher, labels = _inputs(13)
    criterion = IFVDLoss(num_classes=4, ignore_index=255, reduction="sum")
    assert list(criterion.parameters()) == []
    assert "num_classes=4" in repr(criterion)
    torch.testing.assert_close(criterion(student, teacher, labels), ifvd_loss(student, teacher, labels, 4, 255, "sum"))


@given(
    h=st.integers(1, 4),
    w=st.integers(1, 4),
    scale=st.sampled_from([1, 2, 3]),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(h, w, scale, k, seed):
    student, teacher, labels = _inputs(seed, n=1, cs=2, ct=3, h=h, w=w, label_hw=(h * scale, w * scale), num_classes=k)
    loss = ifvd_loss(student, teacher, labels, k)
    assert 0.0 <= loss.item() <= 4.0
    torch.testing.assert_close(loss, _loop_loss(student, teacher, labels, k), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- bad input


def test_spatial_mismatch():
    student, teacher, labels = _inputs(0)
    with pytest.raises(ValueError, match=r"same shape except in dimension 1.*\(2, 3, 5, 7\) and \(2, 5, 5, 6\)"):
        ifvd_loss(student, teacher[..., :6], labels, 4)


def test_batch_mismatch():
    student, teacher, labels = _inputs(0)
    with pytest.raises(ValueError, match="same shape except in dimension 1"):
        ifvd_loss(student, teacher[:1], labels, 4)


def test_wrong_dims():
    student, teacher, labels = _inputs(0)
    with pytest.raises(ValueError, match=r"`student` to have 4 dimensions \(N, C, h, w\), got 3"):
        ifvd_loss(student[0], teacher, labels, 4)
    with pytest.raises(ValueError, match="`teacher` to have 4 dimensions"):
        ifvd_loss(student, teacher.flatten(2), labels, 4)


def test_labels_wrong_shape():
    student, teacher, labels = _inputs(0)
    with pytest.raises(ValueError, match=r"`labels` to have 3 dimensions \(N, H, W\)"):
        ifvd_loss(student, teacher, labels[0], 4)
    with pytest.raises(ValueError, match="`labels` to have batch size 2"):
        ifvd_loss(student, teacher, labels[:1], 4)
    with pytest.raises(ValueError, match="`labels` to be non-empty"):
        ifvd_loss(student, teacher, labels[:, :0], 4)


def test_labels_wrong_dtype():
    student, teacher, labels = _inputs(0)
    with pytest.raises(TypeError, match="`labels` to have an integer dtype"):
        ifvd_loss(student, teacher, labels.float(), 4)
    with pytest.raises(TypeError, match=r"`labels` to be a torch\.Tensor"):
        ifvd_loss(student, teacher, labels.tolist(), 4)


def test_features_wrong_dtype():
    student, teacher, labels = _inputs(0)
    with pytest.raises(TypeError, match="`student` to have a floating-point dtype"):
        ifvd_loss(student.long(), teacher, labels, 4)


@pytest.mark.parametrize("bad", [4, 7, -2])
def test_label_out_of_range(bad):
    student, teacher, labels = _inputs(0)
    labels[0, 0, 0] = bad
    with pytest.raises(ValueError, match=rf"class ids in \[0, 4\) or ignore_index=255, found {bad}"):
        ifvd_loss(student, teacher, labels, 4)


def test_bad_settings():
    student, teacher, labels = _inputs(0)
    with pytest.raises(ValueError, match="`num_classes` to be >= 1"):
        ifvd_loss(student, teacher, labels, 0)
    with pytest.raises(TypeError, match="`ignore_index` to be an int"):
        ifvd_loss(student, teacher, labels, 4, ignore_index=255.0)
    with pytest.raises(ValueError, match="`reduction` to be one of"):
        ifvd_loss(student, teacher, labels, 4, reduction="avg")
    with pytest.raises(TypeError, match="`num_classes` to be an int"):
        IFVDLoss(num_classes=4.0)
