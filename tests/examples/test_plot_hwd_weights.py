"""examples/plot_hwd_weights.py: the three PNG files, the weights they show, and the checkpoint path."""

from __future__ import annotations

import math
import struct
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
if str(EXAMPLES) not in sys.path:  # tests/examples/conftest.py does this too
    sys.path.insert(0, str(EXAMPLES))

import plot_hwd_weights as plot  # noqa: E402

EXPECTED_PX = {  # inches x 100 dpi
    "hwd_curve.png": (1000, 400),
    "hwd_weights_vs_z.png": (1000, 400),
    "hwd_weights_heatmap.png": (1000, 450),
}


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header (signature, then the IHDR chunk)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def reference_weights(divergence: list[float], mu: float, beta: float) -> tuple[list[float], list[float]]:
    """HWD's z and weights written from the paper's formulas, float64, plain Python."""
    c = len(divergence)
    mean = sum(divergence) / c
    std = math.sqrt(sum((d - mean) ** 2 for d in divergence) / (c - 1))
    z = [(d - mean) / std for d in divergence]
    g = [(1 - beta ** (v + mu)) / (1 - beta) for v in z]
    top = max(g)
    e = [math.exp(v - top) for v in g]
    return z, [c * v / sum(e) for v in e]


def test_default_run_writes_three_pngs(tmp_path: Path) -> None:
    written = plot.main(["--out", str(tmp_path), "--images", "4"])
    assert {p.name for p in written.values()} == set(EXPECTED_PX)
    for name, size in EXPECTED_PX.items():
        path = tmp_path / name
        assert path.stat().st_size > 5000, name
        assert png_size(path) == size, name


@pytest.mark.parametrize(("classes", "mu"), [(19, 1.0), (150, 0.0), (171, 0.1), (2, -0.5)])
def test_weights_against_z_match_the_formula(classes: int, mu: float) -> None:
    z, weights = plot.weights_against_z(classes, mu, 0.1)
    quantiles = [
        float(torch.special.ndtri(torch.tensor((i + 0.5) / classes, dtype=torch.float64))) for i in range(classes)
    ]
    ref_z, ref_w = reference_weights(quantiles, mu, 0.1)
    torch.testing.assert_close(z, torch.tensor(ref_z, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(weights, torch.tensor(ref_w, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    assert float(weights.sum()) == pytest.approx(classes)
    assert bool((weights.diff() > 0).all())  # beta < 1: a larger divergence never gets a smaller weight


def test_fabricated_batch_favours_the_hard_classes() -> None:
    batch = plot.fabricated_weights(num_images=5, num_classes=19, mu=0.0, seed=3)
    assert batch.weights.shape == (5, 19)
    torch.testing.assert_close(batch.weights.sum(dim=1), torch.full((5,), 19.0))
    assert bool((batch.weights >= 0).all())
    hard = batch.weights[:, batch.hard_classes].mean()
    easy_ids = [c for c in range(19) if c not in batch.hard_classes]
    easy = batch.weights[:, easy_ids].mean()
    assert float(hard) > 1.5 * float(easy)
    again = plot.fabricated_weights(num_images=5, num_classes=19, mu=0.0, seed=3)
    assert torch.equal(batch.weights, again.weights)


@pytest.mark.parametrize("classes", [3, 4, 40])
def test_fabricated_batch_any_class_count(classes: int) -> None:
    batch = plot.fabricated_weights(num_images=2, num_classes=classes, size=8)
    assert batch.weights.shape == (2, classes)
    assert bool(torch.isfinite(batch.weights).all())


def test_fabricated_batch_rejects_too_few_classes() -> None:
    with pytest.raises(ValueError, match="num_classes >= 3"):
        plot.fabricated_weights(num_classes=2)


def test_mu_flattens_the_weights() -> None:
    sharp = plot.fabricated_weights(num_images=4, mu=0.0).weights
    flat = plot.fabricated_weights(num_images=4, mu=2.0).weights
    assert float((flat - 1).abs().max()) < float((sharp - 1).abs().max())


def test_only_one_checkpoint_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        plot.main(["--out", str(tmp_path), "--student-ckpt", str(tmp_path / "s.pt")])


def _tiny_checkpoints(folder: Path, method: str = "hwd", kd: dict[str, float] | None = None) -> tuple[Path, Path]:
    from segkd_examples import checkpoint as ckpt
    from segkd_examples.config import TrainConfig, config_to_dict
    from segkd_examples.models import build_model

    cfg = TrainConfig(
        dataset="synthetic",
        student="tiny_student",
        teacher="tiny_teacher",
        method=method,
        synthetic_size=32,
        synthetic_val_length=3,
        workers=0,
        kd={"tau": 4.0, "beta": 0.2, "mu": 0.5} if kd is None else kd,
    )
    paths = []
    for name in ("tiny_student", "tiny_teacher"):
        torch.manual_seed(len(name))
        model = build_model(name, 8)
        state = {
            "format": ckpt.FORMAT,
            "kind": "best",
            "iteration": 1,
            "miou": 0.1,
            "model_name": name,
            "num_classes": 8,
            "model": model.state_dict(),
            "config": config_to_dict(cfg),
        }
        paths.append(ckpt.save_checkpoint(state, folder / f"{name}.pt"))
    return paths[0], paths[1]


def test_checkpoints_of_the_pipeline(tmp_path: Path) -> None:
    student, teacher = _tiny_checkpoints(tmp_path)
    batch = plot.checkpoint_weights(str(student), str(teacher), num_images=5)
    assert batch.weights.shape == (3, 8)  # the validation set has only 3 images
    assert (batch.mu, batch.beta, batch.tau) == (0.5, 0.2, 4.0)  # the run's HWD settings
    assert batch.class_names[:2] == ["background", "disc"]
    torch.testing.assert_close(batch.weights.sum(dim=1), torch.full((3,), 8.0))

    out = tmp_path / "out"
    plot.main(["--out", str(out), "--student-ckpt", str(student), "--teacher-ckpt", str(teacher), "--mu", "0"])
    assert png_size(out / "hwd_weights_heatmap.png") == EXPECTED_PX["hwd_weights_heatmap.png"]


def test_a_run_without_hwd_settings_gets_the_pipeline_defaults(tmp_path: Path) -> None:
    student, teacher = _tiny_checkpoints(tmp_path, method="cwd", kd={"tau": 4.0})
    batch = plot.checkpoint_weights(str(student), str(teacher), num_images=1)
    assert (batch.mu, batch.beta, batch.tau) == (1.0, 0.1, 4.0)  # synthetic: Cityscapes' mu, the paper's beta, tau


def test_released_state_dict_needs_a_config(tmp_path: Path) -> None:
    from segkd_examples.models import build_model

    path = tmp_path / "released.pth"
    torch.save(build_model("tiny_student", 8).state_dict(), path)
    with pytest.raises(ValueError, match="pass --config"):
        plot.checkpoint_weights(str(path), str(path))
