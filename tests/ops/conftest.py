"""Fixtures shared by the ops tests."""

from __future__ import annotations

import importlib

import pytest


@pytest.fixture
def split_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the Triton forward split every row of 16+ elements into segments of 8 (or 16) columns.

    On a GPU rows are split only when there are few of them (``plan_segments``); the interpreter never
    splits by itself. Segments are whole chunks of 8 except the last, so odd row lengths give a short
    last segment.
    """
    backend = importlib.import_module("segkd.ops._triton_backend")  # imports Triton: only where it is installed
    monkeypatch.setattr(backend, "_target_programs", lambda device: 1 << 30)
    monkeypatch.setattr(backend, "MIN_SEGMENT_ELEMENTS", 8)
    monkeypatch.setattr(backend, "FORWARD_MAX_BLOCK_L", 8)
