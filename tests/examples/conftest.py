"""Pipeline tests: put examples/ (the ``segkd_examples`` package) and this folder (test helpers) on ``sys.path``."""

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "examples"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


@pytest.fixture(autouse=True)
def _restore_determinism():
    """A pipeline run may switch on deterministic algorithms (``deterministic: true``); switch them off after it."""
    yield
    torch.use_deterministic_algorithms(False)
