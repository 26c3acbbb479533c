"""Tests of segkd_examples.models: output contract, CIRKD key layout, strict and safe checkpoint loading.

The expected CIRKD state-dict layouts below are written by hand from the CIRKD project's 2022 code
(models/base_models/resnet.py: deep stem conv1/bn1/conv2/bn2/conv3/bn3 with 64-64-128 channels, stages of
BasicBlock/Bottleneck with a 1x1 ``downsample`` whenever stride or width changes, no ``fc``;
models/deeplabv3.py: ASPP b0..b4 + project, ``head.block`` = conv-BN-ReLU-Dropout-classifier, 128 channels for
ResNet-18 and 256 for ResNet-101, FCN ``auxlayer`` on layer3 with in/4 channels; models/pspnet.py;
models/base_models/mobilenetv2.py: ``net.features`` 0..17), not generated from the models under test.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch

from segkd_examples.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODEL_NAMES,
    CheckpointError,
    SegmentationOutput,
    build_model,
    denormalize_image,
    load_backbone_weights,
    load_checkpoint_into,
    normalize_image,
)

torch.set_num_threads(1)

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


# ----------------------------------------------------------------------------- hand-written CIRKD layouts


def _bn(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{k}": (() if k == "num_batches_tracked" else (channels,)) for k in BN}


def cirkd_resnet_shapes(prefix: str, bottleneck: bool, blocks: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of CIRKD's resnet18_v1s / resnet101_v1s (deep stem, no fc)."""
    shapes: dict[str, tuple[int, ...]] = {
        f"{prefix}conv1.weight": (64, 3, 3, 3),
        **_bn(f"{prefix}bn1", 64),
        f"{prefix}conv2.weight": (64, 64, 3, 3),
        **_bn(f"{prefix}bn2", 64),
        f"{prefix}conv3.weight": (128, 64, 3, 3),
        **_bn(f"{prefix}bn3", 128),
    }
    expansion = 4 if bottleneck else 1
    in_ch = 128
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True), start=1):
        out = planes * expansion
        for b in range(n):
            p = f"{prefix}layer{stage}.{b}"
            if bottleneck:
                shapes[f"{p}.conv1.weight"] = (planes, in_ch, 1, 1)
                shapes.update(_bn(f"{p}.bn1", planes))
                shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                shapes.update(_bn(f"{p}.bn2", planes))
                shapes[f"{p}.conv3.weight"] = (out, planes, 1, 1)
                shapes.update(_bn(f"{p}.bn3", out))
            else:
                shapes[f"{p}.conv1.weight"] = (planes, in_ch, 3, 3)
                shapes.update(_bn(f"{p}.bn1", planes))
                shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                shapes.update(_bn(f"{p}.bn2", planes))
            if b == 0 and (stage == 2 or in_ch != out):
                shapes[f"{p}.downsample.0.weight"] = (out, in_ch, 1, 1)
                shapes.update(_bn(f"{p}.downsample.1", out))
            in_ch = out
    return shapes


def cirkd_aspp_head_shapes(in_ch: int, ch: int, k: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"head.aspp.b0.0.weight": (ch, in_ch, 1, 1), **_bn("head.aspp.b0.1", ch)}
    for b in (1, 2, 3):
        shapes[f"head.aspp.b{b}.block.0.weight"] = (ch, in_ch, 3, 3)
        shapes.update(_bn(f"head.aspp.b{b}.block.1", ch))
    shapes["head.aspp.b4.gap.1.weight"] = (ch, in_ch, 1, 1)
    shapes.update(_bn("head.aspp.b4.gap.2", ch))
    shapes["head.aspp.project.0.weight"] = (ch, 5 * ch, 1, 1)
    shapes.update(_bn("head.aspp.project.1", ch))
    shapes["head.block.0.weight"] = (ch, ch, 3, 3)
    shapes.update(_bn("head.block.1", ch))
    shapes["head.block.4.weight"] = (k, ch, 1, 1)
    shapes["head.block.4.bias"] = (k,)
    return shapes


def cirkd_aux_shapes(in_ch: int, k: int) -> dict[str, tuple[int, ...]]:
    return {
        "auxlayer.block.0.weight": (in_ch // 4, in_ch, 3, 3),
        **_bn("auxlayer.block.1", in_ch // 4),
        "auxlayer.block.4.weight": (k, in_ch // 4, 1, 1),
        "auxlayer.block.4.bias": (k,),
    }


def cirkd_deeplabv3_r18_shapes(k: int) -> dict[str, tuple[int, ...]]:
    return {
        **cirkd_resnet_shapes("pretrained.", False, (2, 2, 2, 2)),
        **cirkd_aspp_head_shapes(512, 128, k),
        **cirkd_aux_shapes(256, k),
    }


def cirkd_mobilenetv2_imagenet_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of an ImageNet MobileNetV2 (features 0..18 and the linear classifier)."""
    shapes: dict[str, tuple[int, ...]] = {"features.0.0.weight": (32, 3, 3, 3), **_bn("features.0.1", 32)}
    settings = ((1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1))
    idx, in_ch = 1, 32
    for t, c, n in settings:
        for _ in range(n):
            hid = in_ch * t
            p = f"features.{idx}.conv"
            if t == 1:
                shapes[f"{p}.0.weight"] = (hid, 1, 3, 3)
                shapes.update(_bn(f"{p}.1", hid))
                shapes[f"{p}.3.weight"] = (c, hid, 1, 1)
                shapes.update(_bn(f"{p}.4", c))
            else:
                shapes[f"{p}.0.weight"] = (hid, in_ch, 1, 1)
                shapes.update(_bn(f"{p}.1", hid))
                shapes[f"{p}.3.weight"] = (hid, 1, 3, 3)
                shapes.update(_bn(f"{p}.4", hid))
                shapes[f"{p}.6.weight"] = (c, hid, 1, 1)
                shapes.update(_bn(f"{p}.7", c))
            idx, in_ch = idx + 1, c
    shapes["features.18.0.weight"] = (1280, 320, 1, 1)
    shapes.update(_bn("features.18.1", 1280))
    shapes["classifier.1.weight"] = (1000, 1280)
    shapes["classifier.1.bias"] = (1000,)
    return shapes


def fabricate(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(1234)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        else:
            out[key] = torch.randn(shape, generator=g) * 0.05
    return out


def shapes_of(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def r18_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    state = fabricate(cirkd_deeplabv3_r18_shapes(19))
    path = tmp_path_factory.mktemp("ckpt") / "deeplabv3_resnet18_citys.pth"
    torch.save(state, path)
    return path, state


# ----------------------------------------------------------------------------- output contract


@pytest.mark.parametrize("name", ["tiny_teacher", "tiny_student", "deeplabv3_r18", "pspnet_r18", "deeplabv3_mbv2"])
def test_forward_contract(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 5).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 65, 50))
    assert isinstance(out, SegmentationOutput)
    h, w = math.ceil(65 / 8), math.ceil(50 / 8)
    assert out.logits.shape == (2, 5, h, w)
    assert out.features.shape == (2, model.feature_channels, h, w)
    # the backbone's last stage (what the MGD paper's recipe distils): ResNet-18 layer4, MobileNetV2's last block
    widths = {"deeplabv3_r18": 512, "pspnet_r18": 512, "deeplabv3_mbv2": 320}
    expected_backbone = widths.get(name, model.feature_channels)
    assert out.backbone_features.shape == (2, model.backbone_channels, h, w)
    assert model.backbone_channels == expected_backbone
    assert model.num_classes == 5
    assert model.has_aux == (name != "deeplabv3_mbv2")
    if model.has_aux:
        assert out.aux_logits is not None
        assert out.aux_logits.shape == (2, 5, h, w)
    else:
        assert out.aux_logits is None
    assert torch.isfinite(out.logits).all()


def test_forward_contract_r101_small_input() -> None:
    model = build_model("deeplabv3_r101", 3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 33, 33))
    assert out.logits.shape == (1, 3, 5, 5)
    assert out.aux_logits is not None
    assert out.aux_logits.shape == (1, 3, 5, 5)
    assert out.features.shape == (1, 256, 5, 5)
    assert model.feature_channels == 256


def test_feature_channels_follow_cirkd() -> None:
    assert build_model("deeplabv3_r18", 19).feature_channels == 128
    assert build_model("pspnet_r18", 19).feature_channels == 128
    assert build_model("deeplabv3_mbv2", 19).feature_channels == 128
    assert build_model("tiny_teacher", 8).feature_channels > build_model("tiny_student", 8).feature_channels


def test_parameter_counts_match_cirkd_paper() -> None:
    # CIRKD paper (Yang et al., CVPR 2022), Table 1, 19 classes: 61.1M, 13.6M, 3.2M, 12.9M parameters.
    expected = {"deeplabv3_r101": 61.1, "deeplabv3_r18": 13.6, "deeplabv3_mbv2": 3.2, "pspnet_r18": 12.9}
    for name, millions in expected.items():
        count = sum(p.numel() for p in build_model(name, 19).parameters())
        assert round(count / 1e6, 1) == millions, name


def test_with_aux_false_skips_aux_head() -> None:
    model = build_model("tiny_student", 4).eval()
    out = model(torch.randn(1, 3, 16, 16), with_aux=False)
    assert out.aux_logits is None
    assert out.logits.shape == (1, 4, 2, 2)


def test_gradients_flow_to_every_parameter_of_tiny_student() -> None:
    torch.manual_seed(0)
    model = build_model("tiny_student", 4)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.aux_logits is not None
    (out.logits.sum() + out.aux_logits.sum() + out.features.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_model_names_and_bad_arguments() -> None:
    assert set(MODEL_NAMES) == {
        "deeplabv3_r101",
        "deeplabv3_r18",
        "deeplabv3_mbv2",
        "pspnet_r18",
        "tiny_teacher",
        "tiny_student",
    }
    with pytest.raises(ValueError, match=r"`name` to be one of .*deeplabv3_r18.*got 'resnet50'"):
        build_model("resnet50", 19)
    with pytest.raises(ValueError, match=r"`num_classes` to be >= 1, got 0"):
        build_model("tiny_student", 0)
    with pytest.raises(TypeError, match=r"`num_classes` to be an int"):
        build_model("tiny_student", 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"tiny_student has no backbone with ImageNet weights"):
        build_model("tiny_student", 2, backbone_weights="whatever.pth")
    model = build_model("tiny_student", 2)
    with pytest.raises(ValueError, match=r"`images` to have 4 dimensions"):
        model(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match=r"`images` to have 3 channels.*\(1, 1, 16, 16\)"):
        model(torch.randn(1, 1, 16, 16))


# ----------------------------------------------------------------------------- CIRKD key layout


def test_r18_layout_matches_hand_written_cirkd_layout() -> None:
    assert shapes_of(build_model("deeplabv3_r18", 19)) == cirkd_deeplabv3_r18_shapes(19)


def test_r101_layout_matches_hand_written_cirkd_layout() -> None:
    expected = {
        **cirkd_resnet_shapes("pretrained.", True, (3, 4, 23, 3)),
        **cirkd_aspp_head_shapes(2048, 256, 19),
        **cirkd_aux_shapes(1024, 19),
    }
    assert shapes_of(build_model("deeplabv3_r101", 19)) == expected


def test_pspnet_and_mobilenet_layouts_match_cirkd() -> None:
    psp = {
        **cirkd_resnet_shapes("pretrained.", False, (2, 2, 2, 2)),
        **{f"head.psp.conv{i}.0.weight": (128, 512, 1, 1) for i in (1, 2, 3, 4)},
        **{k: v for i in (1, 2, 3, 4) for k, v in _bn(f"head.psp.conv{i}.1", 128).items()},
        "head.block.0.weight": (128, 1024, 3, 3),
        **_bn("head.block.1", 128),
        "head.classifier.weight": (19, 128, 1, 1),
        "head.classifier.bias": (19,),
        **cirkd_aux_shapes(256, 19),
    }
    assert shapes_of(build_model("pspnet_r18", 19)) == psp
    backbone = {
        f"pretrained.net.{k}": v
        for k, v in cirkd_mobilenetv2_imagenet_shapes().items()
        if not k.startswith(("features.18.", "classifier."))
    }
    assert shapes_of(build_model("deeplabv3_mbv2", 19)) == {**backbone, **cirkd_aspp_head_shapes(320, 128, 19)}


def test_load_fabricated_cirkd_checkpoint(r18_checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, state = r18_checkpoint
    model = build_model("deeplabv3_r18", 19)
    load_checkpoint_into(model, path, what="teacher checkpoint")
    loaded = model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 24, 24))
    assert torch.isfinite(out.logits).all()


def test_load_accepts_module_prefix_nested_dicts_and_old_bn(tmp_path: Path) -> None:
    state = fabricate(cirkd_deeplabv3_r18_shapes(19), seed=1)
    variants = {
        "ddp.pth": {f"module.{k}": v for k, v in state.items()},
        "nested.pth": {"state_dict": state, "epoch": 3},
        "model.pth": {"model": state},
        "old_bn.pth": {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")},
    }
    model = build_model("deeplabv3_r18", 19)
    for name, data in variants.items():
        torch.save(data, tmp_path / name)
        torch.nn.init.zeros_(model.head.block[4].weight)
        load_checkpoint_into(model, tmp_path / name, what="teacher checkpoint")
        assert torch.equal(model.state_dict()["head.block.4.weight"], state["head.block.4.weight"]), name


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a = build_model("pspnet_r18", 6).eval()
    torch.save(a.state_dict(), tmp_path / "a.pth")
    torch.manual_seed(1)
    b = build_model("pspnet_r18", 6).eval()
    load_checkpoint_into(b, tmp_path / "a.pth", what="checkpoint")
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert torch.equal(ya.logits, yb.logits)
    assert torch.equal(ya.features, yb.features)


# ----------------------------------------------------------------------------- checkpoint errors


def test_wrong_number_of_classes(r18_checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = r18_checkpoint
    model = build_model("deeplabv3_r18", 150)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_into(model, path, what="teacher checkpoint")
    message = str(info.value)
    assert str(path) in message
    assert "teacher checkpoint" in message
    assert "head.block.4.weight: file (19, 128, 1, 1) vs model (150, 128, 1, 1)" in message
    assert "19 classes but the model was built with num_classes=150" in message


def test_wrong_architecture(r18_checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = r18_checkpoint
    with pytest.raises(CheckpointError, match=r"missing keys \(first: head\.psp\.conv1\.0\.weight") as info:
        load_checkpoint_into(build_model("pspnet_r18", 19), path, what="teacher checkpoint")
    assert "unexpected keys (first: head.aspp.b0.0.weight" in str(info.value)
    with pytest.raises(CheckpointError, match=r"different architecture"):
        load_checkpoint_into(build_model("deeplabv3_mbv2", 19), path, what="teacher checkpoint")
    with pytest.raises(CheckpointError, match=r"shape mismatches \(first: pretrained\.layer1\.0\.conv1\.weight"):
        load_checkpoint_into(build_model("deeplabv3_r101", 19), path, what="teacher checkpoint")


def test_missing_aux_head_is_reported(tmp_path: Path) -> None:
    state = fabricate(cirkd_deeplabv3_r18_shapes(19))
    torch.save({k: v for k, v in state.items() if not k.startswith("auxlayer.")}, tmp_path / "noaux.pth")
    with pytest.raises(CheckpointError, match=r"7 missing keys \(first: auxlayer\.block\.0\.weight.*without aux"):
        load_checkpoint_into(build_model("deeplabv3_r18", 19), tmp_path / "noaux.pth", what="teacher checkpoint")


def test_truncated_empty_missing_and_pickled_files(
    tmp_path: Path, r18_checkpoint: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    path, _ = r18_checkpoint
    model = build_model("deeplabv3_r18", 19)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"teacher checkpoint .*truncated\.pth.*truncated or corrupt"):
        load_checkpoint_into(model, truncated, what="teacher checkpoint")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pth is empty"):
        load_checkpoint_into(model, empty, what="teacher checkpoint")
    with pytest.raises(CheckpointError, match=r"nowhere\.pth does not exist"):
        load_checkpoint_into(model, tmp_path / "nowhere.pth", what="teacher checkpoint")
    pickled = tmp_path / "pickled.pth"
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=0.01)}, pickled)
    with pytest.raises(CheckpointError, match=r"pickled\.pth holds (a )?pickled Python object.*run arbitrary code"):
        load_checkpoint_into(model, pickled, what="teacher checkpoint")


def test_non_tensor_entries_are_refused(tmp_path: Path) -> None:
    torch.save({"head.weight": torch.zeros(1), "note": "hello"}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"odd\.pth is not a state dict of tensors.*first: note"):
        load_checkpoint_into(build_model("tiny_student", 2), tmp_path / "odd.pth", what="checkpoint")


# ----------------------------------------------------------------------------- ImageNet backbones


def test_load_resnet18_imagenet_backbone(tmp_path: Path) -> None:
    shapes = cirkd_resnet_shapes("", False, (2, 2, 2, 2))
    shapes.update({"fc.weight": (1000, 512), "fc.bias": (1000,)})
    state = fabricate(shapes, seed=2)
    torch.save(state, tmp_path / "resnet18-imagenet.pth")
    model = build_model("deeplabv3_r18", 19, backbone_weights=str(tmp_path / "resnet18-imagenet.pth"))
    loaded = model.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[f"pretrained.{key}"], value), key
    # the head keeps its random initialisation
    assert not torch.equal(loaded["head.block.0.weight"], torch.zeros_like(loaded["head.block.0.weight"]))


def test_load_mobilenetv2_imagenet_backbone(tmp_path: Path) -> None:
    state = fabricate(cirkd_mobilenetv2_imagenet_shapes(), seed=3)
    torch.save(state, tmp_path / "mobilenetv2-imagenet.pth")
    model = build_model("deeplabv3_mbv2", 19)
    load_backbone_weights(model, tmp_path / "mobilenetv2-imagenet.pth")
    key = "features.17.conv.6.weight"
    assert torch.equal(model.state_dict()[f"pretrained.net.{key}"], state[key])


def test_backbone_errors(tmp_path: Path, r18_checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    shapes = cirkd_resnet_shapes("", False, (2, 2, 2, 2))
    state = fabricate(shapes)
    del state["layer4.1.conv2.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"ImageNet backbone weights .*partial\.pth.*layer4\.1\.conv2\.weight"):
        load_backbone_weights(build_model("deeplabv3_r18", 19), tmp_path / "partial.pth")
    with pytest.raises(
        CheckpointError, match=r"first: layer1\.0\.conv1\.weight: file \(64, 128, 3, 3\) vs model \(64, 128, 1, 1\)"
    ):
        load_backbone_weights(build_model("deeplabv3_r101", 19), tmp_path / "partial.pth")
    path, _ = r18_checkpoint
    with pytest.raises(CheckpointError, match=r"whole segmentation checkpoint"):
        load_backbone_weights(build_model("deeplabv3_r18", 19), path)
    # and the other way round: a backbone file given as a whole-model checkpoint
    with pytest.raises(CheckpointError, match=r"looks like ImageNet backbone weights"):
        load_checkpoint_into(build_model("deeplabv3_r18", 19), tmp_path / "partial.pth", what="teacher checkpoint")


# ----------------------------------------------------------------------------- normalisation


def test_normalisation_is_cirkd_bgr_mean_subtraction() -> None:
    rgb = torch.tensor([[[10, 20, 30], [200, 100, 0]]], dtype=torch.uint8)  # (1, 2, 3)
    x = normalize_image(rgb.numpy())
    assert x.shape == (3, 1, 2)
    assert x.dtype == torch.float32
    # channel 0 is blue, on the 0-255 scale, minus 104.00698793
    expected_blue = torch.tensor([[30.0 - 104.00698793, 0.0 - 104.00698793]])
    expected_red = torch.tensor([[10.0 - 122.67891434, 200.0 - 122.67891434]])
    torch.testing.assert_close(x[0], expected_blue)
    torch.testing.assert_close(x[2], expected_red)
    assert IMAGENET_STD == (1.0, 1.0, 1.0)
    assert IMAGENET_MEAN[0] < IMAGENET_MEAN[1] < IMAGENET_MEAN[2]
    assert torch.equal(denormalize_image(x), rgb)
    with pytest.raises(ValueError, match=r"`rgb` to have shape \(H, W, 3\)"):
        normalize_image(torch.zeros(3, 4, 4))
