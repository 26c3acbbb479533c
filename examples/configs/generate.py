"""Write one YAML per row of the HWD paper's Table II (plus the teachers and the synthetic demo configs).

Run ``python examples/configs/generate.py`` after changing a setting here; ``--check`` exits non-zero when the
checked-in files differ from what this script writes (a test runs it). Every value that comes from a paper
says which one in the file's comments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from segkd_examples.methods import HWD_MU, PAPER_DEFAULTS  # noqa: E402

DATASETS: dict[str, dict[str, Any]] = {
    "cityscapes": {"title": "Cityscapes (19 classes)", "teacher_iters": 40000},
    "ade20k": {"title": "ADE20K (150 classes)", "teacher_iters": 80000},
    "cocostuff": {"title": "COCO-Stuff-164k (182 raw-id classes)", "teacher_iters": 80000},
}
STUDENTS = ("deeplabv3_r18", "deeplabv3_mbv2", "pspnet_r18")
STUDENT_BACKBONES = {
    "deeplabv3_r18": "resnet18-imagenet.pth (CIRKD release, deep-stem ResNet-18)",
    "deeplabv3_mbv2": "mobilenetv2-imagenet.pth (CIRKD release)",
    "pspnet_r18": "resnet18-imagenet.pth (CIRKD release, deep-stem ResNet-18)",
}
TEACHER_CKPT = {
    "cityscapes": "deeplabv3_resnet101_citys_best_model.pth (CIRKD's 2022 file, 78.07 val mIoU; the 2025 file of "
    "that name loads too, teacher_generation: auto) or best.pt of the teacher run",
    "ade20k": "best.pt of examples/configs/ade20k_deeplabv3_r101_teacher.yaml",
    "cocostuff": "best.pt of examples/configs/cocostuff_deeplabv3_r101_teacher.yaml",
}

# method -> comment lines naming the source of its weight and parameters (values: methods.PAPER_DEFAULTS)
SOURCES: dict[str, list[str]] = {
    "none": [
        "Baseline student: cross-entropy + 0.4 aux cross-entropy, no distillation.",
    ],
    "hwd": [
        "HWD: W. Sun et al., 'Holistic Weighted Distillation for Semantic Segmentation', ICME 2023.",
        "lambda = 3, tau = 4, beta = 0.1; mu per dataset (Table I): ADE20K 0, Cityscapes 1, COCO-Stuff 0.1.",
    ],
    "cwd": [
        "CWD: C. Shu et al., 'Channel-wise Knowledge Distillation for Dense Prediction', ICCV 2021.",
        "On the logits: tau = 4, loss weight 3 (the paper's segmentation setting; CIRKD's --lambda-cwd-logit 3).",
    ],
    "dist": [
        "DIST: T. Huang et al., 'Knowledge Distillation from A Stronger Teacher', NeurIPS 2022.",
        "As Table II ran it (HWD code: train_dist.py, losses/loss.py CriterionDIST): the Pearson terms on the",
        "raw main logits, no softmax (softmax: false; the README's 'w/o Softmax' rows), beta = gamma = 1,",
        "loss weight 1. DIST_KD's own form is softmax: true (tau = 1).",
    ],
    "skd": [
        "SKD: Y. Liu et al., 'Structured Knowledge Distillation for Dense Prediction', TPAMI 2020.",
        "As Table II ran it (HWD code: train_skd.py): pixel KD 1 (tau 1), pair-wise 10, adversarial 0.001,",
        "discriminator 0.1; discriminator trained by Adam lr 4e-4, betas (0.9, 0.99), lr poly-decayed like",
        "the student's, BatchNorm synchronised under DDP.",
    ],
    "ifvd": [
        "IFVD: Y. Wang et al., 'Intra-class Feature Variation Distillation for Semantic Segmentation', ECCV 2020.",
        "As Table II ran it (HWD code: train_ifvd.py; CIRKD train_scripts/train_kd/train_ifvd.sh also uses",
        "--lambda-ifv 20): pixel KD 1 (tau 1) + IFV 20 on the pre-classifier features + adversarial 0.001;",
        "discriminator 0.1, Adam lr 4e-4, betas (0.9, 0.99), lr poly-decayed, BatchNorm synchronised under DDP.",
    ],
    "mgd": [
        "MGD: Z. Yang et al., 'Masked Generative Distillation', ECCV 2022.",
        "As Table II ran it (HWD code: train_mgd.py, losses/loss.py CriterionMGD): the MGD term alone on the",
        "pre-classifier features, alpha = 2e-5 (inside the loss), mask ratio 0.75, 1x1 align to the teacher's width;",
        "the generator is trained with the student's optimizer. The MGD paper's own recipe: *_mgd_paper.yaml.",
    ],
    "cirkd": [
        "CIRKD: C. Yang et al., 'Cross-Image Relational Knowledge Distillation for Semantic Segmentation',",
        "CVPR 2022. The authors' script: pixel KD 1 (tau 1), mini-batch 1, memory pixel 0.1, memory region 0.1;",
        "the projection head is trained with the student's optimizer.",
    ],
}

COMMON_HEADER = [
    "Training recipe of the HWD paper (Sec. IV-A), shared by every Table II row:",
    "SGD lr 0.01, momentum 0.9, weight decay 1e-4, poly decay power 0.9, global batch 8, 40k iterations,",
    "random scale 0.5-2.0, 512x512 random crop, horizontal flip; loss = CE + 0.4 aux CE (ResNet students)",
    "+ kd_weight * KD; validation images evaluated whole, no test-time augmentation.",
    "As the authors' code (zju-SWJ/HWD train_*.py, on CIRKD's): logits upsampled with align_corners=True in",
    "CE and evaluation (losses/loss.py, train_hwd.py validation), students evaluated every 400 iterations with",
    "the best kept (--val-per-iters 400), mIoU averaged over all class bins (utils/score.py).",
]

#: (source, why) of the evaluation and scoring keys, shared by every Table II config.
AUTHORS_EVAL = {
    "align_corners": "HWD losses/loss.py SegCrossEntropyLoss, train_hwd.py validation",
    "miou_classes": "empty classes count 0: CIRKD / HWD utils/score.py",
}


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    return str(value)


def _render(header: list[str], body: list[tuple[str, Any, str]], kd: dict[str, Any]) -> str:
    lines = [f"# {line}" if line else "#" for line in header]
    lines.append("# Generated by examples/configs/generate.py; edit that script, not this file.")
    for key, value, comment in body:
        text = f"{key}: {_yaml_value(value)}"
        lines.append(f"{text}  # {comment}" if comment else text)
    if kd:
        lines.append("kd:")
        lines.extend(f"  {k}: {_yaml_value(v)}" for k, v in kd.items())
    else:
        lines.append("kd: {}")
    return "\n".join(lines) + "\n"


def _dataset_body(dataset: str) -> list[tuple[str, Any, str]]:
    classes: list[tuple[str, Any, str]] = []
    if dataset == "cocostuff":
        classes = [("cocostuff_classes", 182, "raw ids, as the authors' code; 171: mmsegmentation's protocol")]
    return [
        ("dataset", dataset, ""),
        *classes,
        ("data_root", None, "--data-root DIR (layout in docs/datasets.md)"),
        ("crop_size", [512, 512], "Cityscapes option: [512, 1024] (CIRKD's crop)" if dataset == "cityscapes" else ""),
        ("scale_range", [0.5, 2.0], ""),
        (
            "scale_step",
            0.1,
            "discrete {0.5, 0.6, ..., 2.0}: HWD dataset/datasets.py generate_scale_label; null: continuous",
        ),
        ("flip", True, ""),
        ("workers", None, "per rank; null: min(4, usable CPUs // processes on this machine)"),
    ]


def _optim_body(iters: int, eval_every: int, eval_source: str) -> list[tuple[str, Any, str]]:
    return [
        ("max_iters", iters, ""),
        ("batch_size", 8, "global, split over the processes"),
        ("lr", 0.01, ""),
        ("momentum", 0.9, ""),
        ("weight_decay", 0.0001, ""),
        ("poly_power", 0.9, ""),
        ("aux_weight", 0.4, "used when the model has an aux head (ResNet students and teacher)"),
        ("amp", "none", "bf16 on recent GPUs"),
        ("eval_every", eval_every, eval_source),
        ("ckpt_every", 4000, "last.pt (for --resume) less often than the evaluations"),
        ("eval_mode", "whole", ""),
        ("eval_cache", True, "validation images decoded once, kept in host memory (docs/reproduce.md: cost)"),
        ("align_corners", True, AUTHORS_EVAL["align_corners"]),
        ("miou_classes", "all", AUTHORS_EVAL["miou_classes"]),
        ("seed", 0, ""),
    ]


MGD_PAPER_SOURCE = [
    "MGD: Z. Yang et al., 'Masked Generative Distillation', ECCV 2022. NOT Table II's MGD (see *_mgd.yaml):",
    "the MGD paper's segmentation recipe (yzd-v/MGD, seg/configs/distillers/mgd/*.py and",
    "seg/mmseg/distillation/distillers/segmentation_distiller.py): the MGD term (alpha = 2e-5, mask ratio 0.75)",
    "on the backbone's last stage (student_feat[-1]) plus 3 x channel-wise KD on the logits at tau 4.",
    "The MGD paper trained with mmsegmentation's own schedule; this config keeps the Table II recipe around it.",
]


def student_config(dataset: str, student: str, method: str, *, mgd_paper: bool = False) -> str:
    weight, kd = PAPER_DEFAULTS[method]
    source = MGD_PAPER_SOURCE if mgd_paper else SOURCES[method]
    kd = dict(kd)
    if method == "hwd":
        kd["mu"] = HWD_MU[dataset]
    if mgd_paper:
        kd["recipe"] = "paper"
    title = "not a Table II row (the MGD paper's recipe)" if mgd_paper else "Table II row"
    header = [
        f"{title}: {DATASETS[dataset]['title']}, student {student}, method {method}.",
        *COMMON_HEADER,
        "",
        *source,
    ]
    body = [
        *_dataset_body(dataset),
        ("student", student, ""),
        ("student_pretrained", None, f"--student-pretrained {STUDENT_BACKBONES[student]}"),
        ("teacher", "deeplabv3_r101", ""),
        ("teacher_ckpt", None, f"--teacher-ckpt {TEACHER_CKPT[dataset]}" if method != "none" else "not used"),
        ("method", method, ""),
        ("kd_weight", weight, "lambda"),
        *_optim_body(40000, 400, "HWD train_*.py --val-per-iters 400; report.py shows the best (default)"),
        ("out", f"runs/{dataset}/{student}_{method}{'_paper' if mgd_paper else ''}", ""),
    ]
    return _render(header, body, kd)


def teacher_config(dataset: str) -> str:
    iters = DATASETS[dataset]["teacher_iters"]
    header = [
        f"Teacher: DeepLabV3-ResNet101 on {DATASETS[dataset]['title']}, trained alone (--train-teacher).",
        "The HWD paper trained its ADE20K and COCO-Stuff teachers itself for 80k iterations; on Cityscapes it used",
        "the teacher released by CIRKD (78.07 mIoU), which this config can retrain for comparison.",
        *COMMON_HEADER[1:],
    ]
    body = [
        *_dataset_body(dataset),
        ("teacher", "deeplabv3_r101", ""),
        ("student_pretrained", None, "--student-pretrained resnet101-imagenet.pth (backbone of the trained model)"),
        ("train_teacher", True, ""),
        ("method", "none", ""),
        ("kd_weight", 0.0, ""),
        *_optim_body(iters, 800, "CIRKD train_baseline.py --val-per-iters 800 (the teachers' code base)"),
        ("out", f"runs/{dataset}/teacher_deeplabv3_r101", ""),
    ]
    return _render(header, body, {})


SYNTHETIC_METHOD_KD: dict[str, dict[str, Any]] = {
    # Small queues and discriminator so that every method runs on tiny CPU models.
    "cirkd": {
        "pixel_memory_size": 256,
        "region_memory_size": 32,
        "pixel_contrast_size": 64,
        "region_contrast_size": 16,
    },
    "skd": {"conv_dim": 8, "adversarial_weight": 0.0, "discriminator_weight": 0.0},
    "ifvd": {"conv_dim": 8, "adversarial_weight": 0.0, "discriminator_weight": 0.0},
}


def synthetic_config(method: str) -> str:
    teacher = method == "teacher"
    weight, kd = PAPER_DEFAULTS["none" if teacher else method]
    source = SOURCES["none" if teacher else method]
    kd = dict(kd)
    if method == "hwd":
        kd["mu"] = HWD_MU["synthetic"]
    kd.update(SYNTHETIC_METHOD_KD.get(method, {}))
    header = [
        "Synthetic demo/tests: tiny CPU models on procedurally generated 64x64 images (no download).",
        "Numbers from these runs show that the pipeline works, not how the methods compare at scale.",
        *(
            [f"{method.upper()} here has no adversarial term: its discriminator needs logits of at least 64x64."]
            if method in ("skd", "ifvd")
            else []
        ),
        "",
        *(["Trains the tiny teacher alone."] if teacher else source),
    ]
    body: list[tuple[str, Any, str]] = [
        ("dataset", "synthetic", ""),
        ("synthetic_length", 512, "training images per epoch"),
        ("synthetic_val_length", 64, ""),
        ("synthetic_size", 64, ""),
        ("crop_size", [64, 64], ""),
        ("scale_range", [0.75, 1.5], ""),
        ("flip", True, ""),
        ("workers", 0, ""),
    ]
    if teacher:
        body += [
            ("teacher", "tiny_teacher", ""),
            ("train_teacher", True, ""),
            ("method", "none", ""),
            ("kd_weight", 0.0, ""),
        ]
    else:
        body += [
            ("student", "tiny_student", ""),
            ("teacher", "tiny_teacher", ""),
            ("teacher_ckpt", None if method == "none" else "runs/synthetic/teacher/best.pt", ""),
            ("method", method, ""),
            ("kd_weight", weight, ""),
        ]
    body += [
        (
            "max_iters",
            2000 if teacher else 300,
            "the teacher trains longer: a clearly stronger teacher" if teacher else "",
        ),
        ("batch_size", 8, ""),
        ("lr", 0.05, "higher than the paper's 0.01: tiny models trained from scratch"),
        ("momentum", 0.9, ""),
        ("weight_decay", 0.0001, ""),
        ("poly_power", 0.9, ""),
        ("aux_weight", 0.4, ""),
        ("eval_every", 500 if teacher else 100, ""),
        ("log_every", 100 if teacher else 20, ""),
        ("seed", 0, ""),
        ("out", f"runs/synthetic/{method}", ""),
    ]
    return _render(header, body, kd)


def all_configs() -> dict[str, str]:
    """File name -> content of every generated config."""
    files: dict[str, str] = {}
    for dataset in DATASETS:
        files[f"{dataset}_deeplabv3_r101_teacher.yaml"] = teacher_config(dataset)
        for student in STUDENTS:
            for method in PAPER_DEFAULTS:
                files[f"{dataset}_{student}_{method}.yaml"] = student_config(dataset, student, method)
            files[f"{dataset}_{student}_mgd_paper.yaml"] = student_config(dataset, student, "mgd", mgd_paper=True)
    for method in ("teacher", *PAPER_DEFAULTS):
        files[f"synthetic_{method}.yaml"] = synthetic_config(method)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only compare with the files on disk")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    files = all_configs()
    stale = [
        name for name, text in files.items() if not (args.out / name).exists() or (args.out / name).read_text() != text
    ]
    extra = sorted(p.name for p in args.out.glob("*.yaml") if p.name not in files)
    if args.check:
        for name in stale:
            print(f"out of date: {args.out / name}", file=sys.stderr)
        for name in extra:
            print(f"not generated by this script: {args.out / name}", file=sys.stderr)
        return 1 if stale or extra else 0
    for name in stale:
        (args.out / name).write_text(files[name])
    print(f"{len(files)} configs ({len(stale)} written) in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
