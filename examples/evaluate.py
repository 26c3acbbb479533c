"""Evaluate any checkpoint on a validation set: mIoU and the per-class IoU table.

Examples::

    # a checkpoint of this pipeline (best.pt / last.pt): model, dataset and classes come from its config
    python examples/evaluate.py --checkpoint runs/cityscapes/deeplabv3_r18_hwd/best.pt --data-root /data/cityscapes
    # a released state dict (e.g. the CIRKD teacher): name the model and the dataset
    python examples/evaluate.py --checkpoint deeplabv3_resnet101_citys_best_model.pth --model deeplabv3_r101 \
        --dataset cityscapes --data-root /data/cityscapes --eval-mode slide --eval-crop 512 1024
    # several processes share the images; the confusion matrix is summed across them
    torchrun --nproc_per_node=4 examples/evaluate.py --checkpoint best.pt --data-root /data/cityscapes
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="best.pt/last.pt of a run, or a released state dict")
    parser.add_argument("--model", help="model name (default: from the checkpoint's config)")
    parser.add_argument(
        "--generation",
        choices=("auto", "2022", "2025"),
        default="auto",
        help="CIRKD code generation of the architecture (default: recognised from the checkpoint's head width)",
    )
    parser.add_argument("--dataset", help="dataset name (default: from the checkpoint's config)")
    parser.add_argument("--data-root", help="dataset folder (default: from the checkpoint's config)")
    parser.add_argument("--eval-mode", choices=("whole", "slide"), default=None)
    parser.add_argument("--eval-crop", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--eval-stride", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--max-images", type=int, default=None, help="evaluate the first N images only")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--label-out-of-range", choices=("error", "ignore"), default="error")
    parser.add_argument("--json", dest="json_out", help="also write the result as JSON to this file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the checkpoint's config (e.g. synthetic_val_length=32)",
    )
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    from segkd_examples import checkpoint as ckpt
    from segkd_examples.config import ConfigError, apply_overrides, config_from_dict
    from segkd_examples.distributed import init_distributed
    from segkd_examples.engine import autocast_factory, build_datasets, build_val_loader, load_model_weights
    from segkd_examples.logging_utils import json_safe
    from segkd_examples.metrics import evaluate, format_iou_table
    from segkd_examples.models import build_model, checkpoint_generation

    data = ckpt.load_checkpoint(args.checkpoint, what="checkpoint")
    saved = data.get("config") if data.get("format") == ckpt.FORMAT else None
    cfg = config_from_dict(saved or {}, source=f"the config stored in {args.checkpoint}")
    if args.dataset:
        cfg.dataset = args.dataset
    if args.data_root:
        cfg.data_root = args.data_root
    if args.eval_mode:
        cfg.eval_mode = args.eval_mode
    if args.eval_crop:
        cfg.eval_crop = list(args.eval_crop)
    if args.eval_stride:
        cfg.eval_stride = list(args.eval_stride)
    if args.max_images is not None:
        cfg.max_eval_images = args.max_images
    apply_overrides(cfg, args.overrides)
    model_name = args.model or (data.get("model_name") if saved else None)
    if model_name is None:
        raise ConfigError(f"{args.checkpoint} is not a checkpoint of this pipeline: pass --model and --dataset.")
    if saved is None and not args.dataset:
        raise ConfigError(f"{args.checkpoint} is not a checkpoint of this pipeline: pass --dataset.")
    cfg.validate()

    dist = init_distributed(device=args.device)
    info, _, val_set = build_datasets(cfg)
    num_classes = int(info.num_classes)
    generation = args.generation
    if generation == "auto":
        generation = checkpoint_generation(model_name, data, path=args.checkpoint)
    model = build_model(model_name, num_classes, generation=generation)
    load_model_weights(model, args.checkpoint, what="checkpoint", data=data)
    model.to(dist.device).eval()
    autocast = autocast_factory(args.amp, dist.device)
    miou, iou, _ = evaluate(
        lambda x: model(x).logits,
        build_val_loader(val_set, cfg, dist),
        num_classes,
        device=dist.device,
        ignore_index=int(getattr(info, "ignore_index", 255)),
        mode=cfg.eval_mode,
        crop=cfg.eval_crop,
        stride=cfg.eval_stride,
        label_action=args.label_out_of_range,
        autocast=autocast if args.amp != "none" else None,
        align_corners=cfg.align_corners,
        miou_classes=cfg.miou_classes,
    )
    result = {
        "checkpoint": str(args.checkpoint),
        "model": model_name,
        "generation": generation,
        "dataset": cfg.dataset,
        "miou": miou,
        "iou": iou,
        "class_names": list(info.class_names),
    }
    if dist.is_main:
        print(format_iou_table(iou, list(info.class_names), cfg.miou_classes))
        print(f"mIoU {100 * miou:.2f} ({cfg.dataset}, {cfg.eval_mode}, {model_name})")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(json_safe(result), indent=2) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    from segkd_examples.distributed import run_guarded

    return run_guarded(lambda: run(args))


if __name__ == "__main__":
    main()
