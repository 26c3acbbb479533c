"""CIRKD checkpoints of both code generations load strictly and compute what CIRKD's own models compute.

Fixtures (``fixtures/make_cirkd_fixture.py`` writes them from CIRKD's code): the key names and shapes of CIRKD's
DeepLabV3-R101, DeepLabV3-R18, DeepLabV3-MobileNetV2 and PSPNet-R18 at commit 2d8ad0f ("2022") and at the 2025
rewrite, and the official DeepLabV3-R18 outputs of each generation for weights regenerated here from a seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _cirkd_weights import seeded_input, seeded_state

from segkd_examples.models import (
    GENERATIONS,
    CheckpointError,
    build_model,
    checkpoint_generation,
    infer_generation,
    load_checkpoint_into,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
META = json.loads((FIXTURES / "cirkd_models.json").read_text())
ARCHS = ("deeplabv3_r101", "deeplabv3_r18", "deeplabv3_mbv2", "pspnet_r18")
#: The models whose head is 512 wide in the 2025 code; the other two did not change.
CHANGED = {"deeplabv3_r101", "deeplabv3_r18"}
#: Float32 tolerance of the output comparison, relative to the output's largest magnitude. The fixture was computed
#: on one CPU kernel set; another one (ATEN_CPU_CAPABILITY=default, avx2, avx512) sums the convolutions in another
#: order, each sum's rounding error bounded by about n * eps * sum|terms| (n up to 4608, eps = 2**-24 for
#: float32). Measured here between ATEN_CPU_CAPABILITY=default and avx2/avx512: at most 1.3e-6 relative; 1e-4 leaves
#: a wide margin and stays far below the effect of any real difference (a wrong layer or weight moves outputs by O(1)).
RELATIVE_TOLERANCE = 1e-4


def _entries(generation: str, arch: str) -> list[tuple[str, list[int]]]:
    return [(key, shape) for key, shape in META["manifests"][generation][arch]]


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_keys_and_shapes_match_cirkd(arch: str, generation: str) -> None:
    ours = [[k, list(v.shape)] for k, v in build_model(arch, 19, generation=generation).state_dict().items()]
    assert ours == META["manifests"][generation][arch]


def test_generations_differ_only_in_deeplabv3_resnet_heads() -> None:
    old, new = META["manifests"]["2022"], META["manifests"]["2025"]
    for arch in ARCHS:
        changed = [a[0] for a, b in zip(old[arch], new[arch], strict=True) if a != b]
        assert [a[0] for a in old[arch]] == [b[0] for b in new[arch]]
        # 36 = ASPP (5 branches + projection, conv + 4 BN tensors each) + head conv + BN + classifier weight
        assert len(changed) == (36 if arch in CHANGED else 0)
        assert all(k.startswith("head.") for k in changed)


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_generation_is_recognised_from_the_checkpoint(arch: str, generation: str, tmp_path: Path) -> None:
    state = {k: torch.empty(shape, device="meta") for k, shape in _entries(generation, arch)}
    expected = generation if arch in CHANGED else "2022"
    assert infer_generation(arch, state) == expected
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}}  # DDP-saved, nested
    assert checkpoint_generation(arch, wrapped, path=tmp_path / "x.pth") == expected


def test_unknown_head_width_is_an_error() -> None:
    state = {"head.aspp.b0.0.weight": torch.empty(384, 512, 1, 1, device="meta")}
    with pytest.raises(CheckpointError, match=r"384 channels wide.*128 \(2022\), 512 \(2025\)"):
        infer_generation("deeplabv3_r18", state)


def test_a_2025_file_in_a_2022_model_names_the_generation(tmp_path: Path) -> None:
    path = tmp_path / "deeplabv3_resnet18_citys_best_model.pth"
    torch.save(seeded_state(_entries("2025", "deeplabv3_r18"), 0), path)
    with pytest.raises(CheckpointError, match=r"36 shape mismatches.*generation='2025'"):
        load_checkpoint_into(build_model("deeplabv3_r18", 19), path, what="teacher checkpoint")


@pytest.mark.parametrize("generation", GENERATIONS)
def test_outputs_equal_the_official_model(generation: str, tmp_path: Path) -> None:
    arch = META["output_arch"]
    reference = torch.load(FIXTURES / "cirkd_outputs.pt", weights_only=True)[generation]
    path = tmp_path / f"{arch}_{generation}.pth"
    torch.save(seeded_state(_entries(generation, arch), META["weight_seed"]), path)  # CIRKD's save: a state dict
    model = build_model(arch, 19, generation=generation).eval()
    load_checkpoint_into(model, path, what="teacher checkpoint")
    with torch.no_grad():
        out = model(seeded_input(META["input_shape"], META["input_seed"]))
    for name in ("logits", "aux_logits", "features"):
        got, want = getattr(out, name), reference[name]
        assert got.shape == want.shape
        scale = float(want.abs().max())
        assert scale > 0.1  # the seeded weights give outputs of order 1, not a vanishing signal
        assert float((got - want).abs().max()) <= RELATIVE_TOLERANCE * scale, name


def test_pipeline_teacher_follows_the_files_generation(tmp_path: Path) -> None:
    from segkd_examples.config import TrainConfig
    from segkd_examples.engine import build_student_and_teacher

    path = tmp_path / "deeplabv3_resnet18_2025.pth"
    torch.save(build_model("deeplabv3_r18", 8, generation="2025").state_dict(), path)
    cfg = TrainConfig(student="tiny_student", teacher="deeplabv3_r18", teacher_ckpt=str(path), method="cwd")
    _, teacher = build_student_and_teacher(cfg, 8)
    assert teacher is not None
    assert teacher.feature_channels == 512
    assert cfg.teacher_generation == "2025"  # resolved, so config.yaml records it
    cfg = TrainConfig(student="tiny_student", teacher="deeplabv3_r18", teacher_ckpt=str(path), method="cwd")
    cfg.teacher_generation = "2022"
    with pytest.raises(CheckpointError, match="generation='2025'"):
        build_student_and_teacher(cfg, 8)
