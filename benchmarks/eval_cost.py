"""Cost of the frequent evaluation of the Table II configs (every 400 iterations): loader vs ``eval_cache``.

Not a test. Prints three figures, each the median of several repeats:

* synthetic data (``examples/configs/synthetic_none.yaml``: 64 validation images of 64 x 64, tiny student): one
  evaluation through the validation loader, one from :class:`~segkd_examples.evalcache.CachedValImages` (after
  the first pass), and one training step (batch 8, forward + backward + SGD, the model only);
* one Cityscapes-sized validation item (a photo-like 2048 x 1024 PNG of a few MB and its label map, generated in
  a temporary folder): read, decode and normalise, as the loader does without the cache.

docs/reproduce.md (section "Evaluation cost") derives the Cityscapes estimate from these figures.

Usage::

    python benchmarks/eval_cost.py [--device cpu|cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def synthetic(device: torch.device) -> dict[str, float]:
    from segkd_examples.config import load_config
    from segkd_examples.distributed import DistInfo
    from segkd_examples.engine import build_datasets, build_val_loader, val_shard
    from segkd_examples.evalcache import CachedValImages
    from segkd_examples.metrics import evaluate
    from segkd_examples.models import build_model

    cfg = load_config(Path(__file__).resolve().parents[1] / "examples/configs/synthetic_none.yaml")
    dist = DistInfo(device=device)
    info, train_set, val_set = build_datasets(cfg)
    model = build_model(cfg.student, info.num_classes).to(device).eval()
    result = {}
    for name, batches in (
        ("eval_loader_s", build_val_loader(val_set, cfg, dist)),
        ("eval_cache_s", CachedValImages(val_set, val_shard(val_set, cfg, dist), device=device)),
    ):

        def run(batches=batches) -> None:
            evaluate(lambda x: model(x).logits, batches, info.num_classes, device=device, align_corners=True)

        run()  # first pass (fills the cache)
        result[name] = _median_time(run, 6)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    images, labels = next(iter(torch.utils.data.DataLoader(train_set, batch_size=8)))
    images, labels = images.to(device), labels.to(device)

    def step() -> None:
        logits = F.interpolate(model(images).logits, size=labels.shape[-2:], mode="bilinear", align_corners=True)
        loss = F.cross_entropy(logits, labels, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()
    result["train_step_s"] = _median_time(step, 20)
    result["images"] = len(val_set)
    return result


def cityscapes_item() -> float:
    from PIL import Image

    from segkd_examples.data import build_dataset

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        image_dir, label_dir = root / "leftImg8bit/val/city", root / "gtFine/val/city"
        image_dir.mkdir(parents=True)
        label_dir.mkdir(parents=True)
        for i in range(4):
            base = rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)
            image = np.asarray(Image.fromarray(base).resize((2048, 1024), Image.BILINEAR)).astype(np.int16)
            image = np.clip(image + rng.integers(-6, 7, image.shape), 0, 255).astype(np.uint8)  # photo-like size
            Image.fromarray(image).save(image_dir / f"c_{i:06d}_000019_leftImg8bit.png")
            ids = rng.choice([0, 7, 8, 11, 21, 23, 26], (32, 64)).astype(np.uint8)
            Image.fromarray(np.kron(ids, np.ones((32, 32), dtype=np.uint8))).save(
                label_dir / f"c_{i:06d}_000019_gtFine_labelIds.png"
            )
        dataset = build_dataset("cityscapes", root, "val")
        dataset[0]
        times = []
        for _ in range(3):
            for i in range(len(dataset)):
                t0 = time.perf_counter()
                dataset[i]
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    figures = synthetic(device)
    print(
        f"synthetic, {figures['images']} images: evaluation {figures['eval_loader_s']:.3f} s (loader), "
        f"{figures['eval_cache_s']:.3f} s (cache); training step {figures['train_step_s']:.4f} s; "
        f"evaluation every 400 steps adds {100 * figures['eval_cache_s'] / (400 * figures['train_step_s']):.1f}% "
        f"(cache), {100 * figures['eval_loader_s'] / (400 * figures['train_step_s']):.1f}% (loader)"
    )
    print(f"Cityscapes-sized validation item (2048x1024 PNG): {1000 * cityscapes_item():.0f} ms to read and normalise")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
