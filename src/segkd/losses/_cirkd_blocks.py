r"""CIRKD's relational KL terms computed in blocks of anchor rows, the gradient formed block by block.

Both CIRKD similarity terms average :math:`\mathrm{KL}(\mathrm{softmax}(z^T) \,\|\, \mathrm{softmax}(z^S))`
over the rows of similarity matrices whose full size is quadratic in pixels (mini-batch: ``B^2 L^2``;
memory: ``V M``). Here the anchor rows are taken ``block`` at a time. A block's logits, softmaxes and
the gradient :math:`\partial \mathrm{KL} / \partial z^S = \mathrm{softmax}(z^S) - \mathrm{softmax}(z^T)`
live only while it is processed: the gradient is contracted with the other factor of the similarity at
once (:math:`z^S = a^\top k / \tau` gives :math:`\partial / \partial a = G k / \tau`,
:math:`\partial / \partial k = G^\top a / \tau`), so what autograd keeps for ``backward`` is the size of
the student features, and ``backward`` only scales it by the upstream gradient. The peak is about four
``block x keys`` tensors (:data:`ROW_TENSORS`). Not twice differentiable.

Private helpers of :mod:`segkd.losses.cirkd`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx

from segkd import _checks

__all__ = ["BLOCK_BYTES", "ROW_TENSORS", "block_rows", "check_block_size", "memory_kl", "minibatch_kl"]

BLOCK_BYTES = 1 << 28
"""Budget of one block's temporaries (256 MiB) when ``block_size=None``."""

ROW_TENSORS = 4
"""Tensors of ``block x keys`` alive at once while a block is processed (measured peak: about 4)."""


def _fits(block_size: int | None, rows: int, keys: int, itemsize: int) -> bool:
    """Whether ``block_size=None`` and all ``rows x keys`` temporaries fit :data:`BLOCK_BYTES` (no blocks then)."""
    return block_size is None and ROW_TENSORS * rows * keys * itemsize <= BLOCK_BYTES


def _unblocked_kl(teacher_logits: Callable[[], Tensor], student_logits: Callable[[], Tensor]) -> Tensor:
    """``KL(softmax(z_t) || softmax(z_s))`` along the last dim, clamped at 0, by plain autograd (all rows at once).

    The logits are built by the callables, so that each is freed once its log-softmax is taken.
    """
    with torch.no_grad():
        log_p = F.log_softmax(teacher_logits(), dim=-1)
        p = log_p.exp()
        neg_entropy = torch.einsum("...i,...i->...", p, log_p)
    del log_p
    return (neg_entropy - torch.einsum("...i,...i->...", p, F.log_softmax(student_logits(), dim=-1))).clamp_min(0)


def check_block_size(value: Any) -> int | None:
    """Return ``value`` (``None`` or an ``int`` >= 1), else raise ``TypeError`` / ``ValueError`` naming it."""
    return None if value is None else _checks.check_positive_int(value, "block_size")


def block_rows(block_size: int | None, keys: int, itemsize: int) -> int:
    """Anchor rows per block: ``block_size``, or with ``None`` the most whose temporaries fit :data:`BLOCK_BYTES`."""
    if block_size is not None:
        return block_size
    return max(1, BLOCK_BYTES // (ROW_TENSORS * keys * itemsize))


def _kl_and_grad(
    teacher_logits: Callable[[], Tensor], student_logits: Callable[[], Tensor], grad_scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """``KL(softmax(z_t) || softmax(z_s))`` along the last dim and ``grad_scale`` times its gradient w.r.t. ``z_s``.

    The logits are built by the callables, so that no caller holds them: each is freed once its
    log-softmax is taken, and the peak stays at four tensors of their size. KL is clamped at 0
    (near-equal rows can round to ~-1e-8); where it was clamped the gradient is 0, as ``clamp_min``'s.
    """
    log_p = F.log_softmax(teacher_logits(), dim=-1)
    p = log_p.exp()
    log_q = F.log_softmax(student_logits(), dim=-1)
    # Row dot products on 2-D views: einsum over 3-D operands goes through a slow batched matmul on CPU.
    rows = p.shape[-1]
    raw = torch.einsum("ri,ri->r", p.view(-1, rows), log_p.view(-1, rows))
    raw -= torch.einsum("ri,ri->r", p.view(-1, rows), log_q.view(-1, rows))
    raw = raw.view(p.shape[:-1])
    del log_p
    grad = log_q.exp_().sub_(p).mul_((raw >= 0).unsqueeze(-1).to(p.dtype) * grad_scale)
    return raw.clamp_min(0), grad


def _minibatch_blocks(
    student: Tensor, teacher: Tensor, tau: float, rows: int, per_pair: bool, with_grad: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Pair terms ``(B, B)`` and, if ``with_grad``, the student's gradient pieces (see :class:`_MiniBatchKL`)."""
    batch, channels, length = student.shape
    anchors = student.transpose(1, 2).reshape(batch * length, channels)  # (B L, C), row (i, u)
    t_anchors = teacher.transpose(1, 2).reshape(batch * length, teacher.shape[1])
    terms = student.new_zeros(batch, batch)
    grad_row = grad_key = None
    if with_grad and per_pair:
        grad_row = student.new_zeros(batch * length, batch, channels)  # d terms[i_r, j] / d anchor r
        grad_key = student.new_zeros(batch, batch * length, channels)  # d terms[i, j_k] / d key k
    elif with_grad:
        grad_row = student.new_zeros(batch * length, channels)  # d sum_ij terms / d s
    keys = anchors.view(batch, length, channels)
    for image in range(batch):
        for start in range(image * length, (image + 1) * length, rows):
            stop = min(start + rows, (image + 1) * length)
            shape = (stop - start, batch, length)
            kl, grad = _kl_and_grad(
                lambda: (torch.matmul(t_anchors[start:stop], t_anchors.t()) / tau).view(shape),  # noqa: B023
                lambda: (torch.matmul(anchors[start:stop], anchors.t()) / tau).view(shape),  # noqa: B023
                1.0 / (length * tau),
            )
            terms[image] += kl.sum(dim=0)
            if grad_row is None:
                continue
            if grad_key is not None:
                grad_row[start:stop] = torch.einsum("rjv,jvc->rjc", grad, keys)
                grad_key[image] += grad.view(stop - start, -1).t() @ anchors[start:stop]
            else:
                flat = grad.view(stop - start, -1)
                grad_row[start:stop] += flat @ anchors
                grad_row += flat.t() @ anchors[start:stop]
    return terms / length, grad_row, grad_key


def _refuse_double_backward() -> None:
    """Raise where a ``create_graph=True`` backward reaches a blocked term: its gradient was formed in the forward."""
    if torch.is_grad_enabled():  # autograd runs a backward with grad mode on only for create_graph=True
        raise RuntimeError(
            "The blocked CIRKD similarity terms are differentiable once: a create_graph=True backward (double "
            "backward, a gradient penalty) cannot go through them. Leave `block_size=None` on inputs whose whole "
            "similarity matrices fit segkd.losses._cirkd_blocks.BLOCK_BYTES: that runs the unblocked form."
        )


class _MiniBatchKL(torch.autograd.Function):
    """Pair terms ``(B, B)`` of the mini-batch loss from unit features ``(B, C, L)``; gradient to the student only.

    With ``per_pair`` (``reduction="none"``) the forward keeps ``d terms[i, j] / d s`` for every pair
    (``2 B^2 L C`` numbers); otherwise only ``d sum_ij terms[i, j] / d s`` (``B L C``), so the upstream
    gradient must be the same for every pair (``"mean"`` / ``"sum"``: the caller reduces right after).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, student: Tensor, teacher: Tensor, tau: float, rows: int, per_pair: bool) -> Tensor:
        terms, grad_row, grad_key = _minibatch_blocks(student, teacher, tau, rows, per_pair, with_grad=True)
        ctx.save_for_backward(*(saved for saved in (grad_row, grad_key) if saved is not None))
        ctx.shape = student.shape  # type: ignore[attr-defined]
        return terms

    @staticmethod
    def backward(ctx: Any, grad_terms: Tensor) -> tuple[Tensor | None, ...]:
        _refuse_double_backward()
        return _MiniBatchKL._first_order(ctx, grad_terms)

    @staticmethod
    @torch.no_grad()
    def _first_order(ctx: Any, grad_terms: Tensor) -> tuple[Tensor | None, ...]:
        batch, channels, length = ctx.shape
        if len(ctx.saved_tensors) == 1:  # the upstream gradient is the same for every pair
            grad = ctx.saved_tensors[0] * grad_terms[0, 0]
        else:
            grad_row, grad_key = ctx.saved_tensors
            image = torch.arange(batch * length, device=grad_terms.device) // length
            grad = torch.einsum("rj,rjc->rc", grad_terms[image], grad_row)
            grad += torch.einsum("ir,irc->rc", grad_terms[:, image], grad_key)
        return grad.view(batch, length, channels).transpose(1, 2), None, None, None, None


def minibatch_kl(student: Tensor, teacher: Tensor, tau: float, block_size: int | None, reduction: str) -> Tensor:
    r"""Mini-batch pair terms ``(B, B)`` from unit features ``(B, C_s, L)`` / ``(B, C_t, L)`` (teacher detached).

    Term ``(i, j)``: :math:`\frac{1}{L}\sum_u \mathrm{KL}(\mathrm{softmax}(S^T_{ij}[u]) \,\|\,
    \mathrm{softmax}(S^S_{ij}[u]))`.

    Blocks hold at most ``block_size`` anchor pixels of one image (``None``: :func:`block_rows` with
    ``B L`` keys, or no blocks, plain autograd, when all ``B L x B L`` temporaries fit :data:`BLOCK_BYTES`:
    measured faster there). With ``reduction`` ``"mean"`` or ``"sum"`` the result must be reduced that way (the
    gradient kept assumes the same upstream gradient for every pair).
    """
    batch, _, length = student.shape
    if _fits(block_size, batch * length, batch * length, student.element_size()):

        def similarities(unit: Tensor) -> Tensor:
            return torch.matmul(unit.transpose(1, 2).unsqueeze(1), unit.unsqueeze(0)) / tau  # (B, B, L, L)

        return _unblocked_kl(lambda: similarities(teacher), lambda: similarities(student)).mean(dim=-1)
    rows = min(block_rows(block_size, batch * length, student.element_size()), length)
    if torch.is_grad_enabled() and student.requires_grad:
        out: Tensor = _MiniBatchKL.apply(student, teacher, tau, rows, reduction == "none")
        return out
    return _minibatch_blocks(student.detach(), teacher, tau, rows, per_pair=False, with_grad=False)[0]


def _memory_blocks(
    student: Tensor, teacher: Tensor, entries: Tensor, scale: float, rows: int, with_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Sum over anchors of the KL rows and, if ``with_grad``, its gradient ``(V, D)`` w.r.t. the student."""
    total = student.new_zeros(())
    grad_out = torch.zeros_like(student) if with_grad else None
    entries_t = entries.t()
    for start in range(0, student.shape[0], rows):
        stop = min(start + rows, student.shape[0])
        kl, grad = _kl_and_grad(
            lambda: torch.matmul(teacher[start:stop], entries_t) * scale,  # noqa: B023
            lambda: torch.matmul(student[start:stop], entries_t) * scale,  # noqa: B023
        )
        total += kl.sum()
        if grad_out is not None:
            grad_out[start:stop] = grad @ entries
    if grad_out is not None:
        grad_out.mul_(scale)
    return total, grad_out


class _MemoryKL(torch.autograd.Function):
    """Sum over anchors of ``KL(softmax(scale E t_v) || softmax(scale E s_v))``; gradient to ``s`` only."""

    @staticmethod
    def forward(ctx: FunctionCtx, student: Tensor, teacher: Tensor, entries: Tensor, scale: float, rows: int) -> Tensor:
        total, grad = _memory_blocks(student, teacher, entries, scale, rows, with_grad=True)
        assert grad is not None
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor) -> tuple[Tensor | None, ...]:
        _refuse_double_backward()
        (grad,) = ctx.saved_tensors
        return grad * grad_total.detach(), None, None, None, None


def memory_kl(student: Tensor, teacher: Tensor, entries: Tensor, scale: float, block_size: int | None) -> Tensor:
    r"""Mean over the ``V`` anchors of :math:`\mathrm{KL}(\mathrm{softmax}(s\,E t_v) \| \mathrm{softmax}(s\,E s_v))`.

    ``student`` / ``teacher``: ``(V, D)`` unit anchors (teacher detached); ``entries``: ``(M, D)``, detached;
    ``scale``: the factor ``s`` of the logits. Blocks of ``block_size`` anchors (``None``: :func:`block_rows`
    with ``M`` keys, or no blocks, plain autograd, when all ``V x M`` temporaries fit :data:`BLOCK_BYTES`).
    """
    if _fits(block_size, student.shape[0], entries.shape[0], student.element_size()):
        entries_t = entries.t()
        return _unblocked_kl(lambda: (teacher @ entries_t) * scale, lambda: (student @ entries_t) * scale).mean()
    rows = block_rows(block_size, entries.shape[0], student.element_size())
    if torch.is_grad_enabled() and student.requires_grad:
        total: Tensor = _MemoryKL.apply(student, teacher, entries, scale, rows)
    else:
        total = _memory_blocks(student.detach(), teacher, entries, scale, rows, with_grad=False)[0]
    return total / student.shape[0]
