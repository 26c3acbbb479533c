r"""Cross-image relational knowledge distillation (CIRKD), Yang et al., CVPR 2022.

Three pieces, faithful to the authors' code (github.com/winycg/CIRKD):

- :func:`cirkd_minibatch_loss` / :class:`CIRKDMiniBatchLoss`: pixel-to-pixel similarity
  distributions between every pair of images of the mini-batch.
- :func:`cirkd_memory_kl` / :class:`CIRKDMemoryLoss`: pixel-to-pixel and pixel-to-region
  similarity distributions against entries sampled from per-class queues of teacher embeddings
  (the module owns the student projection head and the queues).
- :class:`CIRKDLoss`: the three terms plus pixel-wise KD on logits, with the paper's weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkd import _checks
from segkd.losses._cirkd_blocks import check_block_size, memory_kl, minibatch_kl
from segkd.losses._cirkd_memory import (
    concat_all_gather,
    enqueue_pixels,
    enqueue_regions,
    queue_nbytes,
    resize_labels_nearest,
    sample_queue,
)
from segkd.losses._dtypes import compute_dtype, to_layer_dtype
from segkd.losses._reduction import reduce_terms
from segkd.losses._vectors import unit_vectors
from segkd.losses.kd import pixel_kd_loss

if TYPE_CHECKING:
    from segkd.testing.checks import LossDeclaration

__all__ = [
    "CIRKDLoss",
    "CIRKDMemoryLoss",
    "CIRKDMiniBatchLoss",
    "cirkd_memory_kl",
    "cirkd_minibatch_loss",
]

Reduction = Literal["mean", "sum", "none"]


def _full_precision(reference: Tensor) -> torch.autocast:
    # The similarities are computed in the dtype chosen by compute_dtype, autocast or not.
    return torch.autocast(device_type=reference.device.type, enabled=False)


def _check_features(student: Tensor, teacher: Tensor) -> None:
    _checks.check_student_teacher_features(student, teacher)


def cirkd_minibatch_loss(
    student_feat: Tensor,
    teacher_feat: Tensor,
    tau: float = 0.1,
    pool: int | None = None,
    reduction: Reduction = "mean",
    block_size: int | None = None,
) -> Tensor:
    r"""CIRKD mini-batch pixel-to-pixel loss: cross-image similarity distributions of every image pair.

    With :math:`f_i \in \mathbb{R}^{C \times L}` the L2-normalised (along channels) feature map of
    image :math:`i` flattened over its :math:`L = hw` positions (after the optional pooling),

    .. math::

        S_{ij} = f_i^\top f_j / \tau \in \mathbb{R}^{L \times L}, \qquad
        L_{\text{mb}} = \frac{1}{B^2} \sum_{i, j = 1}^{B} \frac{1}{L} \sum_{u = 1}^{L}
            \mathrm{KL}\left(\mathrm{softmax}(S^T_{ij}[u, :]) \,\|\, \mathrm{softmax}(S^S_{ij}[u, :])\right).

    Each similarity matrix compares a model with itself, so the student and teacher **channel
    counts may differ**: CIRKD applies this term to the raw student feature (its projection head
    serves only the memory term). There is no ``tau**2`` factor, as in the original code.

    Reference: C. Yang, H. Zhou, Z. An, X. Jiang, Y. Xu, Q. Zhang, "Cross-Image Relational
    Knowledge Distillation for Semantic Segmentation", CVPR 2022.

    Memory: the similarities are computed in blocks of at most ``block_size`` anchor pixels (rows
    ``u`` of one image ``i``, against all ``B L`` pixels of the batch), and each block's gradient is
    formed and contracted with the features at once; what autograd keeps is the size of the features
    (``B C_s L`` numbers; ``2 B^2 C_s L`` with ``reduction="none"``). The peak is about four
    ``block_size x B L`` tensors (see ``docs/losses/cirkd.md``, "Memory-bounded blocks", for figures),
    where the unblocked formula peaks at about three ``B^2 L^2`` tensors (``~12 B^2 L^2`` bytes in fp32,
    3.3 GB for ``B = 2`` and a ``64 x 128`` feature map). ``block_size=None`` computes all pairs at once
    by plain autograd when four ``B L x B L`` tensors fit 256 MiB (faster), else picks the most anchors
    per block that fit it. ``pool=k`` averages ``k x k`` windows first (stride ``k``, the last window
    partial, as ``AvgPool2d(k, k, ceil_mode=True)``), dividing ``L`` by about ``k^2``. The authors'
    latest code pools ``4 x 4`` once both sides are >= 256; their first release does not pool. Computed
    in blocks, the result is not twice differentiable.

    The teacher is detached inside: it never receives a gradient. A student feature vector that is
    exactly zero (no direction) passes no gradient, where ``F.normalize`` would pass ``1e12`` times the
    upstream gradient (inf in fp16).

    Args:
        student_feat: student feature map.
        teacher_feat: teacher feature map, same ``N, H, W`` and device; any channel count.
        tau: temperature of the similarity softmax, > 0 (paper: 0.1).
        pool: kernel (= stride) of an average pooling applied first, or ``None`` for none.
        reduction: ``"mean"`` averages over the ``B^2`` ordered pairs (the formula); ``"sum"``
            adds them; ``"none"`` returns the ``(B, B)`` per-pair terms (mean over rows).
        block_size: anchor pixels per block (>= 1; a block never spans two images), or ``None``: no
            blocks if everything fits 256 MiB, else blocks that do. Changes memory and speed, not the result.

    Shape:
        - student_feat: ``(N, C_s, H, W)``; teacher_feat: ``(N, C_t, H, W)``.
        - output: scalar, or ``(N, N)`` with ``reduction="none"``.

    Returns:
        The loss, in fp32 (fp64 for fp64 inputs).

    Raises:
        TypeError: non-tensor or integer features, non-numeric ``tau``, non-int ``pool`` or ``block_size``.
        ValueError: not 4-D, ``N``/``H``/``W`` or device differ, empty input, ``tau`` outside ``[1e-12, 1e12]``,
            ``pool < 1``, ``block_size < 1``, unknown ``reduction``.

    Example:
        >>> import torch
        >>> from segkd.losses.cirkd import cirkd_minibatch_loss
        >>> _ = torch.manual_seed(0)
        >>> student = torch.randn(2, 8, 6, 6, requires_grad=True)
        >>> teacher = torch.randn(2, 16, 6, 6)
        >>> loss = cirkd_minibatch_loss(student, teacher, tau=0.1)
        >>> round(loss.item(), 4)
        2.9569
        >>> loss.backward()
        >>> round(cirkd_minibatch_loss(teacher, teacher).item(), 4)
        0.0
    """
    reduction = _checks.check_reduction(reduction)  # type: ignore[assignment]
    _check_features(student_feat, teacher_feat)
    tau = _checks.check_temperature(tau)
    if pool is not None:
        pool = _checks.check_positive_int(pool, "pool")
    block_size = check_block_size(block_size)
    dtype = compute_dtype(student_feat, teacher_feat)
    student = student_feat.to(dtype)
    teacher = teacher_feat.detach().to(dtype)
    if pool is not None and pool > 1:
        student = F.avg_pool2d(student, pool, stride=pool, ceil_mode=True)
        teacher = F.avg_pool2d(teacher, pool, stride=pool, ceil_mode=True)

    with _full_precision(student):
        # (B, C, L) unit vectors; a zero student vector passes no gradient.
        terms = minibatch_kl(
            unit_vectors(student.flatten(2)), unit_vectors(teacher.flatten(2)), tau, block_size, reduction
        )
    return reduce_terms(terms, reduction)


class CIRKDMiniBatchLoss(nn.Module):
    r"""CIRKD mini-batch pixel-to-pixel loss as a module; see :func:`cirkd_minibatch_loss`.

    Args:
        tau: temperature of the similarity softmax, > 0 (paper: 0.1).
        pool: kernel (= stride) of an average pooling applied first, or ``None``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        block_size: anchor pixels per block, or ``None`` (256 MiB of temporaries); see :func:`cirkd_minibatch_loss`.

    Shape:
        - student, teacher: ``(N, C_s, H, W)`` and ``(N, C_t, H, W)``.
        - output: scalar, or ``(N, N)`` with ``reduction="none"``.

    Example:
        >>> import torch
        >>> from segkd.losses.cirkd import CIRKDMiniBatchLoss
        >>> _ = torch.manual_seed(0)
        >>> criterion = CIRKDMiniBatchLoss(tau=0.1)
        >>> student, teacher = torch.randn(2, 8, 6, 6), torch.randn(2, 16, 6, 6)
        >>> round(criterion(student, teacher).item(), 4)
        2.9569
    """

    def __init__(
        self,
        tau: float = 0.1,
        pool: int | None = None,
        reduction: Reduction = "mean",
        block_size: int | None = None,
    ) -> None:
        super().__init__()
        self.tau = _checks.check_temperature(tau)
        self.pool = None if pool is None else _checks.check_positive_int(pool, "pool")
        self.reduction: Reduction = _checks.check_reduction(reduction)  # type: ignore[assignment]
        self.block_size = check_block_size(block_size)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return cirkd_minibatch_loss(student, teacher, self.tau, self.pool, self.reduction, self.block_size)

    def distillation_checks(self) -> LossDeclaration:
        """The properties :func:`segkd.testing.check_distillation_loss` checks on this loss, and its reference."""
        from segkd.testing.checks import LossDeclaration
        from segkd.testing.reference import cirkd_minibatch_loss_reference

        tau, pool, reduction = self.tau, self.pool, self.reduction
        return LossDeclaration(
            zero_at_equal=True,
            reference=lambda s, t: cirkd_minibatch_loss_reference(s, t, tau, pool, reduction),
        )

    def extra_repr(self) -> str:
        return f"tau={self.tau}, pool={self.pool}, reduction={self.reduction!r}, block_size={self.block_size}"


def _check_entries(entries: Tensor, name: str, dim: int) -> None:
    _checks.check_floating_tensor(entries, name)
    _checks.check_exact_dims(entries, name, 2, "(M, D)")
    _checks.check_dim_size(entries, name, 1, dim, "the feature width D of `teacher`")
    _checks.check_nonempty(entries, name)


def cirkd_memory_kl(
    student_embed: Tensor,
    teacher_embed: Tensor,
    labels: Tensor,
    pixel_entries: Tensor,
    region_entries: Tensor,
    contrast_tau: float = 0.1,
    kd_tau: float = 1.0,
    ignore_index: int = 255,
    block_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""CIRKD memory-based pixel-to-pixel and pixel-to-region loss, given sampled queue entries.

    Student and teacher embeddings are L2-normalised along channels; labels are nearest-resized
    to the embeddings' ``h x w`` and the :math:`V` pixels whose label is not ``ignore_index``
    become anchors :math:`s_v, t_v`. For the entries :math:`E` (rows: unit teacher embeddings
    sampled from the queues, used as given),

    .. math::

        z^S_v = \frac{E s_v}{\tau_c}, \quad z^T_v = \frac{E t_v}{\tau_c}, \qquad
        L = \frac{\tau_k^2}{V} \sum_{v=1}^{V}
            \mathrm{KL}\left(\mathrm{softmax}(z^T_v / \tau_k) \,\|\, \mathrm{softmax}(z^S_v / \tau_k)\right),

    computed once with the pixel entries (pixel-to-pixel) and once with the region entries
    (pixel-to-region). With no anchor (``V = 0``) both terms are ``sum(0 * student_embed)``: zero,
    finite, still attached to the graph (the original returns NaN there). A student embedding vector
    that is exactly zero (no direction) passes no gradient, where ``F.normalize`` would pass
    ``1e12`` times the upstream gradient (inf, then NaN in the projection head, under fp16).

    Reference: C. Yang, H. Zhou, Z. An, X. Jiang, Y. Xu, Q. Zhang, "Cross-Image Relational
    Knowledge Distillation for Semantic Segmentation", CVPR 2022.

    The teacher embedding and the entries are detached inside: they never receive a gradient.

    Memory: the ``V x M`` logits are computed in blocks of at most ``block_size`` anchors, each block's
    gradient contracted with the entries at once; autograd keeps ``V D`` numbers per term and the peak
    is about four ``block_size x M`` tensors (unblocked: two ``V x M`` kept, three at the peak). With
    ``block_size=None`` there are no blocks (plain autograd) when four ``V x M`` tensors fit 256 MiB.
    Computed in blocks, the result is not twice differentiable.

    Args:
        student_embed: student embedding, already projected to the teacher's width (CIRKD's
            projection head; :class:`CIRKDMemoryLoss` applies it).
        teacher_embed: teacher feature, same shape and device.
        labels: class ids; any ``H x W`` (nearest-resized: output ``(i, j)`` takes input
            ``(floor(i H / h), floor(j W / w))``).
        pixel_entries: sampled pixel-queue entries.
        region_entries: sampled region-queue entries.
        contrast_tau: temperature of the similarities, > 0 (paper: 0.1).
        kd_tau: temperature of the KL between the similarity distributions, > 0 (paper: 1).
        ignore_index: label of pixels that are not anchors.
        block_size: anchors per block (>= 1), or ``None``: no blocks if everything fits 256 MiB, else
            blocks that do. Changes memory and speed, not the result.

    Shape:
        - student_embed, teacher_embed: ``(N, D, h, w)``.
        - labels: ``(N, H, W)``, integer.
        - pixel_entries: ``(M_p, D)``; region_entries: ``(M_r, D)``.
        - output: two scalars ``(pixel_to_pixel, pixel_to_region)``.

    Returns:
        The two losses, in fp32 (fp64 for fp64 inputs).

    Raises:
        TypeError: non-tensor or integer features or entries, floating labels, non-numeric temperatures,
            non-int ``block_size``.
        ValueError: shapes or devices differ, wrong number of dims, entries of another width,
            labels of another batch size, empty input, temperatures <= 0, ``block_size < 1``.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from segkd.losses.cirkd import cirkd_memory_kl
        >>> _ = torch.manual_seed(0)
        >>> student = torch.randn(2, 16, 4, 4, requires_grad=True)
        >>> teacher = torch.randn(2, 16, 4, 4)
        >>> labels = torch.randint(0, 3, (2, 16, 16))
        >>> pixels, regions = F.normalize(torch.randn(30, 16), dim=1), F.normalize(torch.randn(9, 16), dim=1)
        >>> p2p, p2r = cirkd_memory_kl(student, teacher, labels, pixels, regions)
        >>> round(p2p.item(), 4), round(p2r.item(), 4)
        (4.7027, 3.2419)
        >>> (p2p + p2r).backward()
    """
    _checks.check_floating_tensor(student_embed, "student_embed")
    _checks.check_floating_tensor(teacher_embed, "teacher_embed")
    _checks.check_exact_dims(student_embed, "student_embed", 4, "(N, D, h, w)")
    _checks.check_same_shape(student_embed, teacher_embed, "student_embed", "teacher_embed")
    _checks.check_same_device(student_embed, teacher_embed, "student_embed", "teacher_embed")
    _checks.check_nonempty(student_embed, "student_embed")
    labels = _checks.check_labels(labels, batch_size=student_embed.shape[0])
    _checks.check_same_device(student_embed, labels, "student_embed", "labels")
    dim = student_embed.shape[1]
    _check_entries(pixel_entries, "pixel_entries", dim)
    _check_entries(region_entries, "region_entries", dim)
    contrast_tau = _checks.check_temperature(contrast_tau, "contrast_tau")
    kd_tau = _checks.check_temperature(kd_tau, "kd_tau")
    ignore_index = _checks.check_int(ignore_index, "ignore_index")
    block_size = check_block_size(block_size)
    _checks.check_finite_if_enabled(student_embed, "student_embed")
    _checks.check_finite_if_enabled(teacher_embed, "teacher_embed")

    dtype = compute_dtype(student_embed, teacher_embed)
    labels = resize_labels_nearest(labels, (student_embed.shape[2], student_embed.shape[3]))
    anchors = (labels != ignore_index).flatten()
    student = unit_vectors(student_embed.to(dtype)).permute(0, 2, 3, 1).reshape(-1, dim)[anchors]
    teacher = F.normalize(teacher_embed.detach().to(dtype), p=2, dim=1).permute(0, 2, 3, 1).reshape(-1, dim)[anchors]
    if student.shape[0] == 0:
        # Multiply before summing: the sum of large fp16 values overflows to inf, and inf * 0 is NaN.
        zero = (student_embed.to(dtype) * 0.0).sum()
        return zero, zero.clone()
    scale = 1.0 / (contrast_tau * kd_tau)

    def term(entries: Tensor) -> Tensor:
        return memory_kl(student, teacher, entries.detach().to(dtype), scale, block_size) * (kd_tau * kd_tau)

    with _full_precision(student):
        return term(pixel_entries), term(region_entries)


class CIRKDMemoryLoss(nn.Module):
    r"""CIRKD memory-based pixel-to-pixel and pixel-to-region loss, with its projection head and queues.

    Each call (in training mode) first pushes the current teacher embeddings, gathered from every
    DDP rank, into per-class queues: per image and present class, the renormalised mean embedding
    into the region queue and up to ``pixel_update_freq`` random pixels into the pixel queue
    (pointers wrap around). It then samples ``pixel_contrast_size // num_classes + 1`` slots per
    class from the pixel queue and ``region_contrast_size // num_classes + 1`` from the region
    queue (the same slots for every class, capped at the queue length) and returns
    :func:`cirkd_memory_kl` of the projected student against them: with ``g`` the projection head,
    :math:`E_p` / :math:`E_r` the sampled entries and :math:`V` anchor pixels,

    .. math::

        L_{\text{p2p}} = \frac{\tau_k^2}{V} \sum_{v=1}^{V}
            \mathrm{KL}\left(\mathrm{softmax}\left(\frac{E_p \hat t_v}{\tau_c \tau_k}\right) \,\Big\|\,
            \mathrm{softmax}\left(\frac{E_p \widehat{g(s)}_v}{\tau_c \tau_k}\right)\right),

    and :math:`L_{\text{p2r}}` the same with :math:`E_r` (hats: L2-normalised along channels).

    Reference: C. Yang, H. Zhou, Z. An, X. Jiang, Y. Xu, Q. Zhang, "Cross-Image Relational
    Knowledge Distillation for Semantic Segmentation", CVPR 2022. The paper's weights are 0.1 for
    each term; ``contrast_tau=0.1``, ``kd_tau=1``; sizes as the defaults here.

    **Trainable parts**: ``project_head`` (1x1 conv ``C_s -> D``, BatchNorm, ReLU, 1x1 conv
    ``D -> D``, no biases; ``D = teacher_channels``). Give ``CIRKDMemoryLoss.parameters()`` to the
    optimizer together with the student's. Under DDP, convert the BatchNorm with
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` to match the original, and wrap the module in DDP
    (or include it in the student's DDP module) so its gradients are averaged.
    Outside autocast a student of another floating dtype is cast to the head's dtype (its gradient
    comes back in the student's dtype).

    **Buffers** (in ``state_dict``): ``pixel_queue`` ``(K, P, D)``, ``pixel_queue_ptr`` ``(K,)``,
    ``region_queue`` ``(K, R, D)``, ``region_queue_ptr`` ``(K,)``. Queues start as random unit
    vectors, as in the original. Memory: ``K * (P + R) * D * itemsize + 16 K`` bytes, e.g.
    ``150 * 22000 * 256 * 4`` = 3.4 GB in fp32 for ADE20K with ``D = 256`` (the pixel queue alone is
    3.07 GB); ``queue_dtype=torch.bfloat16`` or ``torch.float16`` halves it, smaller
    ``pixel_memory_size`` divides it further (see :meth:`queue_nbytes`).

    **DDP**: with ``torch.distributed`` initialised, the teacher embeddings and labels of all ranks
    are concatenated (``all_gather``, rank order) before enqueueing, so every rank keeps identical
    queues if they started identical (same seed, or broadcast the buffers; DDP broadcasts buffers
    from rank 0 when the module is wrapped). Every rank must call ``forward`` with the same shapes
    (use ``drop_last=True``). Without DDP the gather is a no-op.

    Deviations from the original, all documented: pixels enqueued for a class are drawn among that
    class's pixels (the original indexes the whole image with a permutation of the class's pixel
    count); no anchors gives zero instead of NaN; in eval mode nothing is enqueued; when
    enqueueing, labels outside ``[0, K)`` other than ``ignore_index`` raise ``ValueError``.

    Args:
        num_classes: ``K``, number of classes.
        student_channels: ``C_s``, channels of the student feature.
        teacher_channels: ``D``, channels of the teacher feature (queue width).
        pixel_memory_size: ``P``, pixel-queue length per class (paper: 20000).
        region_memory_size: ``R``, region-queue length per class (paper: 2000).
        pixel_contrast_size: total pixel entries sampled per step, split over classes (paper: 4096).
        region_contrast_size: total region entries sampled per step (paper: 1024).
        contrast_tau: temperature of the similarities, > 0 (paper: 0.1).
        kd_tau: temperature of the KL, > 0 (paper: 1).
        ignore_index: label of pixels neither enqueued nor used as anchors.
        pixel_update_freq: most pixels enqueued per image and class (original: 16).
        queue_dtype: dtype of the queues (``torch.float32``, or ``torch.bfloat16``/``torch.float16``
            for half the memory).
        generator: source of every random draw (queue initialisation, pixels to enqueue, slots
            to sample), on any device; the global RNG when ``None``. Not saved in ``state_dict``.
        block_size: anchors per block of the similarities, or ``None`` (256 MiB of temporaries); see
            :func:`cirkd_memory_kl`.

    Shape:
        - student: ``(N, C_s, h, w)``; teacher: ``(N, D, h, w)``; labels: ``(N, H, W)``, integer.
        - output: two scalars ``(pixel_to_pixel, pixel_to_region)``.

    Raises:
        TypeError: non-int sizes, non-numeric temperatures, a ``queue_dtype`` that is not a floating
            dtype, a ``generator`` that is not a ``torch.Generator``; in ``forward``, as
            :func:`cirkd_memory_kl`.
        ValueError: sizes < 1, temperatures <= 0; in ``forward``, channel counts other than
            ``student_channels`` / ``teacher_channels``, mismatched ``N, h, w``, labels of another
            batch size and, in training mode, labels outside ``[0, K)`` other than ``ignore_index``.

    Example:
        >>> import torch
        >>> from segkd.losses.cirkd import CIRKDMemoryLoss
        >>> _ = torch.manual_seed(0)
        >>> criterion = CIRKDMemoryLoss(3, 8, 16, pixel_memory_size=40, region_memory_size=10,
        ...                             pixel_contrast_size=30, region_contrast_size=9,
        ...                             generator=torch.Generator().manual_seed(0))
        >>> student, teacher = torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4)
        >>> labels = torch.randint(0, 3, (2, 16, 16))
        >>> p2p, p2r = criterion(student, teacher, labels)
        >>> round(p2p.item(), 4), round(p2r.item(), 4)
        (4.8546, 4.4423)
        >>> criterion.pixel_queue_ptr
        tensor([ 8, 13, 11])
        >>> sorted(name for name, _ in criterion.named_buffers() if "queue" in name)[:2]
        ['pixel_queue', 'pixel_queue_ptr']
    """

    pixel_queue: Tensor
    pixel_queue_ptr: Tensor
    region_queue: Tensor
    region_queue_ptr: Tensor

    def __init__(
        self,
        num_classes: int,
        student_channels: int,
        teacher_channels: int,
        pixel_memory_size: int = 20000,
        region_memory_size: int = 2000,
        pixel_contrast_size: int = 4096,
        region_contrast_size: int = 1024,
        contrast_tau: float = 0.1,
        kd_tau: float = 1.0,
        ignore_index: int = 255,
        *,
        pixel_update_freq: int = 16,
        queue_dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
        block_size: int | None = None,
    ) -> None:
        super().__init__()
        self.block_size = check_block_size(block_size)
        self.num_classes = _checks.check_positive_int(num_classes, "num_classes")
        self.student_channels = _checks.check_positive_int(student_channels, "student_channels")
        self.teacher_channels = _checks.check_positive_int(teacher_channels, "teacher_channels")
        self.pixel_memory_size = _checks.check_positive_int(pixel_memory_size, "pixel_memory_size")
        self.region_memory_size = _checks.check_positive_int(region_memory_size, "region_memory_size")
        self.pixel_contrast_size = _checks.check_positive_int(pixel_contrast_size, "pixel_contrast_size")
        self.region_contrast_size = _checks.check_positive_int(region_contrast_size, "region_contrast_size")
        self.contrast_tau = _checks.check_temperature(contrast_tau, "contrast_tau")
        self.kd_tau = _checks.check_temperature(kd_tau, "kd_tau")
        self.ignore_index = _checks.check_int(ignore_index, "ignore_index")
        self.pixel_update_freq = _checks.check_positive_int(pixel_update_freq, "pixel_update_freq")
        self.queue_dtype = _checks.check_floating_dtype(queue_dtype, "queue_dtype")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"Expected `generator` to be a torch.Generator or None, got {type(generator).__name__}.")
        self.generator = generator

        width = self.teacher_channels
        self.project_head = nn.Sequential(
            nn.Conv2d(self.student_channels, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 1, bias=False),
        )
        self.register_buffer("pixel_queue", self._random_unit_queue(self.pixel_memory_size))
        self.register_buffer("pixel_queue_ptr", torch.zeros(self.num_classes, dtype=torch.long))
        self.register_buffer("region_queue", self._random_unit_queue(self.region_memory_size))
        self.register_buffer("region_queue_ptr", torch.zeros(self.num_classes, dtype=torch.long))

    def _random_unit_queue(self, length: int) -> Tensor:
        source = self.generator.device if self.generator is not None else torch.device("cpu")
        queue = torch.empty(self.num_classes, length, self.teacher_channels, device=source)
        queue.normal_(generator=self.generator)
        return F.normalize(queue, p=2, dim=2).to(device="cpu", dtype=self.queue_dtype)

    @staticmethod
    def queue_nbytes(
        num_classes: int,
        teacher_channels: int,
        pixel_memory_size: int = 20000,
        region_memory_size: int = 2000,
        queue_dtype: torch.dtype = torch.float32,
    ) -> int:
        """Bytes of the queue buffers: ``K * (P + R) * D * itemsize + 2 * K * 8`` (the pointers).

        Example:
            >>> from segkd.losses.cirkd import CIRKDMemoryLoss
            >>> CIRKDMemoryLoss.queue_nbytes(150, 256) / 1e9  # ADE20K, fp32
            3.3792024
        """
        return queue_nbytes(num_classes, teacher_channels, pixel_memory_size, region_memory_size, queue_dtype)

    @torch.no_grad()
    def enqueue(self, teacher: Tensor, labels: Tensor) -> None:
        """Push teacher embeddings of one step into the queues (gathered across DDP ranks).

        Args:
            teacher: ``(N, D, h, w)`` teacher feature (normalised here).
            labels: ``(N, h, w)`` class ids at the feature's resolution.

        Raises:
            ValueError: a label outside ``[0, K)`` other than ``ignore_index``.
        """
        _checks.check_label_values(labels, self.num_classes, self.ignore_index)
        features = concat_all_gather(
            F.normalize(teacher.detach().to(compute_dtype(teacher, self.pixel_queue)), p=2, dim=1)
        )
        labels = concat_all_gather(labels)
        enqueue_regions(self.region_queue, self.region_queue_ptr, features, labels, self.ignore_index)
        enqueue_pixels(
            self.pixel_queue,
            self.pixel_queue_ptr,
            features,
            labels,
            self.ignore_index,
            self.pixel_update_freq,
            self.generator,
        )

    def sample_entries(self) -> tuple[Tensor, Tensor]:
        """Sample the contrast entries of one step: ``(pixel_entries, region_entries)``, class-major."""
        per_class_pixels = self.pixel_contrast_size // self.num_classes + 1
        per_class_regions = self.region_contrast_size // self.num_classes + 1
        pixels = sample_queue(self.pixel_queue, per_class_pixels, self.generator)
        regions = sample_queue(self.region_queue, per_class_regions, self.generator)
        return pixels, regions

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        _check_features(student, teacher)
        _checks.check_channels(student, "student", self.student_channels, "student_channels")
        _checks.check_channels(teacher, "teacher", self.teacher_channels, "teacher_channels")
        labels = _checks.check_labels(labels, batch_size=student.shape[0])
        _checks.check_same_device(student, labels, "student", "labels")
        small_labels = resize_labels_nearest(labels, (student.shape[2], student.shape[3]))
        if self.training:
            self.enqueue(teacher, small_labels)
        pixels, regions = self.sample_entries()
        return cirkd_memory_kl(
            self.project_head(to_layer_dtype(student, self.project_head)),
            teacher,
            small_labels,
            pixels,
            regions,
            self.contrast_tau,
            self.kd_tau,
            self.ignore_index,
            self.block_size,
        )

    def distillation_checks(self) -> LossDeclaration:
        """The inputs :func:`segkd.testing.check_distillation_loss` needs: labels, and the teacher's width."""
        from segkd.testing.checks import LossDeclaration

        return LossDeclaration(
            with_labels=True,
            num_classes=self.num_classes,
            ignore_index=self.ignore_index,
            teacher_channels=self.teacher_channels,
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, pixel_memory_size={self.pixel_memory_size}, "
            f"region_memory_size={self.region_memory_size}, pixel_contrast_size={self.pixel_contrast_size}, "
            f"region_contrast_size={self.region_contrast_size}, contrast_tau={self.contrast_tau}, "
            f"kd_tau={self.kd_tau}, ignore_index={self.ignore_index}, queue_dtype={self.queue_dtype}"
        )


class CIRKDLoss(nn.Module):
    r"""The full CIRKD distillation objective: pixel KD + mini-batch + memory pixel and region terms.

    .. math::

        L = w_{kd}\, L_{kd} + w_{mb}\, L_{\text{mb}} + w_{p}\, L_{\text{p2p}} + w_{r}\, L_{\text{p2r}},

    with :math:`L_{kd} = \tau^2 \frac{1}{NHW}\sum \mathrm{KL}(\mathrm{softmax}(t/\tau) \| \mathrm{softmax}(s/\tau))`
    per pixel over classes on logits, over every pixel as the original
    (:func:`segkd.losses.kd.pixel_kd_loss`), :math:`L_{\text{mb}}` from :func:`cirkd_minibatch_loss`
    (raw features) and :math:`L_{\text{p2p}}, L_{\text{p2r}}` from :class:`CIRKDMemoryLoss` (projected
    student features against the teacher queues). The task loss (cross-entropy) is not included.

    Reference: C. Yang, H. Zhou, Z. An, X. Jiang, Y. Xu, Q. Zhang, "Cross-Image Relational
    Knowledge Distillation for Semantic Segmentation", CVPR 2022. The authors' training script
    uses ``kd_weight=1`` (``tau=1``), ``minibatch_weight=1``, ``memory_pixel_weight=0.1``,
    ``memory_region_weight=0.1``: the defaults here.

    **Trainable parts**: the memory term's projection head. Give ``CIRKDLoss.parameters()`` to the
    optimizer together with the student's. The queues are buffers of ``self.memory`` (see
    :class:`CIRKDMemoryLoss` for their memory cost, ``queue_dtype`` and DDP behaviour).

    The teacher is detached inside: it never receives a gradient.

    Args:
        num_classes: number of classes ``K``.
        student_channels: channels of the student feature.
        teacher_channels: channels of the teacher feature.
        kd_weight: weight of the pixel-wise KD on logits (paper: 1).
        minibatch_weight: weight of the mini-batch pixel-to-pixel term (paper: 1).
        memory_pixel_weight: weight of the memory pixel-to-pixel term (paper: 0.1).
        memory_region_weight: weight of the memory pixel-to-region term (paper: 0.1).
        kd_tau: temperature of the pixel-wise KD, > 0 (paper: 1).
        contrast_tau: temperature of every similarity (mini-batch and memory), > 0 (paper: 0.1).
        contrast_kd_tau: temperature of the memory KL, > 0 (paper: 1).
        minibatch_pool: average-pooling kernel before the mini-batch term, or ``None``.
        pixel_memory_size: pixel-queue length per class (paper: 20000).
        region_memory_size: region-queue length per class (paper: 2000).
        pixel_contrast_size: pixel entries sampled per step (paper: 4096).
        region_contrast_size: region entries sampled per step (paper: 1024).
        ignore_index: label of ignored pixels.
        pixel_update_freq: most pixels enqueued per image and class (16).
        queue_dtype: dtype of the queues.
        generator: source of the memory term's random draws; the global RNG when ``None``.
        block_size: anchor pixels per block of the mini-batch and memory similarities, or ``None`` to
            fit each block's temporaries in 256 MiB (see :func:`cirkd_minibatch_loss`).

    Shape:
        - student_logits, teacher_logits: ``(N, K', H', W')``, the same shape.
        - student_feat: ``(N, C_s, h, w)``; teacher_feat: ``(N, C_t, h, w)``.
        - labels: ``(N, H, W)``, integer, any resolution.
        - output: ``(total, terms)``: a scalar and a dict with keys ``"kd"``, ``"minibatch"``,
          ``"memory_pixel"`` and ``"memory_region"``, each already multiplied by its weight
          (so ``total`` is their sum; a term whose weight is 0 is skipped and reported as 0).

    Raises:
        TypeError: as the three terms.
        ValueError: negative weights, logits of different shapes or not 4-D, features whose batch
            size differs from the logits', and the errors of the three terms.

    Example:
        >>> import torch
        >>> from segkd.losses.cirkd import CIRKDLoss
        >>> _ = torch.manual_seed(0)
        >>> criterion = CIRKDLoss(3, 8, 16, pixel_memory_size=40, region_memory_size=10,
        ...                       pixel_contrast_size=30, region_contrast_size=9,
        ...                       generator=torch.Generator().manual_seed(0))
        >>> s_logits, t_logits = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
        >>> s_feat, t_feat = torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4)
        >>> labels = torch.randint(0, 3, (2, 16, 16))
        >>> total, terms = criterion(s_logits, t_logits, s_feat, t_feat, labels)
        >>> {name: round(value.item(), 4) for name, value in terms.items()}
        {'kd': 0.5112, 'minibatch': 2.5929, 'memory_pixel': 0.4631, 'memory_region': 0.3357}
        >>> optimizer = torch.optim.SGD(criterion.parameters(), lr=0.01)  # the projection head
    """

    def __init__(
        self,
        num_classes: int,
        student_channels: int,
        teacher_channels: int,
        *,
        kd_weight: float = 1.0,
        minibatch_weight: float = 1.0,
        memory_pixel_weight: float = 0.1,
        memory_region_weight: float = 0.1,
        kd_tau: float = 1.0,
        contrast_tau: float = 0.1,
        contrast_kd_tau: float = 1.0,
        minibatch_pool: int | None = None,
        pixel_memory_size: int = 20000,
        region_memory_size: int = 2000,
        pixel_contrast_size: int = 4096,
        region_contrast_size: int = 1024,
        ignore_index: int = 255,
        pixel_update_freq: int = 16,
        queue_dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
        block_size: int | None = None,
    ) -> None:
        super().__init__()
        self.kd_weight = _checks.check_non_negative(kd_weight, "kd_weight")
        self.minibatch_weight = _checks.check_non_negative(minibatch_weight, "minibatch_weight")
        self.memory_pixel_weight = _checks.check_non_negative(memory_pixel_weight, "memory_pixel_weight")
        self.memory_region_weight = _checks.check_non_negative(memory_region_weight, "memory_region_weight")
        self.kd_tau = _checks.check_temperature(kd_tau, "kd_tau")
        self.minibatch = CIRKDMiniBatchLoss(tau=contrast_tau, pool=minibatch_pool, block_size=block_size)
        self.memory = CIRKDMemoryLoss(
            num_classes,
            student_channels,
            teacher_channels,
            pixel_memory_size=pixel_memory_size,
            region_memory_size=region_memory_size,
            pixel_contrast_size=pixel_contrast_size,
            region_contrast_size=region_contrast_size,
            contrast_tau=contrast_tau,
            kd_tau=contrast_kd_tau,
            ignore_index=ignore_index,
            pixel_update_freq=pixel_update_freq,
            queue_dtype=queue_dtype,
            generator=generator,
            block_size=block_size,
        )

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        student_feat: Tensor,
        teacher_feat: Tensor,
        labels: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        _checks.check_student_teacher_logits(student_logits, teacher_logits)
        _checks.check_exact_dims(student_logits, "student_logits", 4, "(N, K, H, W)")
        _check_features(student_feat, teacher_feat)
        _checks.check_same_device(student_logits, student_feat, "student_logits", "student_feat")
        _checks.check_dim_size(student_feat, "student_feat", 0, student_logits.shape[0], "batch size of the logits")
        zero = student_feat.new_zeros((), dtype=compute_dtype(student_feat, teacher_feat))
        terms = {"kd": zero, "minibatch": zero, "memory_pixel": zero, "memory_region": zero}
        if self.kd_weight > 0:
            terms["kd"] = self.kd_weight * pixel_kd_loss(student_logits, teacher_logits, self.kd_tau)
        if self.minibatch_weight > 0:
            terms["minibatch"] = self.minibatch_weight * self.minibatch(student_feat, teacher_feat)
        if self.memory_pixel_weight > 0 or self.memory_region_weight > 0:
            pixel, region = self.memory(student_feat, teacher_feat, labels)
            terms["memory_pixel"] = self.memory_pixel_weight * pixel
            terms["memory_region"] = self.memory_region_weight * region
        total = terms["kd"] + terms["minibatch"] + terms["memory_pixel"] + terms["memory_region"]
        return total, terms

    def extra_repr(self) -> str:
        return (
            f"kd_weight={self.kd_weight}, minibatch_weight={self.minibatch_weight}, "
            f"memory_pixel_weight={self.memory_pixel_weight}, memory_region_weight={self.memory_region_weight}, "
            f"kd_tau={self.kd_tau}"
        )
