"""Packaging: one version source, the public imports, and the py.typed marker."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import re
from pathlib import Path

import pytest

import segkd

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(ROOT / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)


def test_version_is_single_sourced() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.dev\d+)?", segkd.__version__)
    project = _pyproject()
    assert "version" not in project["project"], "the version must not be written in pyproject.toml"
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "segkd.__version__"}
    # The installed metadata was built from the same attribute.
    assert importlib.metadata.version("segkd") == segkd.__version__


def test_public_imports() -> None:
    from segkd import CWDLoss, HWDLoss
    from segkd.functional import channel_kl, cwd_loss, hwd_loss, hwd_weights, hwd_weights_from_divergence
    from segkd.ops import channel_kl as ops_channel_kl

    assert ops_channel_kl is channel_kl
    assert {"CWDLoss", "HWDLoss", "__version__"} <= set(segkd.__all__)
    for name in segkd.__all__:
        assert hasattr(segkd, name), name
    for name in segkd.functional.__all__:
        assert hasattr(segkd.functional, name), name
    for function in (cwd_loss, hwd_loss, hwd_weights, hwd_weights_from_divergence):
        assert function.__doc__, function.__name__
    assert CWDLoss.__module__ == "segkd.losses.cwd"
    assert HWDLoss.__module__ == "segkd.losses.hwd"


def test_testing_subpackage_exports() -> None:
    import segkd.testing
    from segkd.testing import reference

    for name in reference.__all__:
        assert hasattr(reference, name), name
    assert "reference" in segkd.testing.__all__


def test_py_typed_is_shipped() -> None:
    marker = importlib.resources.files("segkd") / "py.typed"
    assert marker.is_file()
    assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["segkd"]


def test_runtime_dependencies_are_torch_and_numpy_only() -> None:
    project = _pyproject()["project"]
    names = {re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0].lower() for requirement in project["dependencies"]}
    assert names == {"torch", "numpy"}
    extras = project["optional-dependencies"]
    assert {"triton", "test", "dev", "examples"} <= set(extras)
    assert any(requirement.startswith("hypothesis") for requirement in extras["test"])
