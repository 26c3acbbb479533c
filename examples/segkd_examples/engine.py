"""The training loop: data, models, distillation, optimisation, evaluation, checkpoints and resume.

One :func:`train` call runs a whole job on this process (rank); ``examples/train_ddp.py`` wraps it.
Iteration ``i`` (0-based) uses learning rate ``lr * (1 - i / max_iters) ** poly_power`` and the ``i``-th
batch of an endless stream of epochs; epoch ``e`` is shuffled by ``seed + e`` (the same on every rank, each
rank taking its own shard), so the stream is a pure function of the seed, the world size and the global
batch size. A checkpoint after iteration ``k`` stores ``k``, the optimiser, scheduler and scaler state, every
rank's RNG state and the distiller's state; resuming recomputes the data position from ``k`` and continues
with bitwise-identical updates on CPU (see ``tests/examples/test_train_resume.py``).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from segkd_examples import checkpoint as ckpt
from segkd_examples.config import ConfigError, TrainConfig, config_to_dict
from segkd_examples.distributed import DistInfo, all_reduce_sum, barrier, gather_objects
from segkd_examples.evalcache import CachedValImages
from segkd_examples.logging_utils import MetricsLog, Progress
from segkd_examples.methods import Distiller, build_distiller, check_input_size, model_info, resolve_kd
from segkd_examples.metrics import check_label_range, evaluate, format_iou_table

__all__ = [
    "DistillationStep",
    "PolyDecay",
    "ShardedEpochSampler",
    "TrainResult",
    "autocast_factory",
    "broadcast_module_state",
    "build_datasets",
    "build_student_and_teacher",
    "build_val_loader",
    "load_model_weights",
    "seed_everything",
    "sync_distiller_batchnorm",
    "train",
    "trained_model_name",
    "val_shard",
]


# --------------------------------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (code that uses the global state)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels (and the cuBLAS workspace setting they need) when ``enabled``."""
    if not enabled:
        return
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


class PolyDecay:
    """Multiplier ``(1 - step / max_iters) ** power`` of the poly schedule (a picklable ``LambdaLR`` factor)."""

    def __init__(self, max_iters: int, power: float) -> None:
        self.max_iters = int(max_iters)
        self.power = float(power)

    def __call__(self, step: int) -> float:
        return max(0.0, 1.0 - step / self.max_iters) ** self.power


class ShardedEpochSampler(DistributedSampler[Any]):
    """``DistributedSampler`` (shuffled by ``seed + epoch``) that can start part-way into an epoch.

    ``set_start(k)`` makes the next iteration skip the first ``k`` indices of this rank's shard: the
    data position of a resumed run. The skip applies to one epoch only.
    """

    def __init__(self, dataset: Dataset[Any], *, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self._start = 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` indices of the next epoch."""
        self._start = int(start)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self._start = self._start, 0
        return iter(indices[start:])


class DistillationStep(nn.Module):
    r"""Student forward and the full training loss, as one module so that DDP covers the distiller too.

    .. math::

        L = \mathrm{CE}(\uparrow s, y) + w_\text{aux}\,\mathrm{CE}(\uparrow s_\text{aux}, y)
            + \lambda\,L_\text{KD}(s, t),

    with logits upsampled bilinearly to the label size (``align_corners`` as configured: ``True`` in the HWD and
    CIRKD code, ``losses/loss.py`` ``SegCrossEntropyLoss``) and pixels labelled ``ignore_index`` skipped; the KD
    term comes from the distiller at the models' own 1/8 resolution.
    """

    def __init__(
        self,
        student: nn.Module,
        distiller: Distiller,
        *,
        aux_weight: float,
        ignore_index: int,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        self.student = student
        self.distiller = distiller
        self.aux_weight = float(aux_weight)
        self.ignore_index = int(ignore_index)
        self.align_corners = bool(align_corners)

    def _ce(self, logits: Tensor, labels: Tensor) -> Tensor:
        up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        return F.cross_entropy(up.float(), labels, ignore_index=self.ignore_index)

    def forward(self, images: Tensor, labels: Tensor, teacher_out: Any) -> tuple[Tensor, dict[str, Tensor]]:
        out = self.student(images)
        ce = self._ce(out.logits, labels)
        terms: dict[str, Tensor] = {"ce": ce.detach()}
        total = ce
        if out.aux_logits is not None and self.aux_weight > 0:
            aux = self.aux_weight * self._ce(out.aux_logits, labels)
            terms["aux"] = aux.detach()
            total = total + aux
        if teacher_out is not None:
            kd, kd_terms = self.distiller(out, teacher_out, labels)
            terms.update(kd_terms)
            total = total + kd
        terms["loss"] = total.detach()
        return total, terms


def autocast_factory(amp: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """A factory of autocast contexts for ``amp`` (``"none"``, ``"bf16"``, ``"fp16"``).

    Raises:
        ConfigError: ``fp16`` without CUDA (CPU autocast is bf16 only).
    """
    if amp == "none":
        return contextlib.nullcontext
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("`amp: fp16` needs a CUDA device; use `amp: bf16` or `amp: none` on CPU.")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------------- models


def load_model_weights(model: nn.Module, path: str, *, what: str, data: Mapping[str, Any] | None = None) -> None:
    """Load weights into ``model`` from a training checkpoint of this pipeline or a released state dict.

    A file written by this pipeline (``last.pt``/``best.pt``) is recognised by its ``format`` entry and its
    ``model`` entry is loaded strictly; anything else goes to the models package's
    ``load_state_into`` (which understands the CIRKD release's key layout).

    Args:
        model: the model to fill.
        path: the checkpoint file.
        what: what the file is for, used in messages.
        data: the file's contents when the caller has read it already (the file is then not read again).

    Raises:
        segkd_examples.checkpoint.CheckpointError: unreadable file or keys/shapes that do not match.
    """
    if data is None:
        data = ckpt.load_checkpoint(path, what=what)
    if data.get("format") == ckpt.FORMAT:
        ckpt.load_state_dict_strict(model, data["model"], path=path, what=what)
        return
    from segkd_examples.models import load_state_into

    load_state_into(model, data, path=path, what=what)


def trained_model_name(cfg: TrainConfig) -> str:
    """The model a run trains (and its checkpoints hold): the teacher with ``train_teacher``, else the student."""
    return cfg.teacher if cfg.train_teacher else cfg.student


def build_student_and_teacher(cfg: TrainConfig, num_classes: int) -> tuple[nn.Module, nn.Module | None]:
    """Build the trained model (the student, or the teacher with ``train_teacher``) and the frozen teacher.

    The frozen teacher is built only when a method needs it; its weights come from ``teacher_ckpt``, its
    architecture from ``teacher_generation`` (``"auto"``: the CIRKD code generation the file's head width fits,
    written back into ``cfg``).

    Raises:
        ConfigError: a KD method without ``teacher_ckpt``.
    """
    from segkd_examples.models import build_model, checkpoint_generation

    student = build_model(trained_model_name(cfg), num_classes, backbone_weights=cfg.student_pretrained)
    if cfg.train_teacher or cfg.method == "none":
        return student, None
    if not cfg.teacher_ckpt:
        raise ConfigError(
            f"`method: {cfg.method}` distils from a trained teacher: pass --teacher-ckpt PATH "
            "(a released teacher state dict, or best.pt of a --train-teacher run)."
        )
    data = ckpt.load_checkpoint(cfg.teacher_ckpt, what="teacher checkpoint")
    if cfg.teacher_generation == "auto":  # the resolved generation is recorded in config.yaml
        cfg.teacher_generation = checkpoint_generation(
            cfg.teacher, data, path=cfg.teacher_ckpt, what="teacher checkpoint"
        )
    teacher = build_model(cfg.teacher, num_classes, generation=cfg.teacher_generation)
    load_model_weights(teacher, cfg.teacher_ckpt, what="teacher checkpoint", data=data)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


# --------------------------------------------------------------------------------------------------- data


def build_datasets(cfg: TrainConfig) -> tuple[Any, Any, Any]:
    """The dataset info, training set and validation set of ``cfg`` (roots checked at start-up)."""
    from segkd_examples.data import build_dataset, check_dataset_root, dataset_info

    synthetic = cfg.dataset == "synthetic"
    info = dataset_info(cfg.dataset, synthetic_classes=cfg.synthetic_classes, cocostuff_classes=cfg.cocostuff_classes)
    if not synthetic:
        if not cfg.data_root:
            raise ConfigError(f"`dataset: {cfg.dataset}` needs --data-root (the folder described in docs/datasets.md).")
        check_dataset_root(cfg.dataset, cfg.data_root, "train")
        check_dataset_root(cfg.dataset, cfg.data_root, "val")
    common: dict[str, Any] = {"seed": cfg.seed, "cocostuff_classes": cfg.cocostuff_classes}
    if synthetic:
        common["synthetic_size"] = cfg.synthetic_size
        common["synthetic_classes"] = cfg.synthetic_classes
    train_set = build_dataset(
        cfg.dataset,
        cfg.data_root,
        "train",
        crop_size=tuple(cfg.crop_size),
        scale_range=tuple(cfg.scale_range),
        scale_step=cfg.scale_step,
        flip=cfg.flip,
        synthetic_length=cfg.synthetic_length if synthetic else None,
        **common,
    )
    val_set = build_dataset(
        cfg.dataset,
        cfg.data_root,
        "val",
        crop_size=tuple(cfg.crop_size),
        synthetic_length=cfg.synthetic_val_length if synthetic else None,
        **common,
    )
    return info, train_set, val_set


def _workers(cfg: TrainConfig) -> int:
    """``cfg.workers``, or the machine's default when it is ``None``."""
    if cfg.workers is not None:
        return cfg.workers
    from segkd_examples.data import default_workers

    return default_workers()


class _TrainStream:
    """Endless batches over epochs, starting at a given iteration; calls ``set_epoch`` on sampler and dataset."""

    def __init__(self, dataset: Any, cfg: TrainConfig, dist: DistInfo, per_rank_batch: int) -> None:
        self.dataset = dataset
        self.sampler = ShardedEpochSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, seed=cfg.seed)
        self.per_rank_batch = per_rank_batch
        self.batches_per_epoch = len(self.sampler) // per_rank_batch
        if self.batches_per_epoch < 1:
            raise ConfigError(
                f"The training set has {len(dataset)} items, fewer than one global batch of "
                f"{per_rank_batch * dist.world_size}: lower `batch_size` or use more data."
            )
        self.generator = torch.Generator()
        self.loader = DataLoader(
            dataset,
            batch_size=per_rank_batch,
            sampler=self.sampler,
            num_workers=_workers(cfg),
            pin_memory=dist.device.type == "cuda",
            drop_last=True,
            generator=self.generator,  # keeps the loader off the global RNG, so resume is exact
            persistent_workers=False,
        )
        self.seed = cfg.seed

    def iterate(self, start_iter: int) -> Iterator[tuple[Tensor, Tensor]]:
        epoch, skip = divmod(start_iter, self.batches_per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            self.sampler.set_start(skip * self.per_rank_batch)
            self.generator.manual_seed(self.seed * 1_000_003 + epoch)
            yield from self.loader
            epoch, skip = epoch + 1, 0


def val_shard(val_set: Any, cfg: TrainConfig, dist: DistInfo) -> list[int]:
    """This rank's validation items: every ``world_size``-th of the first ``max_eval_images`` (no padding)."""
    indices = list(range(len(val_set)))
    if cfg.max_eval_images is not None:
        indices = indices[: cfg.max_eval_images]
    return indices[dist.rank :: dist.world_size]  # no padding: every image counted exactly once


def build_val_loader(val_set: Any, cfg: TrainConfig, dist: DistInfo) -> DataLoader[Any]:
    """Batch-1 loader over this rank's share of the validation images (no padding, no duplicates)."""
    shard = val_shard(val_set, cfg, dist)
    return DataLoader(
        torch.utils.data.Subset(val_set, shard),
        batch_size=1,
        shuffle=False,
        num_workers=min(_workers(cfg), 2),
        generator=torch.Generator().manual_seed(0),
    )


# --------------------------------------------------------------------------------------------------- train


class TrainResult(dict[str, Any]):
    """``{"best_miou", "best_iter", "last_miou", "iterations", "images_per_s", "out"}`` of a finished run."""


def _resolve_resume(cfg: TrainConfig, out: Path) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        path = out / "last.pt"
        return path if path.exists() else None
    return Path(cfg.resume)


def _mean_over_ranks(terms: dict[str, Tensor], device: torch.device, world: int) -> dict[str, float]:
    keys = sorted(terms)
    if not keys:
        return {}
    stacked = torch.stack([terms[k].float().to(device) for k in keys])
    all_reduce_sum(stacked)
    return {k: float(v) / world for k, v in zip(keys, stacked.tolist(), strict=True)}


def train(cfg: TrainConfig, dist: DistInfo) -> TrainResult:
    """Run (or resume) one training job on this rank and return its summary.

    Raises:
        ConfigError: inconsistent settings (batch not divisible by the world size, a KD method without a teacher,
            images too small for the method's discriminator).
        segkd_examples.checkpoint.CheckpointError: unreadable or mismatching checkpoints.
        FloatingPointError: a non-finite loss (the iteration is named).
    """
    cfg.validate()
    check_input_size(cfg)
    if cfg.batch_size % dist.world_size:
        raise ConfigError(
            f"Expected the global `batch_size` ({cfg.batch_size}) to be divisible by the number of processes "
            f"({dist.world_size})."
        )
    per_rank_batch = cfg.batch_size // dist.world_size
    out = Path(cfg.out)
    set_deterministic(cfg.deterministic)
    seed_everything(cfg.seed + dist.rank)
    device = dist.device

    info, train_set, val_set = build_datasets(cfg)
    num_classes = int(info.num_classes)
    ignore_index = int(getattr(info, "ignore_index", 255))
    class_names = list(getattr(info, "class_names", [str(i) for i in range(num_classes)]))

    student, teacher = build_student_and_teacher(cfg, num_classes)
    cfg.kd_weight, cfg.kd = resolve_kd(cfg.method, cfg.dataset, cfg.kd_weight, cfg.kd)  # recorded in config.yaml
    distiller = build_distiller(
        cfg.method, model_info(student), model_info(teacher) if teacher is not None else None, cfg
    )
    sync_bn = cfg.sync_bn and dist.distributed and device.type == "cuda"
    if sync_bn:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        # The distiller's BatchNorms too (the SKD/IFVD discriminator, CIRKD's projection head), as the HWD
        # scripts build them with norm_layer=SyncBatchNorm under DDP (train_skd.py, train_ifvd.py, train_cirkd.py).
        distiller = sync_distiller_batchnorm(distiller)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    student.to(device, memory_format=memory_format)  # type: ignore[call-overload]
    distiller.to(device)
    if teacher is not None:
        teacher.to(device, memory_format=memory_format)  # type: ignore[call-overload]
    discriminator = distiller.discriminator()
    if discriminator is not None:
        discriminator.to(device)
        # Kept out of DDP, so DDP does not broadcast it: start every rank from rank 0's weights, as the HWD
        # scripts' DistributedDataParallel(D_model) does, so that the all-reduced updates keep them equal.
        broadcast_module_state(discriminator)

    step_module: nn.Module = DistillationStep(
        student, distiller, aux_weight=cfg.aux_weight, ignore_index=ignore_index, align_corners=cfg.align_corners
    )
    disc_ids = {id(t) for t in (*discriminator.parameters(), *discriminator.buffers())} if discriminator else set()
    trainable = [p for p in step_module.parameters() if p.requires_grad and id(p) not in disc_ids]
    optimizer = torch.optim.SGD(trainable, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, PolyDecay(cfg.max_iters, cfg.poly_power))
    disc_optimizer = distiller.discriminator_optimizer()
    # The discriminator's lr follows the student's poly decay (HWD train_skd.py / train_ifvd.py, adjust_lr_D),
    # set from this run's config at every iteration, so a resumed run continues the same schedule.
    disc_base_lrs = [group["lr"] for group in disc_optimizer.param_groups] if disc_optimizer is not None else []
    poly = PolyDecay(cfg.max_iters, cfg.poly_power)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    autocast = autocast_factory(cfg.amp, device)

    if dist.distributed:
        if disc_ids:  # the discriminator is trained by its own optimiser, gradients all-reduced by hand
            ignored = [
                n for n, t in (*step_module.named_parameters(), *step_module.named_buffers()) if id(t) in disc_ids
            ]
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step_module, ignored)
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None
        )

    # ---- resume
    start_iter, best_miou, best_iter = 0, -1.0, 0
    resume_path = _resolve_resume(cfg, out)
    if resume_path is not None:
        state = ckpt.load_checkpoint(resume_path, what="resume checkpoint")
        if state.get("format") != ckpt.FORMAT or "optimizer" not in state:
            raise ckpt.CheckpointError(
                f"The resume checkpoint {resume_path} is not a full training checkpoint of this pipeline "
                f"(format {state.get('format')!r}); resume from last.pt, or pass weights with --teacher-ckpt."
            )
        ckpt.load_state_dict_strict(student, state["model"], path=resume_path, what="resume checkpoint")
        ckpt.load_state_dict_strict(distiller, state["distiller"], path=resume_path, what="resume checkpoint")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        # The schedule's length and power are those of this run's config (load_state_dict restored the saved ones).
        scheduler.lr_lambdas[0] = PolyDecay(cfg.max_iters, cfg.poly_power)
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base_lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
        scaler.load_state_dict(state["scaler"])
        if disc_optimizer is not None:  # the discriminator's weights are part of the distiller's state
            disc_optimizer.load_state_dict(state["disc_optimizer"])
        start_iter = int(state["iteration"])
        best_miou, best_iter = float(state["best_miou"]), int(state["best_iter"])
        rng = state["rng"]
        if len(rng) == dist.world_size:
            ckpt.restore_rng_state(rng[dist.rank])
        elif dist.is_main:
            print(
                f"Resuming with {dist.world_size} processes from a checkpoint written by {len(rng)}: random "
                "states are re-seeded, so the run continues correctly but not bit-for-bit.",
                flush=True,
            )

    # ---- outputs
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        resolved = config_to_dict(cfg)
        resolved["workers"] = _workers(cfg)  # the machine's default when the config leaves it null
        resolved["world_size"] = dist.world_size
        resolved["num_classes"] = num_classes
        (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    log = MetricsLog(
        out,
        enabled=dist.is_main,
        resume_iter=start_iter if resume_path is not None else None,
        tensorboard=cfg.tensorboard,
    )
    progress = Progress(cfg.max_iters, start_iter, enabled=dist.is_main and cfg.progress)
    stream = _TrainStream(train_set, cfg, dist, per_rank_batch)
    val_batches: Any = build_val_loader(val_set, cfg, dist)
    if cfg.eval_cache:
        val_batches = CachedValImages(val_set, val_shard(val_set, cfg, dist), device=device, workers=cfg.workers)

    def run_eval(iteration: int) -> tuple[float, list[float]]:
        student.eval()
        miou, iou, _ = evaluate(
            lambda x: student(x.contiguous(memory_format=memory_format)).logits,
            val_batches,
            num_classes,
            device=device,
            ignore_index=ignore_index,
            mode=cfg.eval_mode,
            crop=cfg.eval_crop,
            stride=cfg.eval_stride,
            label_action=cfg.label_out_of_range,
            autocast=autocast if cfg.amp != "none" else None,
            align_corners=cfg.align_corners,
            miou_classes=cfg.miou_classes,
        )
        student.train()
        log.write({"kind": "eval", "iter": iteration, "miou": miou, "iou": iou})
        return miou, iou

    def save_last(iteration: int) -> None:
        rng = gather_objects(ckpt.capture_rng_state())
        if not dist.is_main:
            return
        state = {
            "format": ckpt.FORMAT,
            "kind": "last",
            "iteration": iteration,
            "epoch": iteration // stream.batches_per_epoch,
            "batches_per_epoch": stream.batches_per_epoch,
            "world_size": dist.world_size,
            "model_name": trained_model_name(cfg),
            "num_classes": num_classes,
            "model": student.state_dict(),
            "distiller": distiller.state_dict(),
            "optimizer": optimizer.state_dict(),
            "disc_optimizer": disc_optimizer.state_dict() if disc_optimizer is not None else None,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng,
            "best_miou": best_miou,
            "best_iter": best_iter,
            "config": config_to_dict(cfg),
        }
        ckpt.save_checkpoint(state, out / "last.pt")

    def save_best(iteration: int, miou: float) -> None:
        if not dist.is_main:
            return
        state = {
            "format": ckpt.FORMAT,
            "kind": "best",
            "iteration": iteration,
            "miou": miou,
            "model_name": trained_model_name(cfg),
            "num_classes": num_classes,
            "model": student.state_dict(),
            "config": config_to_dict(cfg),
        }
        ckpt.save_checkpoint(state, out / "best.pt")

    student.train()
    last_miou = math.nan
    window_start, window_iters, total_time, total_iters = time.perf_counter(), 0, 0.0, 0
    batches = stream.iterate(start_iter)
    for iteration in range(start_iter, cfg.max_iters):
        images, labels = next(batches)
        labels = check_label_range(labels, num_classes, ignore_index, action=cfg.label_out_of_range)
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        teacher_out = None
        if teacher is not None:
            with torch.no_grad(), autocast():
                teacher_out = teacher(images)
        with autocast():
            loss, terms = step_module(images, labels, teacher_out)
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(f"Non-finite loss {float(loss)} at iteration {iteration} ({terms}).")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        lr_used = optimizer.param_groups[0]["lr"]
        scheduler.step()
        if discriminator is not None and disc_optimizer is not None and teacher_out is not None:
            for group, base_lr in zip(disc_optimizer.param_groups, disc_base_lrs, strict=True):
                group["lr"] = base_lr * poly(iteration)
            terms.update(_discriminator_step(distiller, discriminator, disc_optimizer, dist, step_module, autocast))
        done = iteration + 1
        window_iters += 1
        progress.update(1, loss=f"{float(terms['loss']):.3f}")

        if done % cfg.log_every == 0 or done == cfg.max_iters:
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - window_start
            total_time, total_iters = total_time + elapsed, total_iters + window_iters
            record: dict[str, Any] = {"kind": "train", "iter": done}
            record.update(_mean_over_ranks(terms, device, dist.world_size))
            record["lr"] = lr_used
            if disc_optimizer is not None:
                record["disc_lr"] = disc_optimizer.param_groups[0]["lr"]
            record["images_per_s"] = window_iters * cfg.batch_size / max(elapsed, 1e-9)
            log.write(record)
            if dist.is_main:
                shown = ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k not in ("kind", "iter"))
                progress.write(f"iter {done}/{cfg.max_iters}: {shown}")
            window_start, window_iters = time.perf_counter(), 0

        if done % cfg.eval_every == 0 or done == cfg.max_iters:
            t0 = time.perf_counter()
            last_miou, iou = run_eval(done)
            if dist.is_main:
                progress.write(f"iter {done}: mIoU {100 * last_miou:.2f}")
            if last_miou > best_miou:
                best_miou, best_iter = last_miou, done
                save_best(done, last_miou)
            window_start += time.perf_counter() - t0  # evaluation time is not training throughput
        if done % cfg.checkpoint_every == 0 or done == cfg.max_iters:
            t0 = time.perf_counter()
            save_last(done)
            window_start += time.perf_counter() - t0
    progress.close()
    barrier()
    if dist.is_main and start_iter < cfg.max_iters and not math.isnan(last_miou):
        names = class_names if len(class_names) == num_classes else None
        print(format_iou_table(iou, names, cfg.miou_classes), flush=True)
    log.close()
    return TrainResult(
        best_miou=best_miou,
        best_iter=best_iter,
        last_miou=last_miou,
        iterations=cfg.max_iters,
        images_per_s=(total_iters * cfg.batch_size / total_time) if total_time > 0 else math.nan,
        out=str(out),
    )


def broadcast_module_state(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers of ``module`` to every rank, in place (no-op without DDP)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            torch.distributed.broadcast(tensor, src=src)


def sync_distiller_batchnorm(distiller: Distiller) -> Distiller:
    """Convert every ``BatchNorm*d`` inside ``distiller`` to ``SyncBatchNorm`` (in place; returns it).

    The distiller's own parameters are kept (the same ``Parameter`` objects), so call it before building the
    optimisers or after, alike. A distiller without BatchNorm is returned unchanged.
    """
    # A Distiller is never itself a BatchNorm, so its children are replaced in place and it comes back.
    return typing.cast(Distiller, nn.SyncBatchNorm.convert_sync_batchnorm(distiller))


def _discriminator_step(
    distiller: Distiller,
    discriminator: nn.Module,
    optimizer: torch.optim.Optimizer,
    dist: DistInfo,
    step_module: nn.Module,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
) -> dict[str, Tensor]:
    """One update of an adversarial method's discriminator, gradients averaged over ranks by hand."""
    cache = getattr(distiller, "last_outputs", None)
    if cache is None:
        return {}
    student_out, teacher_out = cache
    with autocast():
        loss = distiller.discriminator_loss(student_out, teacher_out)
    if not loss.requires_grad:  # discriminator weight 0: nothing to train
        return {}
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if dist.distributed:
        for p in discriminator.parameters():
            if p.grad is not None:
                all_reduce_sum(p.grad)
                p.grad.div_(dist.world_size)
    optimizer.step()
    return {"disc": loss.detach()}
