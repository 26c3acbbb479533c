"""A pixel-wise KD loss of your own, checked by segkd's battery (run it with pytest)."""

import torch.nn.functional as F

from segkd.testing.checks import check_distillation_loss


def my_pixel_kd(student, teacher, tau=2.0):
    """Per-pixel KL(p_T || p_S) over classes at temperature tau, times tau^2, averaged over pixels."""
    log_p_s = F.log_softmax(student / tau, dim=1)
    log_p_t = F.log_softmax(teacher.detach() / tau, dim=1)  # the teacher never gets a gradient
    return tau**2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()


def test_my_pixel_kd():
    """Gradients, NaN-safety, a detached teacher, determinism, and the two declared properties."""
    check_distillation_loss(my_pixel_kd, (2, 5, 3, 4), zero_at_equal=True, pixel_shift_invariant=True)
