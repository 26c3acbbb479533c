"""Regression tests: the exact inputs on which tests/fuzz/test_fuzz_losses.py found a failure.

Each test names the fuzz test that found it, the failure, and the fix (see docs/reliability.md).
The inputs are the shrunk examples that hypothesis printed (values as printed, which reproduce the
failure on the code before the fix).
"""

from __future__ import annotations

import torch

from segkd.losses.adversarial import skd_discriminator_hinge_loss
from segkd.losses.cirkd import CIRKDLoss, cirkd_memory_kl, cirkd_minibatch_loss
from segkd.losses.ifvd import ifvd_loss
from segkd.losses.kd import pixel_kd_loss
from segkd.losses.skd import skd_pairwise_loss


def _old_pixel_kd_terms(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The pixel KL as computed before the fix (no clamp), to show the input still reproduces it."""
    log_p_s, log_p_t = torch.log_softmax(student, dim=1), torch.log_softmax(teacher, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)


def test_pixel_kd_near_equal_tiny_logits_is_not_negative() -> None:
    """test_pixel_kd: pixel_kd_loss returned -5.96e-08 (KL < 0) for a near-equal one-pixel pair.

    Fix: each pixel's KL is clamped at 0, as channel_kl already did.
    """
    student = torch.tensor([1.5410e-06, -2.9343e-07, -2.1788e-06, 5.6843e-07, -1.0845e-06, -1.3986e-06])
    teacher = torch.tensor([1.5813e-06, -2.0963e-07, -2.2507e-06, 5.2810e-07, -1.1442e-06, -1.3804e-06])
    student, teacher = student.view(1, 6, 1, 1), teacher.view(1, 6, 1, 1)
    assert _old_pixel_kd_terms(student, teacher).item() < 0  # the input still hits the rounding
    for reduction in ("mean", "sum", "none"):
        loss = pixel_kd_loss(student.clone().requires_grad_(True), teacher, reduction=reduction)
        assert (loss >= 0).all()
    labels = torch.zeros(1, 1, 1, dtype=torch.long)
    assert pixel_kd_loss(student, teacher, labels=labels).item() >= 0


def test_cirkd_fp16_zero_embedding_gives_finite_head_gradient() -> None:
    """test_cirkd_modules_with_tiny_queues: NaN gradient in the projection head under fp16.

    Shrunk case: a (1, 1, 1, 4) fp16 student equal to its teacher, values ~1e-6, one class, queues
    of length 1 and 2. The fp16 projection head maps the tiny student to an exactly zero embedding;
    F.normalize gave it the gradient 1e12 x upstream, inf in fp16, and inf x 0 = NaN in the last
    conv's weight gradient. Fix: an exactly zero student embedding passes no gradient.
    """
    values = torch.tensor([[[[1.5497e-06, -2.9802e-07, -2.2054e-06, 5.9605e-07]]]], dtype=torch.float16)
    torch.manual_seed(0)
    criterion = CIRKDLoss(
        1,
        1,
        1,
        pixel_memory_size=1,
        region_memory_size=2,
        pixel_contrast_size=1,
        region_contrast_size=1,
        pixel_update_freq=2,
        queue_dtype=torch.float16,
        generator=torch.Generator().manual_seed(0),
    ).to(torch.float16)
    student = values.clone().requires_grad_(True)
    logits = torch.randn(1, 1, 1, 4).to(torch.float16)
    labels = torch.zeros(1, 2, 8, dtype=torch.long)
    total, _ = criterion(logits.clone().requires_grad_(True), logits.flip(0), student, values.clone(), labels)
    total.backward()
    assert torch.isfinite(total)
    assert torch.isfinite(student.grad).all()  # type: ignore[arg-type]
    for name, parameter in criterion.named_parameters():
        assert parameter.grad is not None
        assert torch.isfinite(parameter.grad).all(), name


def test_cirkd_memory_kl_zero_student_vector_passes_no_gradient() -> None:
    """The fix above at the function level: a zero student embedding gets a zero (not 1e12) gradient."""
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.float32, torch.float64):
        student = torch.randn(1, 3, 1, 2, generator=generator, dtype=torch.float64)
        student[0, :, 0, 0] = 0.0  # pixel 0: exactly zero vector
        student = student.to(dtype).requires_grad_(True)
        teacher = torch.randn(1, 3, 1, 2, generator=generator, dtype=torch.float64).to(dtype)
        entries = torch.nn.functional.normalize(torch.randn(4, 3, generator=generator, dtype=torch.float64), dim=1)
        labels = torch.zeros(1, 1, 2, dtype=torch.long)
        p2p, p2r = cirkd_memory_kl(student, teacher, labels, entries.to(dtype), entries[:2].to(dtype))
        (p2p + p2r).backward()
        grad = student.grad
        assert grad is not None
        assert torch.isfinite(grad).all()
        assert (grad[0, :, 0, 0] == 0).all()
        assert grad[0, :, 0, 1].abs().max() > 0  # the non-zero pixel still learns


def test_cirkd_minibatch_near_equal_tiny_features_is_not_negative() -> None:
    """test_cirkd_minibatch: the loss was -2e-08 (KL < 0) for near-equal (1, 2, 1, 6) fp32 features of size 1e-6.

    The shrunk example printed by hypothesis does not survive the rounding of its printout, so this is
    the same case built from a seed (-3.97e-08 before the fix). Fix: each KL clamped at 0.
    """
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(1, 2, 1, 6, generator=generator, dtype=torch.float64) * 1e-6
    teacher = student * (1 + 1e-5 * torch.randn(1, 2, 1, 6, generator=generator, dtype=torch.float64))
    student, teacher = student.float(), teacher.float()
    for reduction in ("mean", "sum", "none"):
        assert (cirkd_minibatch_loss(student, teacher, 1.0, reduction=reduction) >= 0).all()
    entries = torch.nn.functional.normalize(student.flatten(2)[0].t(), dim=1)  # (6, 2): entries near the anchors
    labels = torch.zeros(1, 1, 6, dtype=torch.long)
    for value in cirkd_memory_kl(student, teacher, labels, entries, entries[:3], 1.0, 1.0):
        assert value.item() >= 0


def test_cirkd_memory_kl_no_anchor_large_fp16_is_zero_not_nan() -> None:
    """test_cirkd_memory_kl: NaN for an all-ignored label map with (1, 5, 5, 5) fp16 features of size 1e4.

    With no anchor the terms were ``sum(student) * 0``; the fp16 sum overflowed to inf and inf * 0 is
    NaN. Fix: multiply by 0 before summing. (The same case as the shrunk example, built from a seed.)
    """
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(1, 5, 5, 5, generator=generator, dtype=torch.float64) * 1e4).clamp_min(0).half()
    assert torch.isinf(student.sum())  # the input still overflows a plain fp16 sum
    entries = torch.nn.functional.normalize(torch.randn(1, 5, generator=generator), dim=1).half()
    labels = torch.full((1, 5, 5), 255)
    leaf = student.clone().requires_grad_(True)
    p2p, p2r = cirkd_memory_kl(leaf, student, labels, entries, entries)
    assert p2p.item() == 0.0
    assert p2r.item() == 0.0
    (p2p + p2r).backward()
    assert leaf.grad is not None
    assert (leaf.grad == 0).all()


def test_skd_discriminator_hinge_large_fp16_scores_are_finite() -> None:
    """test_skd_hinge_losses: inf for fp16 scores of size ~3e4 (two hinge means > 32752: their fp16 sum overflows).

    Fix: the two means are formed and added in fp32 (fp64 for fp64 scores), as every other segkd loss.
    """
    fake = torch.full((3, 1, 5, 5), 3.3e4, dtype=torch.float16)
    real = torch.full((3, 1, 5, 5), -3.3e4, dtype=torch.float16)
    assert torch.isinf(torch.relu(1.0 - real).mean() + torch.relu(1.0 + fake).mean())  # the old arithmetic
    loss = skd_discriminator_hinge_loss(real, fake.clone().requires_grad_(True))
    assert loss.dtype == torch.float32
    assert loss.item() == 2 * (1.0 + 32992.0)  # fp16 rounds 3.3e4 to 32992


def test_cirkd_minibatch_fp16_zero_vectors_equal_inputs_give_finite_gradient() -> None:
    """test_cirkd_minibatch (deep run): -inf gradient, equal fp16 (3, 5, 1, 6) ReLU features ~1e-6 with zero vectors.

    tau=0.1, reduction="sum". Rounding left in the KL gradient (~1e-8) met F.normalize's 1e12 at the exactly zero
    feature vectors, beyond fp16's range. Fix: as in the memory term, a zero vector passes no gradient.
    """
    rows = torch.tensor(
        [
            [0.0, 0.0, 0.0, 1.0133e-06, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.5497e-06, 2.9802e-07, 2.0266e-06],
            [1.1325e-06, 0.0, 5.9605e-08, 3.5763e-07, 1.7881e-07, 0.0],
            [0.0, 0.0, 0.0, 2.3842e-07, 1.7881e-07, 0.0],
            [1.0133e-06, 0.0, 0.0, 0.0, 0.0, 1.4901e-06],
            [0.0, 0.0, 0.0, 5.3644e-07, 0.0, 0.0],
            [0.0, 0.0, 1.1921e-06, 9.5367e-07, 6.5565e-07, 1.1921e-07],
            [0.0, 1.8477e-06, 0.0, 2.3842e-07, 0.0, 2.3842e-07],
            [0.0, 0.0, 1.6689e-06, 0.0, 0.0, 2.8610e-06],
            [8.9407e-07, 9.5367e-07, 0.0, 0.0, 5.9605e-08, 0.0],
            [0.0, 8.9407e-07, 1.4901e-06, 0.0, 0.0, 0.0],
            [1.0133e-06, 0.0, 1.7881e-07, 9.5367e-07, 0.0, 1.0133e-06],
            [7.7486e-07, 0.0, 0.0, 0.0, 1.1325e-06, 2.9802e-07],
            [0.0, 0.0, 0.0, 5.9605e-07, 0.0, 0.0],
            [1.9670e-06, 0.0, 0.0, 0.0, 1.7881e-07, 0.0],
        ],
        dtype=torch.float16,
    )  # the (N, C, W) rows of the shrunk example, H = 1
    features = rows.view(3, 5, 1, 6)
    student = features.clone().requires_grad_(True)
    cirkd_minibatch_loss(student, features.clone(), 0.1, None, "sum").backward()
    assert student.grad is not None
    assert torch.isfinite(student.grad).all()
    zero = (features == 0).all(dim=1, keepdim=True).expand_as(features)
    assert (student.grad[zero] == 0).all()


def test_skd_pairwise_fp16_zero_vector_gives_finite_gradient() -> None:
    """docs/reliability.md (open issue, not a fuzz failure: ``_fits_fp16`` skipped such cases): inf student gradient.

    fp16 ReLU-like features with an exactly zero pixel, a teacher that differs. ``F.normalize`` passed the zero
    vector 1e12 x the upstream gradient (~1e10 here), inf once cast back to fp16. Fix: as in CIRKD, an exactly
    zero vector passes no gradient.
    """
    student = torch.tensor([[[[0.0, 1.0, 0.5]], [[0.0, 0.25, 2.0]]]], dtype=torch.float16)  # (1, 2, 1, 3)
    teacher = torch.tensor([[[[1.0, 0.5, -1.0]]]], dtype=torch.float16)
    old = student.float().requires_grad_(True)  # the arithmetic before the fix
    unit, unit_t = (torch.nn.functional.normalize(x.flatten(2), dim=1) for x in (old, teacher.float()))
    old_loss = (unit.transpose(1, 2) @ unit - unit_t.transpose(1, 2) @ unit_t).square().mean()
    (old_grad,) = torch.autograd.grad(old_loss, old)
    assert torch.isinf(old_grad.half()).any()  # the input still overflows the old gradient
    leaf = student.clone().requires_grad_(True)
    skd_pairwise_loss(leaf, teacher, pool=1).backward()
    assert leaf.grad is not None
    assert torch.isfinite(leaf.grad).all()
    assert (leaf.grad[0, :, 0, 0] == 0).all()
    assert leaf.grad[0, :, 0, 1:].abs().max() > 0  # the other pixels still learn


def test_ifvd_fp16_zero_pixel_gives_finite_gradient() -> None:
    """docs/reliability.md (open issue, not a fuzz failure: ``_fits_fp16`` skipped such cases): inf student gradient.

    An exactly zero fp16 pixel in a class whose centre is not zero: with its norm clamped at 1e-8 it got
    1e8 x the upstream gradient, inf in fp16. Fix: a zero pixel's (or zero centre's) similarity passes no
    gradient; the pixel still learns through its class centre.
    """
    student = torch.tensor([[[[0.0, 1.0, 0.5]], [[0.0, 0.25, 2.0]]]], dtype=torch.float16)  # (1, 2, 1, 3)
    teacher = torch.tensor([[[[1.0, 0.5, 3.0]], [[1.0, 2.0, 0.5]]]], dtype=torch.float16)
    labels = torch.zeros(1, 1, 3, dtype=torch.long)
    old = student.float().requires_grad_(True)  # the arithmetic before the fix, for the zero pixel's own term
    centre = old.flatten(2).sum(dim=2) / (3 + 1e-6)
    norm = torch.linalg.vector_norm(old[0, :, 0, 0]).clamp_min(1e-8) * torch.linalg.vector_norm(centre).clamp_min(1e-8)
    (old_grad,) = torch.autograd.grad(old[0, :, 0, 0] @ centre[0] / norm, old)
    assert torch.isinf(old_grad.half()).any()  # the input still overflows the old gradient
    leaf = student.clone().requires_grad_(True)
    ifvd_loss(leaf, teacher, labels, 1).backward()
    assert leaf.grad is not None
    assert torch.isfinite(leaf.grad).all()
    assert leaf.grad[0, :, 0, 0].abs().max() > 0  # through the centre
    # The bound of ifvd_loss's docstring, 4 / (N h w) * (1 / |f| + 1 / |c|), at the smallest non-zero |f|.
    smallest = torch.linalg.vector_norm(student[0, :, 0, 1:].double(), dim=0).min()
    assert leaf.grad.abs().max() <= 4 / 3 * (1 / smallest + 1 / torch.linalg.vector_norm(centre.detach().double()))
