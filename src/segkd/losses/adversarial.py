"""Holistic (adversarial) distillation: the SKD discriminator and its hinge losses (SKD and IFVD use them)."""

from __future__ import annotations

import copy
from typing import Any, Literal, SupportsIndex

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from segkd import _checks
from segkd.losses._dtypes import compute_dtype, to_layer_dtype

__all__ = [
    "PREPROCESS_MODES",
    "SKDDiscriminator",
    "skd_discriminator_hinge_loss",
    "skd_generator_hinge_loss",
]

Preprocess = Literal["batchnorm", "tanh", "none"]
PREPROCESS_MODES = ("batchnorm", "tanh", "none")


class _SelfAttention(nn.Module):
    """SAGAN self-attention: ``x + gamma * attention(x)``, with ``gamma`` initialised to 0."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        inner = max(channels // 8, 1)
        self.query = nn.Conv2d(channels, inner, kernel_size=1)
        self.key = nn.Conv2d(channels, inner, kernel_size=1)
        self.value = nn.Conv2d(channels, channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        query = self.query(x).flatten(2)  # (N, C', hw)
        key = self.key(x).flatten(2)  # (N, C', hw)
        attention = torch.softmax(torch.bmm(query.transpose(1, 2), key), dim=-1)  # (N, hw_query, hw_key)
        value = self.value(x).flatten(2)  # (N, C, hw)
        out = torch.bmm(value, attention.transpose(1, 2)).reshape(n, c, h, w)
        return x + self.gamma * out


class SKDDiscriminator(nn.Module):
    r"""The SKD holistic-distillation discriminator: a small SAGAN-style critic on segmentation logits.

    It scores a whole map of logits (real: the teacher's; fake: the student's) so that the student
    learns to produce maps the critic cannot tell from the teacher's. Architecture, as in the SKD
    and CIRKD code:

    .. math::

        x \to \mathrm{pre}(x) \to [\mathrm{SN\,conv}_{4\times4/2},\ \mathrm{LeakyReLU}_{0.1}]^{3}
        \to \mathrm{SelfAttn} \to \mathrm{SN\,conv}_{4\times4/2},\ \mathrm{LeakyReLU}_{0.1}
        \to \mathrm{SelfAttn} \to \mathrm{conv}_{4\times4} \to \text{scores},

    with widths ``conv_dim * (1, 2, 4, 8)``, spectral normalisation (SN, one power iteration) on the
    four stride-2 convolutions, SAGAN self-attention blocks whose residual gate ``gamma`` starts at 0,
    and ``pre`` a ``BatchNorm2d`` over the classes (the ``preprocess_GAN_mode=1`` the CIRKD script
    uses). Each stride-2 convolution halves the map and the last needs 4 x 4, so the logits must be
    at least 64 x 64; the scores have shape ``(N, 1, H // 16 - 3, W // 16 - 3)``.

    Reference: Y. Liu, C. Shu, J. Wang, C. Shen, "Structured Knowledge Distillation for Dense
    Prediction", TPAMI 2020; the self-attention is from H. Zhang et al., "Self-Attention Generative
    Adversarial Networks", ICML 2019.

    **Trainable**: all of its parameters (and the BatchNorm statistics, and the spectral-norm power
    iteration vectors, as buffers) are in ``state_dict()``. Give ``discriminator.parameters()`` to
    **their own optimizer** (CIRKD: Adam, lr 4e-4, betas (0.9, 0.99)), never to the student's; see
    :class:`SKDLoss` for the training step. Unlike the original code, ``forward`` returns the scores
    only (not the attention maps), and ``torch.nn.utils.parametrizations.spectral_norm`` updates its
    power iteration in training mode only.
    Outside autocast, logits of another floating dtype are cast to the discriminator's dtype. It
    pickles (``torch.save(module)``) through its settings and ``state_dict()``.

    Args:
        num_classes: number of classes ``C`` (the logits' channels), >= 1.
        conv_dim: width of the first convolution, >= 1 (default 64, as in the paper's code).
        preprocess: ``"batchnorm"`` (default), ``"tanh"`` or ``"none"``: applied to the logits first.
        spectral_norm: wrap the stride-2 convolutions in spectral normalisation (default True).

    Shape:
        - input: ``(N, C, H, W)`` logits with ``H, W >= 64``.
        - output: ``(N, 1, H // 16 - 3, W // 16 - 3)`` scores (higher: more teacher-like).

    Raises:
        TypeError: non-int ``num_classes`` or ``conv_dim``; non-tensor or integer input.
        ValueError: ``num_classes < 1``, ``conv_dim < 1``, unknown ``preprocess``; input not 4-D,
            without ``num_classes`` channels, or smaller than 64 x 64.

    Example:
        >>> import torch
        >>> from segkd.losses.adversarial import SKDDiscriminator
        >>> _ = torch.manual_seed(0)
        >>> disc = SKDDiscriminator(num_classes=5, conv_dim=8)
        >>> disc(torch.randn(2, 5, 64, 96)).shape
        torch.Size([2, 1, 1, 3])
    """

    MIN_SIZE = 64

    def __init__(
        self, num_classes: int, conv_dim: int = 64, preprocess: Preprocess = "batchnorm", spectral_norm: bool = True
    ) -> None:
        super().__init__()
        self.num_classes = _checks.check_positive_int(num_classes, "num_classes")
        self.conv_dim = _checks.check_positive_int(conv_dim, "conv_dim")
        self.preprocess_mode: Preprocess = _checks.check_choice(  # type: ignore[assignment]
            preprocess, "preprocess", PREPROCESS_MODES
        )
        self.spectral_norm = bool(spectral_norm)

        def down(in_channels: int, out_channels: int) -> nn.Sequential:
            conv: nn.Module = nn.Conv2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1)
            if self.spectral_norm:
                conv = _spectral_norm(conv)
            return nn.Sequential(conv, nn.LeakyReLU(0.1))

        self.preprocess: nn.Module
        if preprocess == "batchnorm":
            self.preprocess = nn.BatchNorm2d(num_classes)
        elif preprocess == "tanh":
            self.preprocess = nn.Tanh()
        else:
            self.preprocess = nn.Identity()
        d = conv_dim
        self.layer1 = down(num_classes, d)
        self.layer2 = down(d, 2 * d)
        self.layer3 = down(2 * d, 4 * d)
        self.attn1 = _SelfAttention(4 * d)
        self.layer4 = down(4 * d, 8 * d)
        self.attn2 = _SelfAttention(8 * d)
        self.last = nn.Conv2d(8 * d, 1, kernel_size=4)

    def forward(self, logits: Tensor) -> Tensor:
        """Return the ``(N, 1, h, w)`` critic scores of a batch of logits."""
        _checks.check_floating_tensor(logits, "logits")
        _checks.check_exact_dims(logits, "logits", 4, "(N, C, H, W)")
        _checks.check_channels(logits, "logits", self.num_classes, "num_classes")
        _checks.check_min_spatial_size(
            logits, "logits", self.MIN_SIZE, "four stride-2 convolutions then a 4 x 4 one in SKDDiscriminator"
        )
        x = self.preprocess(to_layer_dtype(logits, self))
        x = self.attn1(self.layer3(self.layer2(self.layer1(x))))
        x = self.attn2(self.layer4(x))
        return self.last(x)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, conv_dim={self.conv_dim}, "
            f"preprocess={self.preprocess_mode!r}, spectral_norm={self.spectral_norm}"
        )

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        """Pickle (and ``torch.save``) through the constructor and the state: parametrised layers cannot be pickled.

        What is saved: the constructor's settings, every parameter and buffer (``state_dict()``: values,
        dtype, device), ``requires_grad`` and the train/eval mode of every submodule. Hooks and
        attributes added after construction are not. ``copy.deepcopy`` keeps copying every attribute.
        """
        settings = (self.num_classes, self.conv_dim, self.preprocess_mode, self.spectral_norm)
        modes = [module.training for module in self.modules()]
        frozen = [p.requires_grad for p in self.parameters()]
        return _rebuild_discriminator, (type(self), settings, dict(self.state_dict()), modes, frozen)

    def __deepcopy__(self, memo: dict[int, Any]) -> SKDDiscriminator:
        # The plain attribute-by-attribute copy that __reduce_ex__ above would otherwise replace.
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new


def _rebuild_discriminator(
    cls: type[SKDDiscriminator],
    settings: tuple[Any, ...],
    state: dict[str, Tensor],
    modes: list[bool],
    requires_grad: list[bool],
) -> SKDDiscriminator:
    """Inverse of :meth:`SKDDiscriminator.__reduce_ex__`."""
    module = cls(*settings)
    module.load_state_dict(state, assign=True)  # the saved tensors themselves: their dtype and device
    for submodule, training in zip(module.modules(), modes, strict=True):
        submodule.training = training
    for parameter, flag in zip(module.parameters(), requires_grad, strict=True):
        parameter.requires_grad_(flag)
    return module


def _check_scores(value: Tensor, name: str) -> None:
    _checks.check_floating_tensor(value, name)
    _checks.check_nonempty(value, name)


def skd_generator_hinge_loss(fake_scores: Tensor) -> Tensor:
    r"""The student's (generator's) side of the SKD hinge adversarial loss.

    .. math::

        L_G = -\frac{1}{|D(S)|} \sum D(S)

    the mean critic score of the student's logits, negated (the SAGAN hinge generator loss; the SKD
    and CIRKD code call it "hinge").

    Reference: Y. Liu, C. Shu, J. Wang, C. Shen, "Structured Knowledge Distillation for Dense
    Prediction", TPAMI 2020.

    Args:
        fake_scores: discriminator scores of the student's logits, **not** detached (the gradient
            must reach the student).

    Shape:
        - fake_scores: any non-empty shape, e.g. ``(N, 1, h, w)``.
        - output: scalar.

    Returns:
        The loss (same dtype as ``fake_scores``).

    Raises:
        TypeError: non-tensor or integer ``fake_scores``.
        ValueError: empty ``fake_scores``.

    Example:
        >>> import torch
        >>> from segkd.losses.adversarial import skd_generator_hinge_loss
        >>> skd_generator_hinge_loss(torch.tensor([[0.5, -1.5], [2.0, 1.0]]))
        tensor(-0.5000)
    """
    _check_scores(fake_scores, "fake_scores")
    return -fake_scores.mean()


def skd_discriminator_hinge_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    r"""The discriminator's side of the SKD hinge adversarial loss.

    .. math::

        L_D = \mathrm{mean}\,\max\left(0,\, 1 - D(T)\right) + \mathrm{mean}\,\max\left(0,\, 1 + D(S)\right)

    The critic is pushed to score the teacher's logits (real) above +1 and the student's (fake)
    below -1. Compute both scores from **detached** logits so that this loss trains the
    discriminator only.

    Reference: Y. Liu, C. Shu, J. Wang, C. Shen, "Structured Knowledge Distillation for Dense
    Prediction", TPAMI 2020.

    Args:
        real_scores: discriminator scores of the teacher's logits.
        fake_scores: discriminator scores of the student's logits, same shape.

    Shape:
        - real_scores, fake_scores: the same non-empty shape, e.g. ``(N, 1, h, w)``.
        - output: scalar.

    Returns:
        The loss, in fp32 (fp64 for fp64 scores).

    Raises:
        TypeError: non-tensor or integer scores.
        ValueError: shapes or devices differ, empty scores.

    Example:
        >>> import torch
        >>> from segkd.losses.adversarial import skd_discriminator_hinge_loss
        >>> real = torch.tensor([2.0, 0.5])  # relu(1 - real) = [0, 0.5]
        >>> fake = torch.tensor([-2.0, 0.0])  # relu(1 + fake) = [0, 1]
        >>> skd_discriminator_hinge_loss(real, fake)
        tensor(0.7500)
    """
    _check_scores(real_scores, "real_scores")
    _check_scores(fake_scores, "fake_scores")
    _checks.check_same_shape(real_scores, fake_scores, "real_scores", "fake_scores")
    _checks.check_same_device(real_scores, fake_scores, "real_scores", "fake_scores")
    dtype = compute_dtype(fake_scores)  # fp32 for half scores: the sum of two fp16 means can overflow
    return F.relu(1.0 - real_scores.to(dtype)).mean() + F.relu(1.0 + fake_scores.to(dtype)).mean()
