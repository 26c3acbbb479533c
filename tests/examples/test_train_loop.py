"""The training loop in one process: every method runs, outputs are written, resume is exact, errors are clear."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _pipeline import assert_same_tensors, model_state, tiny_config

from segkd_examples import checkpoint as ckpt
from segkd_examples import engine
from segkd_examples.config import ConfigError
from segkd_examples.distributed import DistInfo
from segkd_examples.methods import available_methods
from segkd_examples.metrics import LabelRangeError

# Small settings per method so that the tiny models can run them (queues, discriminator width).
METHOD_KD = {
    "cirkd": {"pixel_memory_size": 64, "region_memory_size": 8, "pixel_contrast_size": 16, "region_contrast_size": 4},
    "skd": {"conv_dim": 8},
    "ifvd": {"conv_dim": 8},
}
ADVERSARIAL = ("skd", "ifvd")


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    engine.train(tiny_config(out, train_teacher=True, max_iters=2, eval_every=2), DistInfo())
    return str(out / "best.pt")


def test_outputs_of_a_run(tmp_path):
    result = engine.train(tiny_config(tmp_path, max_iters=4, eval_every=2, log_every=2), DistInfo())
    for name in ("metrics.jsonl", "config.yaml", "last.pt", "best.pt"):
        assert (tmp_path / name).is_file(), name
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["iter"] for r in train] == [2, 4]
    assert [r["iter"] for r in evals] == [2, 4]
    for r in train:
        assert {"ce", "aux", "loss", "lr", "images_per_s"} <= r.keys()
        assert r["images_per_s"] > 0
    # poly schedule: the lr logged at iteration i (1-based) is lr * (1 - (i - 1) / max_iters) ** 0.9
    assert train[0]["lr"] == pytest.approx(0.05 * (1 - 1 / 4) ** 0.9)
    for r in evals:
        assert 0.0 <= r["miou"] <= 1.0
        assert len(r["iou"]) == engine.build_datasets(tiny_config(tmp_path))[0].num_classes
    assert result["best_miou"] == pytest.approx(max(r["miou"] for r in evals))
    last = ckpt.load_checkpoint(tmp_path / "last.pt")
    assert last["iteration"] == 4
    assert last["format"] == ckpt.FORMAT
    best = ckpt.load_checkpoint(tmp_path / "best.pt")
    assert best["miou"] == pytest.approx(result["best_miou"])


@pytest.mark.parametrize("method", [m for m in available_methods() if m != "none"])
def test_each_method_runs_one_step(tmp_path, teacher_ckpt, method):
    size = 512 if method in ADVERSARIAL else 32  # the SKD discriminator needs logits of at least 64x64
    cfg = tiny_config(
        tmp_path,
        method=method,
        kd_weight=1.0,
        kd=METHOD_KD.get(method, {}),
        teacher_ckpt=teacher_ckpt,
        max_iters=1,
        eval_every=1,
        batch_size=2,
        synthetic_size=size,
        crop_size=[size, size],
        synthetic_val_length=1,
    )
    num_classes = engine.build_datasets(cfg)[0].num_classes
    torch.manual_seed(cfg.seed)  # the student's initial weights, as train() draws them
    before = {k: v.clone() for k, v in engine.build_student_and_teacher(cfg, num_classes)[0].state_dict().items()}
    engine.train(cfg, DistInfo())
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(record[f"kd_{method}"])
    assert record["loss"] == pytest.approx(record["ce"] + record.get("aux", 0.0) + record[f"kd_{method}"], rel=1e-5)
    after = model_state(tmp_path / "last.pt")
    assert any(not torch.equal(before[k], after[k]) for k in after if after[k].is_floating_point())
    state = ckpt.load_checkpoint(tmp_path / "last.pt")
    if method in ("mgd", "cirkd", *ADVERSARIAL):  # trainable parts / queues are checkpointed
        assert len(state["distiller"]) > 0
    if method in ADVERSARIAL:
        assert state["disc_optimizer"] is not None


def _interrupt_after(monkeypatch, calls: int) -> None:
    """Make the training step raise on call number ``calls`` (simulating a crash)."""
    original = engine.DistillationStep.forward
    count = {"n": 0}

    def forward(self, images, labels, teacher_out):
        if count["n"] == calls:
            raise KeyboardInterrupt("simulated crash")
        count["n"] += 1
        return original(self, images, labels, teacher_out)

    monkeypatch.setattr(engine.DistillationStep, "forward", forward)


@pytest.mark.parametrize("method", [m for m in ("none", "hwd", "mgd") if m in available_methods()])
def test_resume_equals_uninterrupted(tmp_path, teacher_ckpt, monkeypatch, method):
    # 2K iterations straight == K iterations, crash, resume for K more: same parameters, bit for bit.
    k = 3
    common = {
        "max_iters": 2 * k,
        "eval_every": k,
        "deterministic": True,
        "method": method,
        "kd_weight": 1.0 if method != "none" else 0.0,
        "teacher_ckpt": teacher_ckpt if method != "none" else None,
        "synthetic_length": 8,  # 2 batches per epoch: the resume point is mid-epoch
    }
    straight = tiny_config(tmp_path / "straight", **common)
    engine.train(straight, DistInfo())

    interrupted = tiny_config(tmp_path / "resumed", **common)
    with monkeypatch.context() as patch:
        _interrupt_after(patch, k)
        with pytest.raises(KeyboardInterrupt):
            engine.train(interrupted, DistInfo())
    assert ckpt.load_checkpoint(tmp_path / "resumed" / "last.pt")["iteration"] == k
    resumed = tiny_config(tmp_path / "resumed", resume="auto", **common)
    engine.train(resumed, DistInfo())

    a = ckpt.load_checkpoint(tmp_path / "straight" / "last.pt")
    b = ckpt.load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["distiller"], b["distiller"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    # metrics.jsonl reads as one run: no iteration logged twice
    records = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    train_iters = [r["iter"] for r in records if r["kind"] == "train"]
    assert train_iters == list(range(1, 2 * k + 1))


def test_resume_from_best_pt_is_refused(tmp_path):
    engine.train(tiny_config(tmp_path / "a", max_iters=2), DistInfo())
    cfg = tiny_config(tmp_path / "b", resume=str(tmp_path / "a" / "best.pt"))
    with pytest.raises(ckpt.CheckpointError, match=r"best\.pt is not a full training checkpoint"):
        engine.train(cfg, DistInfo())


def test_resume_from_truncated_checkpoint_names_the_file(tmp_path):
    engine.train(tiny_config(tmp_path, max_iters=2), DistInfo())
    last = tmp_path / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])
    with pytest.raises(ckpt.CheckpointError, match=r"resume checkpoint .*last\.pt .*truncated or corrupt"):
        engine.train(tiny_config(tmp_path, max_iters=4, resume="auto"), DistInfo())


def test_teacher_checkpoint_of_another_architecture(tmp_path, teacher_ckpt):
    student_run = tmp_path / "student"
    engine.train(tiny_config(student_run, max_iters=1), DistInfo())
    cfg = tiny_config(tmp_path / "kd", method="hwd", kd_weight=3.0, teacher_ckpt=str(student_run / "best.pt"))
    with pytest.raises(ckpt.CheckpointError, match=r"teacher checkpoint .*best\.pt does not match the model"):
        engine.train(cfg, DistInfo())


def test_kd_without_teacher_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="--teacher-ckpt"):
        engine.train(tiny_config(tmp_path, method="hwd", kd_weight=3.0), DistInfo())


def test_batch_not_divisible_by_world_size(tmp_path):
    with pytest.raises(
        ConfigError, match=r"global `batch_size` \(4\) to be divisible by the number of processes \(3\)"
    ):
        engine.train(tiny_config(tmp_path), DistInfo(world_size=3))


def test_out_of_range_labels(tmp_path, monkeypatch):
    from segkd_examples import engine as eng

    real_build = eng.build_datasets

    def corrupt(cfg):
        info, train_set, val_set = real_build(cfg)

        class Bad(torch.utils.data.Dataset):
            def __len__(self):
                return len(train_set)

            def __getitem__(self, i):
                image, label = train_set[i]
                label = label.clone()
                label[0, 0] = 200  # neither a class id nor 255
                return image, label

        return info, Bad(), val_set

    monkeypatch.setattr(eng, "build_datasets", corrupt)
    with pytest.raises(LabelRangeError, match=r"class ids outside \[0, \d+\) .*first ids: \[200\]"):
        engine.train(tiny_config(tmp_path / "a", max_iters=1), DistInfo())
    # counted as ignore when the user asks for it
    engine.train(tiny_config(tmp_path / "b", max_iters=1, label_out_of_range="ignore"), DistInfo())


def test_real_dataset_without_root(tmp_path):
    with pytest.raises(ConfigError, match=r"`dataset: cityscapes` needs --data-root"):
        engine.train(tiny_config(tmp_path, dataset="cityscapes"), DistInfo())


def test_missing_dataset_root_fails_at_start_up(tmp_path):
    import segkd_examples.data as data

    if not hasattr(data, "find_samples"):  # the contract stand-in, before the dataset package lands
        pytest.skip("the dataset package is not installed in this checkout")
    root = tmp_path / "cityscapes"
    (root / "leftImg8bit" / "train").mkdir(parents=True)  # partially extracted: no gtFine, no images
    cfg = tiny_config(tmp_path / "out", dataset="cityscapes", data_root=str(root), student="tiny_student")
    with pytest.raises(data.DatasetRootError, match=str(root)):
        engine.train(cfg, DistInfo())
    assert not (tmp_path / "out" / "config.yaml").exists()  # nothing started


def test_resume_with_more_iterations_follows_the_new_schedule(tmp_path):
    engine.train(tiny_config(tmp_path, max_iters=2), DistInfo())
    engine.train(tiny_config(tmp_path, max_iters=4, resume="auto"), DistInfo())
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["iter"]: r["lr"] for r in records if r["kind"] == "train"}
    assert lrs[3] == pytest.approx(0.05 * (1 - 2 / 4) ** 0.9)
    assert lrs[4] == pytest.approx(0.05 * (1 - 3 / 4) ** 0.9)
    assert ckpt.load_checkpoint(tmp_path / "last.pt")["iteration"] == 4


def _evaluate_script():
    import importlib.util

    from _pipeline import ROOT

    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "examples" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_script_reproduces_the_runs_best_miou(tmp_path):
    result = engine.train(tiny_config(tmp_path, max_iters=4, eval_every=2), DistInfo())
    evaluate = _evaluate_script()
    out = evaluate.main(["--checkpoint", str(tmp_path / "best.pt"), "--json", str(tmp_path / "eval.json")])
    assert out["miou"] == pytest.approx(result["best_miou"], abs=1e-12)
    assert json.loads((tmp_path / "eval.json").read_text())["model"] == "tiny_student"
    slide = evaluate.main(
        ["--checkpoint", str(tmp_path / "best.pt"), "--eval-mode", "slide", "--eval-crop", "16", "16"]
    )
    assert 0.0 <= slide["miou"] <= 1.0


def test_evaluate_script_needs_model_and_dataset_for_a_plain_state_dict(tmp_path):
    from segkd_examples.config import ConfigError

    engine.train(tiny_config(tmp_path, max_iters=1), DistInfo())
    plain = tmp_path / "plain.pt"
    torch.save(ckpt.load_checkpoint(tmp_path / "best.pt")["model"], plain)
    evaluate = _evaluate_script()
    with pytest.raises(ConfigError, match="pass --model and --dataset"):
        evaluate.main(["--checkpoint", str(plain)])
    out = evaluate.main(
        ["--checkpoint", str(plain), "--model", "tiny_student", "--dataset", "synthetic", "--set", "synthetic_size=32"]
    )
    assert 0.0 <= out["miou"] <= 1.0


def test_eval_cache_gives_the_same_evaluations(tmp_path):
    # eval_cache keeps the validation images in memory; the evaluations must not change (same images, same model).
    results = {}
    for cache in (False, True):
        out = tmp_path / str(cache)
        engine.train(tiny_config(out, max_iters=4, eval_every=2, eval_cache=cache), DistInfo())
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        results[cache] = [(r["iter"], r["miou"], r["iou"]) for r in records if r["kind"] == "eval"]
    assert len(results[True]) == 2
    assert results[True] == results[False]
