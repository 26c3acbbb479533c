"""Issue 15, class 6: every exported module survives pickle, torch.save, copy.deepcopy and a state_dict round trip.

Each module is used first (a forward in training mode moves queues, BatchNorm statistics, spectral-norm
power iterations and random generators) and its parameters are perturbed, so that a copy that lost
any of it gives a different value. The copy and the original must then give identical outputs on two
calls in a row, in training and in eval mode.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import segkd

TINY = {"pixel_memory_size": 12, "region_memory_size": 5, "pixel_contrast_size": 9, "region_contrast_size": 6}


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(3)


def _inputs(name: str) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    feats = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    labels = torch.randint(0, 3, (2, 8, 8), generator=g)
    big = torch.randn(1, 3, 64, 64, generator=g), torch.randn(1, 3, 64, 64, generator=g)  # the discriminator's minimum
    if name in {"CWDLoss", "HWDLoss", "DISTLoss", "KDLoss"}:
        return logits
    if name == "CIRKDMiniBatchLoss":
        return feats
    if name in {"IFVDLoss", "CIRKDMemoryLoss"}:
        return (*feats, labels)
    if name == "MGDLoss":
        return feats
    if name == "CIRKDLoss":
        return (*logits, *feats, labels)
    if name == "SKDLoss":
        return (*big, feats[0][:1], feats[1][:1])
    return big[:1]  # SKDDiscriminator


FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "CWDLoss": lambda: segkd.CWDLoss(tau=2.0),
    "HWDLoss": lambda: segkd.HWDLoss(mu=1.0),
    "DISTLoss": lambda: segkd.DISTLoss(tau=2.0),
    "KDLoss": lambda: segkd.KDLoss(tau=2.0),
    "CIRKDMiniBatchLoss": lambda: segkd.CIRKDMiniBatchLoss(pool=2),
    "IFVDLoss": lambda: segkd.IFVDLoss(3),
    "MGDLoss": lambda: segkd.MGDLoss(3, 5, alpha=1.0, generator=_gen()),
    "CIRKDMemoryLoss": lambda: segkd.CIRKDMemoryLoss(3, 3, 5, generator=_gen(), **TINY),  # type: ignore[arg-type]
    "CIRKDLoss": lambda: segkd.CIRKDLoss(3, 3, 5, generator=_gen(), **TINY),  # type: ignore[arg-type]
    "SKDLoss": lambda: segkd.SKDLoss(3, conv_dim=2, adversarial_weight=1.0),
    "SKDDiscriminator": lambda: segkd.SKDDiscriminator(3, conv_dim=2),
}


def test_every_exported_module_is_covered() -> None:
    exported = {name for name in segkd.__all__ if isinstance(getattr(segkd, name), type)}
    assert exported == set(FACTORIES)


def _outputs(module: nn.Module, inputs: tuple[Tensor, ...]) -> list[Tensor]:
    torch.manual_seed(11)
    out: Any = module(*inputs)
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):  # (total, terms) bundles
        out = (out[0], *out[1].values())
    outputs = list(out) if isinstance(out, (tuple, list)) else [out]
    if isinstance(module, segkd.SKDLoss):
        outputs.append(module.discriminator_loss(*inputs[:2]))
    return outputs


def _used(name: str, training: bool) -> nn.Module:
    torch.manual_seed(0)
    module = FACTORIES[name]()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    _outputs(module.train(), _inputs(name))  # moves every kind of state
    return module.train(training)


def _pickled(module: nn.Module) -> nn.Module:
    return pickle.loads(pickle.dumps(module))


def _torch_saved(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _state_dict_loaded(module: nn.Module, name: str) -> nn.Module:
    torch.manual_seed(123)  # a different initialisation: everything must come from the state_dict
    fresh = FACTORIES[name]()
    fresh.load_state_dict(module.state_dict())
    fresh.train(module.training)
    # Random state is not module state (a trainer checkpoints it apart): copy the generators across.
    for (_, src), (_, dst) in zip(module.named_modules(), fresh.named_modules(), strict=True):
        for key, value in vars(src).items():
            if isinstance(value, torch.Generator):
                vars(dst)[key].set_state(value.get_state())
    return fresh


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy", "state_dict"])
def test_a_copy_gives_identical_outputs(name: str, training: bool, how: str) -> None:
    original = _used(name, training)
    if how == "pickle":
        clone = _pickled(original)
    elif how == "torch.save":
        clone = _torch_saved(original)
    elif how == "deepcopy":
        clone = copy.deepcopy(original)
    else:
        clone = _state_dict_loaded(original, name)
    assert repr(clone) == repr(original)
    for _ in range(2):  # the state moved by the first call must match too
        expected = _outputs(original, _inputs(name))
        actual = _outputs(clone, _inputs(name))
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_pickled_discriminator_keeps_dtype_modes_and_requires_grad() -> None:
    disc = segkd.SKDDiscriminator(3, conv_dim=2).double()
    disc.layer1.requires_grad_(False)
    disc.preprocess.eval()
    clone = _pickled(disc)
    assert [p.dtype for p in clone.parameters()] == [torch.float64] * len(list(disc.parameters()))
    assert [p.requires_grad for p in clone.parameters()] == [p.requires_grad for p in disc.parameters()]
    assert [m.training for m in clone.modules()] == [m.training for m in disc.modules()]
    assert all(isinstance(p, nn.Parameter) for p in clone.parameters())
