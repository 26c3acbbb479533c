r"""Float64 references of CIRKD's mini-batch, memory-contrast and pixel-KD terms, written from the formulas.

Plain loops over image pairs, rows and anchors; independent of :mod:`segkd.losses`. Use on small inputs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "cirkd_memory_kl_reference",
    "cirkd_minibatch_loss_reference",
    "cirkd_pixel_kd_reference",
]


def _unit(vector: Tensor) -> Tensor:
    # L2 normalisation with the usual 1e-12 floor on the norm.
    return vector / max(math.sqrt(float((vector * vector).sum())), 1e-12)


def _kl_from_logits(teacher_logits: Tensor, student_logits: Tensor) -> float:
    # KL(softmax(teacher) || softmax(student)) of two 1-D logit vectors.
    log_p_t = teacher_logits - torch.logsumexp(teacher_logits, dim=0)
    log_p_s = student_logits - torch.logsumexp(student_logits, dim=0)
    return float((log_p_t.exp() * (log_p_t - log_p_s)).sum())


def _average_pool(feat: Tensor, k: int) -> Tensor:
    # Non-overlapping k x k windows; the last window of a row/column holds whatever is left.
    channels, height, width = feat.shape
    out_h, out_w = -(-height // k), -(-width // k)
    out = torch.zeros(channels, out_h, out_w, dtype=torch.float64)
    for a in range(out_h):
        for b in range(out_w):
            window = feat[:, a * k : min((a + 1) * k, height), b * k : min((b + 1) * k, width)]
            out[:, a, b] = window.reshape(channels, -1).mean(dim=1)
    return out


def _unit_columns(feat: Tensor) -> Tensor:
    # (C, H, W) -> (C, L) with every position's channel vector L2-normalised.
    flat = feat.reshape(feat.shape[0], -1)
    return torch.stack([_unit(flat[:, u]) for u in range(flat.shape[1])], dim=1)


def cirkd_minibatch_loss_reference(
    student_feat: Tensor, teacher_feat: Tensor, tau: float = 0.1, pool: int | None = None, reduction: str = "mean"
) -> Tensor:
    r"""CIRKD mini-batch pixel-to-pixel loss, in float64.

    .. math::

        L = \frac{1}{B^2} \sum_{i, j} \frac{1}{L} \sum_u
            \mathrm{KL}\left(\mathrm{softmax}(t_i[:, u]^\top t_j / \tau) \,\|\,
            \mathrm{softmax}(s_i[:, u]^\top s_j / \tau)\right)

    with unit channel vectors after the optional ``pool x pool`` average pooling (stride ``pool``,
    partial last windows averaged over what they hold).

    Reference: C. Yang et al., "Cross-Image Relational Knowledge Distillation for Semantic
    Segmentation", CVPR 2022.

    Args:
        student_feat: ``(B, C_s, H, W)`` student features.
        teacher_feat: ``(B, C_t, H, W)`` teacher features.
        tau: temperature.
        pool: pooling kernel or ``None``.
        reduction: ``"mean"`` over the ``B^2`` pairs, ``"sum"``, or ``"none"`` for the ``(B, B)`` terms.

    Returns:
        The loss in float64.
    """
    batch = student_feat.shape[0]

    def prepare(feat: Tensor) -> list[Tensor]:
        images = [feat[b].detach().to(torch.float64) for b in range(batch)]
        if pool is not None and pool > 1:
            images = [_average_pool(image, pool) for image in images]
        return [_unit_columns(image) for image in images]

    students, teachers = prepare(student_feat), prepare(teacher_feat)
    terms = torch.zeros(batch, batch, dtype=torch.float64)
    for i in range(batch):
        for j in range(batch):
            rows = students[i].shape[1]
            total = 0.0
            for u in range(rows):
                t_logits = (teachers[i][:, u : u + 1] * teachers[j]).sum(dim=0) / tau
                s_logits = (students[i][:, u : u + 1] * students[j]).sum(dim=0) / tau
                total += _kl_from_logits(t_logits, s_logits)
            terms[i, j] = total / rows
    if reduction == "none":
        return terms
    return terms.sum() if reduction == "sum" else terms.mean()


def cirkd_memory_kl_reference(
    student_embed: Tensor,
    teacher_embed: Tensor,
    labels: Tensor,
    pixel_entries: Tensor,
    region_entries: Tensor,
    contrast_tau: float = 0.1,
    kd_tau: float = 1.0,
    ignore_index: int = 255,
) -> tuple[Tensor, Tensor]:
    r"""CIRKD memory pixel-to-pixel and pixel-to-region loss for given sampled entries, in float64.

    .. math::

        L = \frac{\tau_k^2}{V} \sum_{v} \mathrm{KL}\left(\mathrm{softmax}\left(\frac{E t_v}{\tau_c \tau_k}\right)
            \,\|\, \mathrm{softmax}\left(\frac{E s_v}{\tau_c \tau_k}\right)\right)

    over the ``V`` anchors (pixels whose nearest-resized label is not ``ignore_index``), with unit
    channel vectors ``s_v, t_v`` and the entries ``E`` used as given; zero when ``V = 0``.

    Reference: C. Yang et al., "Cross-Image Relational Knowledge Distillation for Semantic
    Segmentation", CVPR 2022.

    Args:
        student_embed: ``(N, D, h, w)`` projected student features.
        teacher_embed: ``(N, D, h, w)`` teacher features.
        labels: ``(N, H, W)`` labels; pixel ``(a, b)`` of the ``h x w`` grid reads ``(floor(a H / h), floor(b W / w))``.
        pixel_entries: ``(M_p, D)`` entries.
        region_entries: ``(M_r, D)`` entries.
        contrast_tau: similarity temperature.
        kd_tau: KL temperature.
        ignore_index: label of non-anchors.

    Returns:
        ``(pixel_to_pixel, pixel_to_region)`` in float64.
    """
    batch, _, height, width = student_embed.shape
    in_h, in_w = labels.shape[1:]
    anchors: list[tuple[Tensor, Tensor]] = []
    for n in range(batch):
        for a in range(height):
            for b in range(width):
                if int(labels[n, (a * in_h) // height, (b * in_w) // width]) == ignore_index:
                    continue
                s = _unit(student_embed[n, :, a, b].detach().to(torch.float64))
                t = _unit(teacher_embed[n, :, a, b].detach().to(torch.float64))
                anchors.append((s, t))

    def term(entries: Tensor) -> Tensor:
        if not anchors:
            return torch.zeros((), dtype=torch.float64)
        e = entries.detach().to(torch.float64)
        total = 0.0
        for s, t in anchors:
            t_logits = torch.stack([(row * t).sum() for row in e]) / contrast_tau / kd_tau
            s_logits = torch.stack([(row * s).sum() for row in e]) / contrast_tau / kd_tau
            total += _kl_from_logits(t_logits, s_logits)
        return torch.tensor(total / len(anchors) * kd_tau**2, dtype=torch.float64)

    return term(pixel_entries), term(region_entries)


def cirkd_pixel_kd_reference(student_logits: Tensor, teacher_logits: Tensor, tau: float = 1.0) -> Tensor:
    r"""Pixel-wise KD of CIRKD's training script, in float64.

    .. math::

        L = \frac{\tau^2}{N H W} \sum_{n, h, w}
            \mathrm{KL}\left(\mathrm{softmax}(t[n, :, h, w] / \tau) \,\|\, \mathrm{softmax}(s[n, :, h, w] / \tau)\right)

    Args:
        student_logits: ``(N, K, H, W)``.
        teacher_logits: ``(N, K, H, W)``.
        tau: temperature.

    Returns:
        The loss in float64.
    """
    batch, _, height, width = student_logits.shape
    s_all = student_logits.detach().to(torch.float64)
    t_all = teacher_logits.detach().to(torch.float64)
    total = 0.0
    for n in range(batch):
        for a in range(height):
            for b in range(width):
                total += _kl_from_logits(t_all[n, :, a, b] / tau, s_all[n, :, a, b] / tau)
    return torch.tensor(total / (batch * height * width) * tau**2, dtype=torch.float64)
