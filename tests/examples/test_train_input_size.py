"""SKD's discriminator needs 64 x 64 logits: a run whose images are smaller is refused when its config is read."""

from __future__ import annotations

import subprocess

import pytest
import torch
from _pipeline import PYTHON, ROOT, subprocess_env, tiny_config

from segkd_examples.config import ConfigError, config_from_dict
from segkd_examples.distributed import DistInfo
from segkd_examples.engine import train
from segkd_examples.methods import check_input_size


def test_cli_refuses_skd_on_64_px_synthetic_images_before_building_anything(tmp_path):
    missing = tmp_path / "no_teacher.pt"  # were a model built first, this file's absence would be the error
    proc = subprocess.run(
        [
            PYTHON,
            str(ROOT / "examples" / "train_ddp.py"),
            "--config",
            str(ROOT / "examples" / "configs" / "synthetic_none.yaml"),
            "--method",
            "skd",
            "--teacher-ckpt",
            str(missing),
            "--out",
            str(tmp_path / "out"),
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "needs logits of at least 64 x 64, but synthetic images of 64 px give 8 x 8 logits" in proc.stderr
    assert "--set synthetic_size=512" in proc.stderr
    assert "--set kd.adversarial_weight=0 --set kd.discriminator_weight=0" in proc.stderr
    assert "no_teacher.pt" not in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_train_refuses_before_reading_the_teacher(tmp_path):
    cfg = tiny_config(tmp_path / "out", method="skd", teacher_ckpt=str(tmp_path / "no_teacher.pt"))
    with pytest.raises(ConfigError, match=r"synthetic images of 32 px give 4 x 4 logits"):
        train(cfg, DistInfo())


@pytest.mark.parametrize(
    ("crop", "suggestion"),
    [([256, 256], "--crop-size 512`"), ([256, 1024], "--crop-size 512 1024`"), ([504, 512], "--crop-size 512`")],
)
def test_real_dataset_crops_too_small_for_the_discriminator(crop, suggestion):
    cfg = config_from_dict({"dataset": "cityscapes", "method": "skd", "crop_size": crop})
    with pytest.raises(ConfigError, match=r"adversarial_weight 0\.001, discriminator_weight 0\.1") as info:
        check_input_size(cfg)
    assert f"crop_size {crop} gives {-(-crop[0] // 8)} x {-(-crop[1] // 8)} logits" in str(info.value)
    assert suggestion in str(info.value)


@pytest.mark.parametrize(
    "values",
    [
        {"dataset": "cityscapes", "method": "skd", "crop_size": [512, 1024]},
        {"dataset": "cityscapes", "method": "skd", "crop_size": [505, 505]},  # ceil(505 / 8) = 64
        {"dataset": "synthetic", "method": "skd", "synthetic_size": 512},
        {"dataset": "synthetic", "method": "skd", "kd": {"adversarial_weight": 0, "discriminator_weight": 0}},
        {"dataset": "synthetic", "method": "ifvd"},  # IFVD here distils features only: no discriminator
        {"dataset": "synthetic", "method": "cirkd"},
    ],
)
def test_runs_the_discriminator_can_take_are_accepted(values):
    check_input_size(config_from_dict(values))


def test_shipped_synthetic_skd_config_is_accepted():
    from segkd_examples.config import load_config

    check_input_size(load_config(ROOT / "examples" / "configs" / "synthetic_skd.yaml"))


@pytest.mark.parametrize("side", [504, 505])
def test_the_check_agrees_with_the_discriminator(side):
    from segkd.losses.adversarial import SKDDiscriminator
    from segkd_examples.models import build_model

    torch.manual_seed(0)
    student = build_model("tiny_student", 8).eval()
    with torch.no_grad():
        logits = student(torch.randn(1, 3, side, side)).logits
    disc = SKDDiscriminator(8, conv_dim=4).eval()
    cfg = config_from_dict({"dataset": "synthetic", "method": "skd", "synthetic_size": side})
    if side == 505:
        check_input_size(cfg)
        assert disc(logits).shape == (1, 1, 1, 1)
    else:
        with pytest.raises(ConfigError):
            check_input_size(cfg)
        with pytest.raises(ValueError, match="64"):
            disc(logits)


def test_the_command_in_docs_pipeline_md_passes_the_check_with_the_discriminator_on():
    import re
    import shlex

    from segkd_examples.methods import resolve_kd

    text = (ROOT / "docs" / "pipeline.md").read_text()
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    commands = [" ".join(block.replace("\\\n", " ").split()) for block in blocks]
    (command,) = [c for c in commands if "synthetic_skd.yaml" in c and "synthetic_size" in c]
    train_ddp = _train_ddp()
    cfg = train_ddp.resolve_config(
        train_ddp.build_parser().parse_args(shlex.split(command.split("train_ddp.py", 1)[1]))
    )
    _, params = resolve_kd(cfg.method, cfg.dataset, cfg.kd_weight, cfg.kd)
    assert (cfg.method, cfg.synthetic_size) == ("skd", 512)
    assert params["adversarial_weight"] == 0.001
    assert params["discriminator_weight"] == 0.1


def _train_ddp():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_ddp", ROOT / "examples" / "train_ddp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
