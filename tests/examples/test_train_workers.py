"""Data-loader workers: by default as many as the machine has (never the DataLoader's 'too many workers' warning)."""

from __future__ import annotations

import os
import warnings

import pytest
import yaml
from _pipeline import tiny_config

from segkd_examples.config import ConfigError, TrainConfig, config_from_dict
from segkd_examples.data import default_workers, usable_cpus
from segkd_examples.distributed import DistInfo
from segkd_examples.engine import train


def _machine(monkeypatch, cpus: int, local_ranks: int | None = None, *, affinity: bool = True) -> None:
    if affinity:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    else:
        monkeypatch.delattr(os, "sched_getaffinity", raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    if local_ranks is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))


@pytest.mark.parametrize(
    ("cpus", "local_ranks", "expected"),
    [(2, None, 2), (2, 2, 1), (1, 2, 0), (3, 2, 1), (16, 2, 4), (64, None, 4), (8, 8, 1)],
)
def test_default_is_min_4_and_usable_cpus_per_local_process(monkeypatch, cpus, local_ranks, expected):
    _machine(monkeypatch, cpus, local_ranks)
    assert usable_cpus() == cpus
    assert default_workers() == expected


def test_without_an_affinity_mask_the_cpu_count_is_used(monkeypatch):
    _machine(monkeypatch, 2, 2, affinity=False)
    assert usable_cpus() == 2
    assert default_workers() == 1
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert usable_cpus() == 1
    assert default_workers(local_world_size=1) == 1


def test_bad_local_world_size_is_named(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    with pytest.raises(ValueError, match=r"Expected LOCAL_WORLD_SIZE to be a positive integer, got 'two'"):
        default_workers()
    with pytest.raises(ValueError, match=r"Expected `local_world_size` to be >= 1, got 0"):
        default_workers(local_world_size=0)


def test_config_default_is_the_machines_and_explicit_values_are_kept():
    assert TrainConfig().workers is None
    assert config_from_dict({"workers": 3}).validate().workers == 3
    assert config_from_dict({"workers": 0}).validate().workers == 0
    with pytest.raises(ConfigError, match=r"Expected `workers` to be >= 0 or null"):
        config_from_dict({"workers": -1}).validate()


def test_a_default_run_on_a_two_core_machine_does_not_warn_about_workers(tmp_path, monkeypatch):
    _machine(monkeypatch, 2)
    cfg = tiny_config(tmp_path / "out", max_iters=1, eval_every=1)
    cfg.workers = TrainConfig().workers  # the default, not the tests' 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg, DistInfo())
    assert not [w for w in caught if "worker" in str(w.message)], [str(w.message) for w in caught]
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["workers"] == 2
