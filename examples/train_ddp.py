"""Train a segmentation student with knowledge distillation, on one process or many (torchrun).

Examples::

    # one process (CPU or one GPU)
    python examples/train_ddp.py --config examples/configs/synthetic_hwd.yaml
    # 4 GPUs on one machine; --batch-size is the GLOBAL batch, split over the processes
    torchrun --nproc_per_node=4 examples/train_ddp.py --config examples/configs/cityscapes_deeplabv3_r18_hwd.yaml \
        --data-root /data/cityscapes --teacher-ckpt deeplabv3_resnet101_citys_best_model.pth
    # any config key: --set key=value (YAML syntax), distillation parameters as kd.NAME
    python examples/train_ddp.py --config examples/configs/synthetic_hwd.yaml --set kd.mu=0.5 --set eval_every=50

Precedence: config file < named flags < --set. See docs/pipeline.md and docs/distributed.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from segkd_examples.config import (
    AMP_MODES,
    METHODS,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    load_config,
)

DATASETS = ("cityscapes", "ade20k", "cocostuff", "synthetic")
STUDENTS = ("deeplabv3_r18", "deeplabv3_mbv2", "pspnet_r18", "tiny_student")
TEACHERS = ("deeplabv3_r101", "tiny_teacher")

# flag -> (config key, argparse kwargs)
_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--dataset": ("dataset", {"choices": DATASETS}),
    "--data-root": ("data_root", {"metavar": "DIR"}),
    "--student": ("student", {"choices": STUDENTS}),
    "--teacher": ("teacher", {"choices": TEACHERS}),
    "--teacher-ckpt": ("teacher_ckpt", {"metavar": "PATH", "help": "trained teacher weights"}),
    "--student-pretrained": (
        "student_pretrained",
        {"metavar": "PATH", "help": "ImageNet backbone weights of the trained model"},
    ),
    "--method": ("method", {"choices": METHODS}),
    "--kd-weight": ("kd_weight", {"type": float, "help": "lambda of the KD term (default: the paper's)"}),
    "--max-iters": ("max_iters", {"type": int}),
    "--batch-size": ("batch_size", {"type": int, "help": "GLOBAL batch size, split over the processes"}),
    "--crop-size": ("crop_size", {"type": int, "nargs": "+", "metavar": "N", "help": "H [W]; one number: square"}),
    "--lr": ("lr", {"type": float}),
    "--eval-every": ("eval_every", {"type": int}),
    "--eval-mode": ("eval_mode", {"choices": ("whole", "slide")}),
    "--out": ("out", {"metavar": "DIR"}),
    "--resume": ("resume", {"metavar": "PATH|auto", "help": "a last.pt, or 'auto' for <out>/last.pt if present"}),
    "--amp": ("amp", {"choices": AMP_MODES}),
    "--seed": ("seed", {"type": int}),
    "--workers": ("workers", {"type": int, "help": "data-loader processes per rank (default: min(4, CPUs // ranks))"}),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="YAML", help="config file (examples/configs/*.yaml)")
    for flag, (key, kwargs) in _FLAGS.items():
        parser.add_argument(flag, dest=key, default=None, **kwargs)
    parser.add_argument(
        "--train-teacher",
        dest="train_teacher",
        action="store_true",
        default=None,
        help="train the --teacher model alone (method none), e.g. the ADE20K/COCO-Stuff teachers",
    )
    parser.add_argument("--channels-last", dest="channels_last", action="store_true", default=None)
    parser.add_argument("--deterministic", dest="deterministic", action="store_true", default=None)
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    parser.add_argument("--tensorboard", dest="tensorboard", action="store_true", default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of known errors too (bad config, checkpoint or data file); also SEGKD_DEBUG=1",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key (repeatable); kd.NAME=VALUE for a loss parameter",
    )
    return parser


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Config file, then named flags, then ``--set`` overrides; validated (also against the method's input sizes)."""
    cfg = load_config(args.config) if args.config else config_from_dict({})
    flags = [(key, getattr(args, key)) for key, _ in _FLAGS.values() if getattr(args, key) is not None]
    for key in ("train_teacher", "channels_last", "deterministic", "progress", "tensorboard"):
        if getattr(args, key) is not None:
            flags.append((key, getattr(args, key)))
    apply_overrides(cfg, flags)
    apply_overrides(cfg, args.overrides)
    cfg.validate()
    from segkd_examples.methods import check_input_size  # imports torch: not needed for --help

    check_input_size(cfg)
    return cfg


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    from segkd_examples.config import ConfigError

    try:
        cfg = resolve_config(args)
    except ConfigError as exc:
        build_parser().error(str(exc))
    from segkd_examples.distributed import init_distributed, run_guarded
    from segkd_examples.engine import train
    from segkd_examples.failures import debug_requested, is_known_error

    def job() -> dict[str, Any]:
        dist = init_distributed(timeout_s=cfg.dist_timeout, device=args.device)
        result = train(cfg, dist)
        if dist.is_main:
            print(
                f"done: best mIoU {100 * result['best_miou']:.2f} at iter {result['best_iter']}, "
                f"{result['images_per_s']:.1f} images/s, outputs in {result['out']}",
                flush=True,
            )
        return result

    debug = debug_requested(args.debug)
    try:
        return run_guarded(job, teardown_timeout_s=min(30.0, cfg.dist_timeout), debug=debug)
    except Exception as exc:
        if debug or not is_known_error(exc):
            raise
        raise SystemExit(1) from None  # run_guarded printed the one-line message


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    record(main)()
