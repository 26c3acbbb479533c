"""Throughput of one distillation training step: the models alone, then the full pipeline step.

Two measurements with the same models (random weights: speed does not depend on them):

* ``models``: teacher forward (``no_grad``) + student forward/backward + SGD step on a fixed random batch in
  device memory, cross-entropy only (the issue's reference: 0.062 s/step, 128 images/s on one H100 for
  DeepLabV3-R101 -> DeepLabV3-R18, bf16, batch 8, 512x512);
* ``pipeline``: the trainer's own step (:class:`segkd_examples.engine.DistillationStep` with the chosen method,
  CE + aux CE + KD) fed by the data loader of the synthetic dataset at the same resolution (host-to-device
  copies, label checks and augmentation included).

Usage::

    python examples/bench_pipeline.py                              # GPU: R101 -> R18, HWD, bf16, batch 8, 512x512
    python examples/bench_pipeline.py --device cpu --student tiny_student --teacher tiny_teacher --size 64 --amp none

Prints one JSON object per measurement (seconds per step, images per second).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _timed(step: Callable[[], None], iters: int, warmup: int, sync: Callable[[], None]) -> float:
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    return (time.perf_counter() - start) / iters


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="deeplabv3_r18")
    parser.add_argument("--teacher", default="deeplabv3_r101")
    parser.add_argument("--method", default="hwd")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="bf16")
    parser.add_argument(
        "--workers", type=int, default=None, help="data-loader processes (default: min(4, usable CPUs))"
    )
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from segkd_examples.config import config_from_dict
    from segkd_examples.engine import DistillationStep, autocast_factory
    from segkd_examples.methods import build_distiller, model_info
    from segkd_examples.metrics import check_label_range
    from segkd_examples.models import build_model

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    student = build_model(args.student, args.classes).to(device, memory_format=fmt).train()
    teacher = build_model(args.teacher, args.classes).to(device, memory_format=fmt).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    autocast = autocast_factory(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    n, size = args.batch_size, args.size
    common = {
        "device": str(device),
        "student": args.student,
        "teacher": args.teacher,
        "batch_size": n,
        "size": size,
        "amp": args.amp,
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        common["gpu"] = torch.cuda.get_device_name(device)
    results = []

    # 1. models only
    images = torch.randn(n, 3, size, size, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, args.classes, (n, size, size), device=device)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def models_step() -> None:
        with torch.no_grad(), autocast():
            teacher(images)
        with autocast():
            out = student(images)
            logits = F.interpolate(out.logits, size=(size, size), mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits.float(), labels, ignore_index=255)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    seconds = _timed(models_step, args.iters, args.warmup, sync)
    results.append({"measurement": "models", **common, "s_per_step": seconds, "images_per_s": n / seconds})

    # 2. the pipeline's step with data loading and the KD term
    from segkd_examples.data import build_dataset, default_workers

    cfg = config_from_dict(
        {
            "method": args.method,
            "kd_weight": 3.0 if args.method == "hwd" else 1.0,
            "kd": {"mu": 1.0} if args.method == "hwd" else {},
        }
    )
    distiller = build_distiller(args.method, model_info(student), model_info(teacher), cfg).to(device)
    step_module = DistillationStep(student, distiller, aux_weight=0.4, ignore_index=255)
    optimizer = torch.optim.SGD(
        [p for p in step_module.parameters() if p.requires_grad], lr=0.01, momentum=0.9, weight_decay=1e-4
    )
    dataset = build_dataset(
        "synthetic",
        None,
        "train",
        synthetic_length=n * (args.iters + args.warmup),
        synthetic_size=size,
        synthetic_classes=min(args.classes, 8),
    )
    workers = default_workers() if args.workers is None else args.workers
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=n,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=workers > 0,
    )
    batches = iter(loader)

    def pipeline_step() -> None:
        nonlocal batches
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        y = check_label_range(y, args.classes)
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
        y = y.to(device, non_blocking=True)
        with torch.no_grad(), autocast():
            t_out = teacher(x)
        with autocast():
            loss, _ = step_module(x, y, t_out)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    seconds = _timed(pipeline_step, args.iters, args.warmup, sync)
    results.append(
        {
            "measurement": f"pipeline+{args.method}",
            **common,
            "s_per_step": seconds,
            "images_per_s": n / seconds,
            "workers": workers,
        }
    )
    for r in results:
        print(json.dumps(r))
    ratio = results[1]["images_per_s"] / results[0]["images_per_s"]
    print(f"pipeline / models throughput: {ratio:.3f}")
    return results


if __name__ == "__main__":
    main()
