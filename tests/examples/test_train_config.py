"""Configs: YAML + flags + --set precedence, clear errors, and the generated Table II files in sync."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from _pipeline import PYTHON, ROOT, subprocess_env

from segkd_examples.config import ConfigError, apply_overrides, config_from_dict, load_config

CONFIGS = ROOT / "examples" / "configs"


def _train_ddp():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_ddp", ROOT / "examples" / "train_ddp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_configs_are_in_sync():
    proc = subprocess.run(
        [PYTHON, str(CONFIGS / "generate.py"), "--check"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_every_table_row_has_a_valid_config():
    for dataset, mu in (("cityscapes", 1.0), ("ade20k", 0.0), ("cocostuff", 0.1)):
        assert load_config(CONFIGS / f"{dataset}_deeplabv3_r101_teacher.yaml").train_teacher
        for student in ("deeplabv3_r18", "deeplabv3_mbv2", "pspnet_r18"):
            for method in ("none", "hwd", "cwd", "dist", "skd", "ifvd", "mgd", "cirkd"):
                cfg = load_config(CONFIGS / f"{dataset}_{student}_{method}.yaml")
                assert (cfg.dataset, cfg.student, cfg.method) == (dataset, student, method)
                assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.poly_power) == (0.01, 0.9, 1e-4, 0.9)
                assert (cfg.batch_size, cfg.max_iters, cfg.crop_size, cfg.aux_weight) == (8, 40000, [512, 512], 0.4)
                if method == "hwd":
                    assert cfg.kd_weight == 3.0
                    assert cfg.kd == {"tau": 4.0, "beta": 0.1, "mu": mu}
    for path in CONFIGS.glob("*.yaml"):
        load_config(path).validate()


def test_precedence_file_then_flags_then_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"lr": 0.5, "max_iters": 10, "method": "hwd", "kd": {"mu": 0.0}}))
    train_ddp = _train_ddp()
    args = train_ddp.build_parser().parse_args(
        ["--config", str(path), "--lr", "0.2", "--set", "lr=0.3", "--set", "kd.mu=1", "--crop-size", "512", "1024"]
    )
    cfg = train_ddp.resolve_config(args)
    assert cfg.lr == 0.3
    assert cfg.max_iters == 10
    assert cfg.kd == {"mu": 1}
    assert cfg.crop_size == [512, 1024]


def test_unknown_key_and_bad_values():
    with pytest.raises(ConfigError, match=r"Unknown key `learning_rate` in config"):
        config_from_dict({"learning_rate": 0.1})
    with pytest.raises(ConfigError, match=r"Expected `max_iters` to be an int, got 1.5"):
        config_from_dict({"max_iters": 1.5})
    with pytest.raises(ConfigError, match=r"Expected `method` to be one of .* got 'kd'"):
        config_from_dict({"method": "kd"}).validate()
    with pytest.raises(ConfigError, match=r"Expected --set KEY=VALUE, got 'lr'"):
        apply_overrides(config_from_dict({}), ["lr"])
    with pytest.raises(ConfigError, match=r"`train_teacher: true` trains the teacher alone"):
        config_from_dict({"train_teacher": True, "method": "hwd"}).validate()
    with pytest.raises(ConfigError, match=r"`eval_mode: slide` needs `eval_crop`"):
        config_from_dict({"eval_mode": "slide"}).validate()


def test_cli_rejects_a_bad_config_without_a_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lr: -1\n")
    proc = subprocess.run(
        [PYTHON, str(ROOT / "examples" / "train_ddp.py"), "--config", str(path)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "Expected `lr` to be a finite number > 0, got -1.0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_method_defaults_are_the_papers_and_config_values_override_them():
    from segkd_examples.methods import resolve_kd

    assert resolve_kd("hwd", "cityscapes", None, {}) == (3.0, {"tau": 4.0, "beta": 0.1, "mu": 1.0})
    assert resolve_kd("hwd", "ade20k", None, {})[1]["mu"] == 0.0
    assert resolve_kd("hwd", "cocostuff", 2.0, {"mu": 0.5}) == (2.0, {"tau": 4.0, "beta": 0.1, "mu": 0.5})
    assert resolve_kd("cwd", "ade20k", None, None) == (3.0, {"tau": 4.0})
    # IFVD as HWD's train_ifvd.py: pixel KD 1 + IFV 20 + adversarial 0.001, discriminator 0.1 (not IFV x 200 alone)
    weight, ifvd = resolve_kd("ifvd", "ade20k", None, {})
    assert weight == 1.0
    assert (ifvd["pixel_weight"], ifvd["ifv_weight"]) == (1.0, 20.0)
    assert (ifvd["adversarial_weight"], ifvd["discriminator_weight"]) == (0.001, 0.1)
    # DIST as HWD's losses/loss.py: raw logits, no softmax
    assert resolve_kd("dist", "cityscapes", None, {}) == (
        1.0,
        {"beta": 1.0, "gamma": 1.0, "tau": 1.0, "softmax": False},
    )
    assert resolve_kd("none", "ade20k", None, {}) == (0.0, {})


@pytest.mark.parametrize(
    "argv",
    [
        ["--crop-size", "64"],
        ["--set", "crop_size=64"],
        ["--set", "crop_size=[64]"],
        ["--config", "{yaml}"],
    ],
    ids=["flag", "set-int", "set-list", "yaml-list"],
)
def test_one_crop_size_means_a_square(tmp_path, argv):
    path = tmp_path / "c.yaml"
    path.write_text("crop_size: [64]\neval_crop: 96\n")
    args = _train_ddp().build_parser().parse_args([a.format(yaml=path) for a in argv])
    cfg = _train_ddp().resolve_config(args)
    assert cfg.crop_size == [64, 64]
    assert config_from_dict({"eval_crop": [96], "eval_stride": 48}).validate().eval_crop == [96, 96]
    assert config_from_dict({"eval_stride": [48]}).eval_stride == [48, 48]


def test_three_crop_numbers_are_refused_with_the_accepted_forms():
    args = _train_ddp().build_parser().parse_args(["--crop-size", "64", "64", "64"])
    expected = r"`crop_size` to be one positive int \(a square\) or two \[height, width\], got \[64, 64, 64\]"
    with pytest.raises(ConfigError, match=expected):
        _train_ddp().resolve_config(args)


def test_scale_step_must_divide_the_scale_range() -> None:
    assert config_from_dict({"scale_range": [0.5, 2.0], "scale_step": 0.1}).scale_step == 0.1
    with pytest.raises(ConfigError, match=r"`scale_range` \[0.5, 2.0\] to span a whole number of `scale_step` 0.4"):
        config_from_dict({"scale_range": [0.5, 2.0], "scale_step": 0.4}).validate()
