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


def _zero_vector_inputs(dtype):
    """Positive features with exactly zero vectors: single pixels, and all of class 1 in image 0 (a zero centre)."""
    gen = torch.Generator().manual_seed(30)
    student = torch.rand(2, 3, 4, 5, generator=gen, dtype=torch.float64) + 0.1
    teacher = torch.rand(2, 4, 4, 5, generator=gen, dtype=torch.float64) + 0.1
    labels = torch.randint(0, 3, (2, 4, 5), generator=gen)
    labels[0, 0] = 1
    labels[0, 1:][labels[0, 1:] == 1] = 0  # class 1 of image 0: exactly row 0
    labels[1, 3, 4] = 255
    student[0, :, 0] = 0.0  # the whole of class 1 in image 0
    student[0, :, 2, 1] = 0.0
    student[1, :, 1, 3] = 0.0
    student[1, :, 3, 4] = 0.0  # an ignored zero pixel
    teacher[0, :, 2, 1] = 0.0
    teacher[1, :, 0] = 0.0
    return student.to(dtype), teacher.to(dtype), labels


def _ifvd_gradient_bound(student, labels, num_classes):
    """Per element: 4 / (N h w) * (1 / |f_p| + 1 / |c_k|), each term dropped where its vector is zero.

    dL/ds_p = 2 (s^S_p - s^T_p) / (N h w) with |s^S - s^T| <= 2; |ds_p / df_p| <= 1 / |f_p| directly, and
    through the centre |ds_q / dc_k| <= 1 / |c_k| for each of the class's count pixels q, times
    dc_k / df_p = 1 / (count + 1e-6).
    """
    feats = student.double()
    n, _, h, w = feats.shape
    pixel_norms = torch.linalg.vector_norm(feats, dim=1)
    bound = torch.zeros(n, h, w, dtype=torch.float64)
    for image in range(n):
        for k in range(num_classes):
            mask = labels[image] == k
            if mask.any():
                centre_norm = torch.linalg.vector_norm(feats[image][:, mask].mean(dim=1))
                bound[image][mask] = 1.0 / centre_norm if centre_norm > 0 else 0.0
    bound = bound + torch.where(pixel_norms > 0, 1.0 / pixel_norms, 0.0)
    return (4.0 / (n * h * w) * bound).unsqueeze(1)


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=["fp64", "fp32", "fp16", "bf16"]
)
def test_zero_vectors_pass_no_gradient_through_their_similarity(dtype):
    # Before the fix a zero student pixel got ~1e8 x the upstream gradient (the norm clamped at 1e-8): inf in fp16.
    student, teacher, labels = _zero_vector_inputs(dtype)
    leaf = student.clone().requires_grad_(True)
    loss = ifvd_loss(leaf, teacher, labels, 3)
    loss.backward()
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(loss.double(), _loop_loss(student, teacher, labels, 3), rtol=rtol, atol=1e-12)
    grad = leaf.grad.double()
    assert torch.isfinite(grad).all()
    assert (grad.abs() <= _ifvd_gradient_bound(student, labels, 3) * 1.01).all()  # 1%: the fp16/bf16 rounding
    assert (grad[0, :, 0] == 0).all()  # a class of zero pixels: zero centre, no gradient at all
    assert (grad[1, :, 3, 4] == 0).all()  # ignored
    assert (grad[0, :, 2, 1] != 0).any()  # a zero pixel of a non-zero class still learns through its centre
    # At non-zero pixels the gradient is unchanged: the float64 reference's.
    exact = student.double().requires_grad_(True)
    ifvd_loss_reference(exact, teacher.double(), labels, 3).backward()
    nonzero = (student != 0).any(dim=1, keepdim=True).expand_as(grad)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    scale = exact.grad[nonzero].abs().max()
    torch.testing.assert_close(grad[nonzero], exact.grad[nonzero], rtol=tol, atol=tol * scale)


def test_cancelling_features_give_a_zero_centre_without_gradient():
    # Three pixels of class 0 that sum to zero: the centre is exactly zero, their similarities are 0 and pass
    # no gradient (before the fix: 1e8 x the upstream gradient, through the centre, to each of them).
    student = torch.tensor([[[[1.0, 1.0, -2.0, 0.5]], [[2.0, -1.0, -1.0, 0.3]]]]).requires_grad_(True)
    teacher = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]]]])
    labels = torch.tensor([[[0, 0, 0, 1]]])
    loss = ifvd_loss(student, teacher, labels, 2, reduction="none")
    assert loss[0, 0, :3].tolist() == [1.0, 1.0, 1.0]  # (0 - 1)^2: the teacher's pixels sit on their centre
    loss.sum().backward()
    assert (student.grad[..., :3] == 0).all()


@pytest.mark.skipif(not torch.amp.is_autocast_available("cpu"), reason="no CPU autocast")
def test_zero_vectors_under_bfloat16_autocast():
    student, teacher, labels = _zero_vector_inputs(torch.float32)
    plain, under = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    want = ifvd_loss(plain, teacher, labels, 3)
    want.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ifvd_loss(under, teacher, labels, 3)
    got.backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(under.grad, plain.grad)
    assert (under.grad.abs() <= _ifvd_gradient_bound(student, labels, 3) * 1.01).all()


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
