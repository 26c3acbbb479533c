r"""Float64 reference of intra-class feature variation distillation (IFVD), written from the formula.

Plain loops over images and classes, in float64, without importing :mod:`segkd.losses`. Labels
are resampled to the feature size with the nearest-neighbour rule ``src = floor(i * H / h)``
(what ``torch.nn.functional.interpolate(mode="nearest")`` computes; it evaluates the product in
float32, which can differ by one pixel for a few size pairs, e.g. 10 -> 6).
"""

from __future__ import annotations

import torch
from torch import Tensor

from segkd.testing.reference._reduction import reduce_terms

__all__ = ["ifvd_loss_reference", "ifvd_similarity_reference"]


def _nearest_reference(labels: Tensor, height: int, width: int) -> Tensor:
    in_h, in_w = labels.shape[-2:]
    rows = [min(i * in_h // height, in_h - 1) for i in range(height)]
    cols = [min(j * in_w // width, in_w - 1) for j in range(width)]
    return labels[:, rows][:, :, cols]


def ifvd_similarity_reference(features: Tensor, labels: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    r"""Each pixel's cosine similarity to the mean feature of its class in its image, in float64.

    .. math::

        c_{n,k} = \frac{\sum_{p:\,y_{n,p}=k} f_{n,p}}{|\{p : y_{n,p}=k\}| + 10^{-6}}, \qquad
        s_{n,p} = \frac{f_{n,p} \cdot c_{n,y_{n,p}}}
            {\max(\lVert f_{n,p} \rVert, 10^{-8})\,\max(\lVert c_{n,y_{n,p}} \rVert, 10^{-8})},

    and :math:`s_{n,p} = 1` where :math:`y_{n,p}` is ``ignore_index`` or outside ``[0, num_classes)``.

    Reference: Y. Wang, W. Zhou, T. Jiang, X. Bai, Y. Xu, "Intra-class Feature Variation
    Distillation for Semantic Segmentation", ECCV 2020.

    Args:
        features: feature maps.
        labels: integer class ids at any resolution (nearest-resampled to ``h x w``).
        num_classes: number of classes.
        ignore_index: label of pixels set to similarity 1.

    Shape:
        - features: ``(N, C, h, w)``; labels: ``(N, H, W)``.
        - output: ``(N, h, w)``.

    Returns:
        The float64 similarity map (differentiable with respect to ``features``).

    Example:
        >>> import torch
        >>> from segkd.testing.reference.ifvd import ifvd_similarity_reference
        >>> features = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # two pixels at right angles
        >>> ifvd_similarity_reference(features, torch.tensor([[[0, 0]]]), num_classes=1)
        tensor([[[0.7071, 0.7071]]], dtype=torch.float64)
    """
    feats = features.to(torch.float64)
    batch, _, height, width = feats.shape
    small = _nearest_reference(labels, height, width)
    one = torch.ones((), dtype=torch.float64, device=feats.device)
    rows = []
    for n in range(batch):
        centres = {}
        for k in range(num_classes):
            if k == ignore_index:
                continue
            mask = (small[n] == k).to(torch.float64)
            centres[k] = (feats[n] * mask).sum(dim=(1, 2)) / (mask.sum() + 1e-6)
        sims = []
        for i in range(height):
            for j in range(width):
                k = int(small[n, i, j])
                if k not in centres:  # ignore_index or an id outside [0, num_classes)
                    sims.append(one)
                    continue
                f, c = feats[n, :, i, j], centres[k]
                f_norm = torch.clamp(torch.linalg.vector_norm(f), min=1e-8)
                c_norm = torch.clamp(torch.linalg.vector_norm(c), min=1e-8)
                sims.append(torch.dot(f, c) / (f_norm * c_norm))
        rows.append(torch.stack(sims).view(height, width))
    return torch.stack(rows)


def ifvd_loss_reference(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor,
    num_classes: int,
    ignore_index: int = 255,
    reduction: str = "mean",
) -> Tensor:
    r"""Intra-class feature variation distillation loss, in float64.

    .. math::

        L = \frac{1}{N h w} \sum_{n, p} \left(s^S_{n,p} - s^T_{n,p}\right)^2

    with :math:`s` from :func:`ifvd_similarity_reference`.

    Reference: Y. Wang et al., "Intra-class Feature Variation Distillation for Semantic
    Segmentation", ECCV 2020.

    Args:
        student: student features.
        teacher: teacher features (same ``N``, ``h``, ``w``; any channel count).
        labels: integer class ids at any resolution.
        num_classes: number of classes.
        ignore_index: label of ignored pixels.
        reduction: ``"mean"`` (the formula), ``"sum"`` or ``"none"`` (the ``(N, h, w)`` squared differences).

    Shape:
        - student: ``(N, C_S, h, w)``; teacher: ``(N, C_T, h, w)``; labels: ``(N, H, W)``.
        - output: scalar, or ``(N, h, w)`` for ``reduction="none"``.

    Returns:
        The float64 loss. The teacher is not detached.

    Raises:
        ValueError: an unknown ``reduction``.

    Example:
        >>> import torch
        >>> from segkd.testing.reference.ifvd import ifvd_loss_reference
        >>> student = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
        >>> teacher = torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]]]])  # both pixels on their centre
        >>> round(ifvd_loss_reference(student, teacher, torch.tensor([[[0, 0]]]), 1).item(), 6)
        0.085786
    """
    sim_s = ifvd_similarity_reference(student, labels, num_classes, ignore_index)
    sim_t = ifvd_similarity_reference(teacher, labels, num_classes, ignore_index)
    terms = (sim_s - sim_t) ** 2
    return reduce_terms(terms, reduction)
