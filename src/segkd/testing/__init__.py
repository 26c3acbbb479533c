"""Tools to test distillation losses the way segkd tests its own.

* :func:`segkd.testing.check_distillation_loss`: the battery of checks every segkd loss passes, for your own
  losses.
* :mod:`segkd.testing.reference`: float64 implementations of segkd's losses written straight from
  their formulas, independent of the optimised code, for a second opinion on values and gradients.
* :mod:`segkd.testing.strategies`: `hypothesis <https://hypothesis.readthedocs.io>`_ strategies for
  segmentation-shaped logits, feature maps and label maps (odd sizes, ``C == 1``, one-pixel images,
  ignore pixels). It needs the ``test`` extra (``pip install segkd[test]``) and is therefore not
  imported here: ``import segkd.testing.strategies`` explicitly.

Example:
    >>> import torch
    >>> from segkd.testing import reference
    >>> logits = torch.randn(1, 3, 4, 4)
    >>> float(reference.cwd_loss_reference(logits, logits))
    0.0
"""

from segkd.testing import reference
from segkd.testing.checks import PROPERTIES, CheckReport, LossCheckError, LossDeclaration, check_distillation_loss

__all__ = ["PROPERTIES", "CheckReport", "LossCheckError", "LossDeclaration", "check_distillation_loss", "reference"]
