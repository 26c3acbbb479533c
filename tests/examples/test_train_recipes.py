"""Table II recipes do not drift: one pipeline step per method, each logged loss term against float64 formulas.

The formulas below are written here from the HWD authors' training code (github.com/zju-SWJ/HWD at 7a27e72):
``train_<method>.py`` for the weights and which model output each term reads (``s_outputs[0]``: main logits,
``s_outputs[-1]``: the pre-classifier feature), ``losses/loss.py``, ``losses/hwd_loss.py`` and
``losses/memory_loss.py`` for the terms. They use plain torch ops in float64 on a float64 copy of the student
(taken just before the step) and of the teacher, never segkd's losses. Each test runs ``engine.train`` for one
step with the method's Table II defaults (only queue sizes and the like are shrunk where noted), on a fixed
synthetic batch with a top strip of ignored pixels.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _pipeline import tiny_config
from torch import Tensor, nn

from segkd_examples import engine
from segkd_examples.distributed import DistInfo
from segkd_examples.methods import build_distiller, model_info
from segkd_examples.models import build_model

IGNORE = 255
REL, ABS = 1e-4, 1e-7  # float32 pipeline against float64 formulas


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe_teacher")
    engine.train(tiny_config(out, train_teacher=True, max_iters=1, eval_every=1, synthetic_val_length=1), DistInfo())
    return str(out / "best.pt")


class Step:
    """What one logged pipeline step saw, with float64 student and teacher outputs recomputed from its weights."""

    record: dict[str, Any]
    records: list[dict[str, Any]]
    before: Any  # the DistillationStep (student + distiller) just before the step
    after: Any  # the distiller just after the forward (CIRKD's queues after enqueueing)
    labels: Tensor
    student: Any  # SegmentationOutput in float64
    teacher: Any


def _one_step(tmp_path, teacher_ckpt, monkeypatch, method: str, *, size: int, kd=None, max_iters: int = 1) -> Step:
    step = Step()
    original = engine.DistillationStep.forward

    def forward(self, images, labels, teacher_out):
        first = not hasattr(step, "before")
        if first:
            step.before = copy.deepcopy(self)
            step.images, step.labels = images.detach().clone(), labels.clone()
        result = original(self, images, labels, teacher_out)
        if first:
            step.after = copy.deepcopy(self.distiller)
        return result

    original_check = engine.check_label_range

    def with_ignored_strip(labels, *args, **kwargs):
        labels = original_check(labels, *args, **kwargs).clone()
        labels[:, : labels.shape[1] // 8] = IGNORE
        return labels

    monkeypatch.setattr(engine.DistillationStep, "forward", forward)
    monkeypatch.setattr(engine, "check_label_range", with_ignored_strip)
    cfg = tiny_config(
        tmp_path,
        method=method,
        kd=kd or {},
        teacher_ckpt=teacher_ckpt,
        max_iters=max_iters,
        eval_every=max_iters,
        batch_size=2,
        synthetic_size=size,
        crop_size=[size, size],
        synthetic_val_length=1,
    )
    assert cfg.kd_weight is None  # the method's Table II weight
    engine.train(cfg, DistInfo())
    step.records = [
        r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"
    ]
    step.record = step.records[0]

    images = step.images.double()
    student = copy.deepcopy(step.before.student).double().train()
    num_classes = student.num_classes
    teacher = build_model("tiny_teacher", num_classes)
    engine.load_model_weights(teacher, teacher_ckpt, what="teacher")
    teacher = teacher.double().eval()
    with torch.no_grad():
        step.student = student(images)
        step.teacher = teacher(images)
    return step


def _close(value: float, expected: Tensor | float) -> None:
    assert value == pytest.approx(float(expected), rel=REL, abs=ABS)


# ------------------------------------------------------------------------------------ formulas (float64)


def _rows(x: Tensor) -> Tensor:
    """``(N, C, h, w)`` -> ``(N h w, C)``, as ``permute(0, 2, 3, 1).view(-1, C)``."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _kl_sum(log_p_s: Tensor, p_t: Tensor) -> Tensor:
    """``F.kl_div(log_p_s, p_t, reduction="sum")``: sum of ``p_t (log p_t - log p_s)``."""
    return torch.where(p_t > 0, p_t * (p_t.log() - log_p_s), torch.zeros_like(p_t)).sum()


def pixel_kd(s: Tensor, t: Tensor, tau: float = 1.0) -> Tensor:
    """CriterionKD: per-pixel KL over classes, ``batchmean`` over all N h w pixels (no mask), times tau^2."""
    rows_s, rows_t = _rows(s), _rows(t)
    return _kl_sum(F.log_softmax(rows_s / tau, 1), F.softmax(rows_t / tau, 1)) / rows_s.shape[0] * tau**2


def cwd(s: Tensor, t: Tensor, tau: float = 4.0) -> Tensor:
    """CriterionCWD on logits: per-channel KL of the spatial softmaxes, summed, divided by n c, times tau^2."""
    n, c = s.shape[:2]
    log_p_s = F.log_softmax(s.reshape(n, c, -1) / tau, -1)
    return _kl_sum(log_p_s, F.softmax(t.reshape(n, c, -1) / tau, -1)) * tau**2 / (n * c)


def hwd(s: Tensor, t: Tensor, mu: float, beta: float = 0.1) -> Tensor:
    """CriterionHWD(L="MSE", process="E", parameter=beta, shift=mu, activation=True, DivPixel="None"), tau 4."""
    n, c = s.shape[:2]
    p_s, p_t = F.softmax(s.reshape(n, c, -1) / 4.0, -1), F.softmax(t.reshape(n, c, -1) / 4.0, -1)
    dis = ((p_s - p_t) ** 2).sum(-1)  # (n, c)
    z = (dis - dis.mean(1, keepdim=True)) / dis.std(1, keepdim=True) + mu  # unbiased std, as torch's default
    weight = F.softmax((1 - beta**z) / (1 - beta), dim=-1) * c
    kl = (p_t * (p_t.log() - p_s.log())).sum(-1) * 16.0
    return (weight * kl).sum() / (n * c)


def dist_raw(s: Tensor, t: Tensor) -> Tensor:
    """CriterionDIST (beta = gamma = 1) on the raw logits: Pearson over classes per pixel, over pixels per class."""

    def one_minus_pearson(a: Tensor, b: Tensor) -> Tensor:
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return 1 - ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)).mean()

    rows_s, rows_t = _rows(s), _rows(t)
    return one_minus_pearson(rows_s, rows_t) + one_minus_pearson(rows_s.t(), rows_t.t())


def pairwise(fs: Tensor, ft: Tensor) -> Tensor:
    """CriterionPairWise: 2x2 max-pool (ceil), cosine-similarity matrices, squared error / (hw)^2 / N, summed."""

    def sim(f: Tensor) -> Tensor:
        f = F.normalize(F.max_pool2d(f, 2, 2, 0, ceil_mode=True), p=2, dim=1).flatten(2)
        return torch.einsum("icm,icn->imn", f, f)

    pooled_hw = math.ceil(fs.shape[2] / 2) * math.ceil(fs.shape[3] / 2)
    return ((sim(ft) - sim(fs)) ** 2 / pooled_hw**2 / fs.shape[0]).sum()


def nearest(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """``F.interpolate(labels.float(), size, mode="nearest")`` as the authors resize labels."""
    return F.interpolate(labels[:, None].double(), size, mode="nearest")[:, 0].long()


def ifv(fs: Tensor, ft: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """CriterionIFV: cosine of each pixel to its class centre (per image), MSE between student and teacher maps."""
    small = nearest(labels, fs.shape[2:])[:, None]  # (N, 1, h, w); ignored pixels keep their own feature

    def centre_similarity(f: Tensor) -> Tensor:
        centre = f.clone()
        for k in range(num_classes):
            mask = (small == k).double().expand_as(f)
            mean = (mask * f).sum((-1, -2)) / (mask.sum((-1, -2)) + 1e-6)
            centre = (1 - mask) * centre + mask * mean[..., None, None]
        return F.cosine_similarity(f, centre, dim=1)

    return ((centre_similarity(fs) - centre_similarity(ft)) ** 2).mean()


def minibatch_pair(fs: Tensor, ft: Tensor, tau: float = 0.1) -> Tensor:
    """CriterionMiniBatchCrossImagePair: for each image pair, KL (batchmean) of the pixel-similarity softmaxes."""
    fs, ft = F.normalize(fs, p=2, dim=1), F.normalize(ft, p=2, dim=1)
    batch = fs.shape[0]
    total = fs.new_zeros(())
    for i in range(batch):
        for j in range(batch):
            s_map = fs[i].flatten(1).t() @ fs[j].flatten(1)
            t_map = ft[i].flatten(1).t() @ ft[j].flatten(1)
            total = total + _kl_sum(F.log_softmax(s_map / tau, 1), F.softmax(t_map / tau, 1)) / s_map.shape[0]
    return total / batch**2


def memory_contrast(s_embed: Tensor, ft: Tensor, labels: Tensor, queue: Tensor, tau: float = 0.1) -> Tensor:
    """StudentSegContrast.contrast_sim_kd against a queue: anchors are the non-ignored pixels, KL batchmean."""
    s_rows, t_rows = _rows(F.normalize(s_embed, p=2, dim=1)), _rows(F.normalize(ft, p=2, dim=1))
    keep = nearest(labels, ft.shape[2:]).reshape(-1) != IGNORE
    entries = queue.reshape(-1, queue.shape[-1]).double()
    s_logits, t_logits = s_rows[keep] @ entries.t() / tau, t_rows[keep] @ entries.t() / tau
    return _kl_sum(F.log_softmax(s_logits, 1), F.softmax(t_logits, 1)) / int(keep.sum())


def adversarial(critic: nn.Module, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """CriterionAdvForG then CriterionAdv('hinge'), with the discriminator called in the training script's order."""
    critic = copy.deepcopy(critic).double().train()
    with torch.no_grad():
        generator = -critic(s).mean()  # student step: lambda_adv * criterion_adv_for_G(D(s_outputs[0]))
        fake = critic(s)  # discriminator step: criterion_adv(D(s_outputs[0].detach()), D(t_outputs[0].detach()))
        real = critic(t)
    return generator, F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


# ------------------------------------------------------------------------------------ one test per method


def test_hwd_recipe(tmp_path, teacher_ckpt, monkeypatch):
    # train_hwd.py:222: 3.0 * criterion_hwd(s_outputs[0], t_outputs[0]); README: --parameter 0.1 --shift mu
    step = _one_step(tmp_path, teacher_ckpt, monkeypatch, "hwd", size=32)
    _close(step.record["kd_hwd"], 3.0 * hwd(step.student.logits, step.teacher.logits, mu=1.0))


def test_cwd_recipe(tmp_path, teacher_ckpt, monkeypatch):
    # train_cwd.py:209-210: 3.0 * CWD(logits, tau 4); the feature term has weight 0
    step = _one_step(tmp_path, teacher_ckpt, monkeypatch, "cwd", size=32)
    _close(step.record["kd_cwd"], 3.0 * cwd(step.student.logits, step.teacher.logits))


def test_dist_recipe(tmp_path, teacher_ckpt, monkeypatch):
    # train_dist.py:202: 1.0 * criterion_dist(s_outputs[0], t_outputs[0]), on raw logits (losses/loss.py)
    step = _one_step(tmp_path, teacher_ckpt, monkeypatch, "dist", size=32)
    expected = dist_raw(step.student.logits, step.teacher.logits)
    _close(step.record["kd_dist"], expected)
    # the softmax form would log something else
    assert abs(expected - dist_raw(step.student.logits.softmax(1), step.teacher.logits.softmax(1))) > 1e-3


def test_skd_recipe(tmp_path, teacher_ckpt, monkeypatch):
    # train_skd.py:228-246: KD 1 + pair-wise 10 (features) + adversarial 0.001 (logits); discriminator 0.1,
    # its Adam lr 4e-4 poly-decayed like the student's. 512 x 512 images: the discriminator needs 64 x 64 logits.
    step = _one_step(tmp_path, teacher_ckpt, monkeypatch, "skd", size=512, max_iters=2)
    s, t = step.student, step.teacher
    kd, pa = pixel_kd(s.logits, t.logits), pairwise(s.features, t.features)
    gen, disc = adversarial(step.before.distiller.loss.discriminator, s.logits, t.logits)
    record = step.record
    _close(record["kd_skd_pixel"], kd)
    _close(record["kd_skd_pairwise"], pa)
    _close(record["kd_skd_adversarial"], gen)
    _close(record["kd_skd"], 1.0 * kd + 10.0 * pa + 0.001 * gen)
    _close(record["disc"], 0.1 * disc)
    assert [r["disc_lr"] for r in step.records] == pytest.approx([4e-4, 4e-4 * 0.5**0.9])


def test_ifvd_recipe(tmp_path, teacher_ckpt, monkeypatch):
    # train_ifvd.py:228-246: KD 1 + IFV 20 (features, labels) + adversarial 0.001; discriminator 0.1, lr poly-decayed
    step = _one_step(tmp_path, teacher_ckpt, monkeypatch, "ifvd", size=512, max_iters=2)
    s, t = step.student, step.teacher
    kd = pixel_kd(s.logits, t.logits)
    iv = ifv(s.features, t.features, step.labels.cpu(), s.logits.shape[1])
    gen, disc = adversarial(step.before.distiller.critic, s.logits, t.logits)
    record = step.record
    _close(record["kd_ifvd_pixel"], kd)
    _close(record["kd_ifvd_ifv"], iv)
    _close(record["kd_ifvd_adversarial"], gen)
    _close(record["kd_ifvd"], 1.0 * kd + 20.0 * iv + 0.001 * gen)
    _close(record["disc"], 0.1 * disc)
    assert [r["disc_lr"] for r in step.records] == pytest.approx([4e-4, 4e-4 * 0.5**0.9])


def _record_mgd_masks(monkeypatch: pytest.MonkeyPatch) -> list[Tensor]:
    """The masks MGD draws during the step, in order (the step's own random masks, kept for the formula)."""
    import segkd.losses.mgd as mgd_module

    masks: list[Tensor] = []
    draw = mgd_module.mgd_mask

    def recorded(*args, **kwargs):
        masks.append(draw(*args, **kwargs))
        return masks[-1]

    monkeypatch.setattr(mgd_module, "mgd_mask", recorded)
    return masks


def test_mgd_recipe(tmp_path, teacher_ckpt, monkeypatch):
    # train_mgd.py:206: 2e-5 * CriterionMGD(mask ratio 0.75)(s_outputs[-1], t_outputs[-1]): align 1x1 conv to the
    # teacher's width, zero the masked positions, generate (3x3, ReLU, 3x3), squared error summed / N. No logit term.
    masks = _record_mgd_masks(monkeypatch)
    step = _one_step(tmp_path, teacher_ckpt, monkeypatch, "mgd", size=32)
    keep = masks[0].double()
    assert keep.mean().item() < 0.6  # about 1 - 0.75 of the positions are kept
    loss = copy.deepcopy(step.before.distiller.loss).double()
    with torch.no_grad():
        generated = loss.generation(loss.align(step.student.features) * keep)
    expected = 2e-5 * ((generated - step.teacher.features) ** 2).sum() / generated.shape[0]
    _close(step.record["kd_mgd"], expected)
    assert set(step.record) & {"kd_mgd_cwd", "kd_cwd"} == set()


def test_mgd_paper_recipe(tmp_path, teacher_ckpt, monkeypatch):
    # Not Table II: the MGD paper's (yzd-v/MGD, seg/mmseg/distillation/distillers/segmentation_distiller.py:118-130)
    # MGD term on the backbone's last stage (student_feat[-1]) + 3 * CWD on the logits at tau 4 (loss_logit).
    masks = _record_mgd_masks(monkeypatch)
    step = _one_step(tmp_path, teacher_ckpt, monkeypatch, "mgd", size=32, kd={"recipe": "paper"})
    s, t = step.student, step.teacher
    loss = copy.deepcopy(step.before.distiller.loss).double()
    with torch.no_grad():
        generated = loss.generation(loss.align(s.backbone_features) * masks[0].double())
    feature = 2e-5 * ((generated - t.backbone_features) ** 2).sum() / generated.shape[0]
    logit = cwd(s.logits, t.logits)
    _close(step.record["kd_mgd_feature"], feature)
    _close(step.record["kd_mgd_cwd"], logit)
    _close(step.record["kd_mgd"], feature + 3.0 * logit)


def test_cirkd_recipe(tmp_path, teacher_ckpt, monkeypatch):
    # train_cirkd.py:233-239: KD 1 (tau 1) + mini-batch pair 1 (raw features, tau 0.1) + memory pixel 0.1 + memory
    # region 0.1 (projected student, tau 0.1, KD tau 1). Queues shrunk so that every step contrasts the whole queue
    # (the sampled permutation then does not change the loss); the queues are read after this step's enqueue.
    kd = {
        "pixel_memory_size": 40,
        "region_memory_size": 6,
        "pixel_contrast_size": 8 * 40,
        "region_contrast_size": 8 * 6,
    }
    step = _one_step(tmp_path, teacher_ckpt, monkeypatch, "cirkd", size=32, kd=kd)
    s, t = step.student, step.teacher
    head = copy.deepcopy(step.before.distiller.loss.memory.project_head).double().train()
    with torch.no_grad():
        embed = head(s.features)
    memory = step.after.loss.memory
    labels = step.labels.cpu()
    record = step.record
    _close(record["kd_cirkd_kd"], 1.0 * pixel_kd(s.logits, t.logits))
    _close(record["kd_cirkd_minibatch"], 1.0 * minibatch_pair(s.features, t.features))
    _close(record["kd_cirkd_memory_pixel"], 0.1 * memory_contrast(embed, t.features, labels, memory.pixel_queue))
    _close(record["kd_cirkd_memory_region"], 0.1 * memory_contrast(embed, t.features, labels, memory.region_queue))


# ------------------------------------------------------------------------------------ adversarial details


@pytest.mark.parametrize("method", ["skd", "ifvd", "cirkd"])
def test_distiller_batchnorm_becomes_sync_batchnorm(method):
    # HWD train_skd.py / train_ifvd.py / train_cirkd.py build the discriminator and CIRKD's projection head with
    # norm_layer = SyncBatchNorm under DDP; engine.train converts them when it converts the student.
    student, teacher = build_model("tiny_student", 5), build_model("tiny_teacher", 5)
    cfg = type("Cfg", (), {"dataset": "synthetic", "kd_weight": None, "kd": {"pixel_memory_size": 8}})()
    if method != "cirkd":
        cfg.kd = {"conv_dim": 8}
    distiller = build_distiller(method, model_info(student), model_info(teacher), cfg)
    params = {name: id(p) for name, p in distiller.named_parameters()}
    assert any(isinstance(m, nn.BatchNorm2d) for m in distiller.modules())
    converted = engine.sync_distiller_batchnorm(distiller)
    assert converted is distiller
    assert not any(isinstance(m, nn.BatchNorm2d) for m in distiller.modules())
    assert any(isinstance(m, nn.SyncBatchNorm) for m in distiller.modules())
    assert {name: id(p) for name, p in distiller.named_parameters()} == params
    if method != "cirkd":
        assert isinstance(distiller.discriminator().preprocess, nn.SyncBatchNorm)


@pytest.mark.parametrize(
    ("kd", "match"),
    [({"recipe": "mmseg"}, r"`kd.recipe` to be one of 'hwd', 'paper'"), ({"feature": "neck"}, r"`kd.feature`")],
)
def test_mgd_recipe_errors(kd, match):
    student, teacher = build_model("tiny_student", 5), build_model("tiny_teacher", 5)
    cfg = type("Cfg", (), {"dataset": "synthetic", "kd_weight": None, "kd": kd})()
    with pytest.raises(ValueError, match=match):
        build_distiller("mgd", model_info(student), model_info(teacher), cfg)
