r"""Pictures of HWD's channel weights: the smoothing curve, the weights it gives, and the weights of a real batch.

Writes three PNG files under ``--out`` (no GPU needed):

* ``hwd_curve.png``: the smoothing curve :math:`g(x) = (1 - \beta^x) / (1 - \beta)` for several ``beta``
  (left) and :math:`\exp g(x)`, the weight before the softmax normalisation (right);
* ``hwd_weights_vs_z.png``: the weight :math:`w = C\,\mathrm{softmax}(g(z + \mu))` of a channel against its
  standardised divergence ``z``, for the paper's settings (Cityscapes ``mu=1``, ADE20K ``mu=0``, COCO-Stuff
  ``mu=0.1``, all ``beta=0.1``, each with its class count ``C``; left) and for several ``mu`` (right);
* ``hwd_weights_heatmap.png``: the weights of a batch, one row per image and one column per class.

Where the batch comes from:

* ``--student-ckpt`` and ``--teacher-ckpt`` given: the two checkpoints are loaded into the pipeline's models
  (``best.pt``/``last.pt`` of ``examples/train_ddp.py`` name their model, class count and config; a released
  state dict, such as CIRKD's teacher, also needs ``--config`` for the model names and the dataset), and the
  first ``--images`` validation images of the run's dataset (``--data-root`` to point elsewhere) go through
  both. ``mu``, ``beta`` and ``tau`` are the run's HWD settings, or the paper's for its dataset.
* otherwise: fabricated logits, so that the picture needs neither data nor training. A confident "teacher"
  predicts rectangles of a few classes per image; the "student" agrees on most classes but misplaces every
  third class ("hard" classes, marked ``*``) where it is present. It shows what HWD does with a student that
  has mastered some classes and not others; it is not a measurement of any trained model.

Usage::

    python examples/plot_hwd_weights.py --out docs/img                    # the pictures of docs/hwd.md
    python examples/plot_hwd_weights.py --out runs/demo \
        --student-ckpt runs/demo/hwd_seed0/best.pt --teacher-ckpt runs/demo/teacher/best.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from segkd.losses.hwd import hwd_curve, hwd_weights, hwd_weights_from_divergence

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: The HWD paper's settings (supplementary Table I): name -> (class count C, mu); beta = 0.1 and tau = 4 for all.
PAPER_SETTINGS: dict[str, tuple[int, float]] = {
    "cityscapes": (19, 1.0),
    "ade20k": (150, 0.0),
    "cocostuff": (171, 0.1),
}
PAPER_TITLES = {"cityscapes": "Cityscapes", "ade20k": "ADE20K", "cocostuff": "COCO-Stuff"}
PAPER_BETA = 0.1
PAPER_TAU = 4.0

#: Figure sizes in inches; at :data:`DPI` a PNG is exactly ``inches * DPI`` pixels.
DPI = 100
CURVE_SIZE = (10.0, 4.0)
WEIGHTS_SIZE = (10.0, 4.0)
HEATMAP_SIZE = (10.0, 4.5)


@dataclasses.dataclass
class BatchWeights:
    """HWD weights of a batch and what produced them.

    Attributes:
        weights: ``(N, C)``, each row non-negative and summing to ``C``.
        class_names: ``C`` column labels.
        source: one line saying where the logits came from (the plot's subtitle).
        mu, beta, tau: the HWD settings used.
        hard_classes: classes the fabricated student was made bad at (empty for real checkpoints).
    """

    weights: Tensor
    class_names: list[str]
    source: str
    mu: float
    beta: float
    tau: float
    hard_classes: list[int] = dataclasses.field(default_factory=list)


def _new_figure(size: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)  # Agg, no display, no global pyplot state
    return figure


def _save(figure: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path


# ------------------------------------------------------------------------------------------------ the curve


def plot_curve(path: Path, betas: Sequence[float] = (0.01, 0.1, 0.5, 0.9, 1.0)) -> Path:
    """``g(x)`` and ``exp(g(x))`` for several ``beta`` (``beta = 1`` is the straight line ``g(x) = x``)."""
    x = torch.linspace(-2.0, 2.0, 401, dtype=torch.float64)
    figure = _new_figure(CURVE_SIZE)
    left, right = figure.subplots(1, 2)
    for beta in betas:
        g = hwd_curve(x, beta)
        style = {"linewidth": 2.5} if beta == PAPER_BETA else {"linewidth": 1.2}
        label = f"beta = {beta:g}" + (" (paper)" if beta == PAPER_BETA else "")
        left.plot(x.numpy(), g.numpy(), label=label, **style)
        right.plot(x.numpy(), torch.exp(g).numpy(), label=label, **style)
    left.set_ylim(-6.0, 2.5)
    left.set_title("smoothing curve g(x) = (1 - beta^x) / (1 - beta)")
    left.set_xlabel("x = z + mu")
    left.set_ylabel("g(x)")
    right.set_ylim(0.0, 4.0)
    right.set_title("exp(g(x)): weight before normalisation")
    right.set_xlabel("x = z + mu")
    for ax in (left, right):
        ax.axhline(0.0, color="0.6", linewidth=0.8)
        ax.axvline(0.0, color="0.6", linewidth=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(figure, path)


def weights_against_z(num_classes: int, mu: float, beta: float) -> tuple[Tensor, Tensor]:
    """Standardised divergences ``z`` and the weights HWD gives them, for ``C`` normally spread divergences.

    The divergences are the ``C`` normal quantiles ``Phi^-1((i + 0.5) / C)``; the weights come from
    :func:`segkd.losses.hwd.hwd_weights_from_divergence`, and ``z`` is recomputed the same way (mean and
    unbiased standard deviation over the channels) so that each weight is plotted at its own channel's ``z``.
    """
    probs = (torch.arange(num_classes, dtype=torch.float64) + 0.5) / num_classes
    divergence = torch.special.ndtri(probs)[None]
    weights = hwd_weights_from_divergence(divergence, mu=mu, beta=beta)[0]
    z = (divergence - divergence.mean()) / divergence.std(unbiased=True) if num_classes > 1 else divergence * 0
    return z[0], weights


def plot_weights_vs_z(path: Path) -> Path:
    """Weights against ``z``: the paper's three settings (left), and ``mu`` varied at ADE20K's ``C`` (right)."""
    figure = _new_figure(WEIGHTS_SIZE)
    left, right = figure.subplots(1, 2, sharey=True)
    for name, (classes, mu) in PAPER_SETTINGS.items():
        z, w = weights_against_z(classes, mu, PAPER_BETA)
        left.plot(z.numpy(), w.numpy(), marker=".", markersize=3, label=f"{PAPER_TITLES[name]}: C={classes}, mu={mu:g}")
    classes = PAPER_SETTINGS["ade20k"][0]
    for mu in (-1.0, 0.0, 0.5, 1.0, 2.0):
        z, w = weights_against_z(classes, mu, PAPER_BETA)
        right.plot(z.numpy(), w.numpy(), label=f"mu = {mu:g}", linewidth=2.5 if mu == 0.0 else 1.2)
    left.set_title(f"paper settings (beta = {PAPER_BETA:g})")
    right.set_title(f"C = {classes}, beta = {PAPER_BETA:g}, varying mu")
    left.set_ylabel("weight w (CWD: 1 for every channel)")
    for ax in (left, right):
        ax.axhline(1.0, color="k", linestyle="--", linewidth=0.8, label="CWD (w = 1)")
        ax.set_xlabel("standardised divergence z of a channel")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(figure, path)


# ------------------------------------------------------------------------------------------------ a batch


def fabricated_weights(
    num_images: int = 6,
    num_classes: int = 19,
    size: int = 32,
    mu: float = 1.0,
    beta: float = PAPER_BETA,
    tau: float = PAPER_TAU,
    seed: int = 0,
) -> BatchWeights:
    """HWD weights of fabricated teacher/student logits (see the module docstring); deterministic by ``seed``.

    Raises:
        ValueError: ``num_images`` < 1, ``num_classes`` < 3 or ``size`` < 8.
    """
    if num_images < 1 or num_classes < 3 or size < 8:
        raise ValueError(
            f"Expected num_images >= 1, num_classes >= 3 and size >= 8, got {num_images}, {num_classes} and {size}."
        )
    gen = torch.Generator().manual_seed(seed)
    hard = list(range(2, num_classes, 3))
    teacher = torch.empty(num_images, num_classes, size, size)
    student = torch.empty_like(teacher)
    for n in range(num_images):
        label = torch.zeros(size, size, dtype=torch.long)  # class 0 is the background
        count = int(torch.randint(2, min(6, num_classes), (1,), generator=gen))
        for cls in torch.randperm(num_classes - 1, generator=gen)[:count].add(1).tolist():
            top, left = torch.randint(0, size - size // 4, (2,), generator=gen).tolist()
            height, width = torch.randint(size // 8, size // 2, (2,), generator=gen).tolist()
            label[top : top + height, left : left + width] = cls
        confident = 8.0 * torch.nn.functional.one_hot(label, num_classes).permute(2, 0, 1).float()
        teacher[n] = confident + 0.3 * torch.randn(num_classes, size, size, generator=gen)
        student[n] = teacher[n] + 0.1 * torch.randn(num_classes, size, size, generator=gen)
        for cls in hard:  # the student has not mastered these: where present, its map is off by a quarter image
            student[n, cls] = 0.6 * confident[cls].roll(shifts=(size // 4, size // 4), dims=(0, 1)) + 0.5 * (
                torch.randn(size, size, generator=gen)
            )
    weights = hwd_weights(student, teacher, tau=tau, mu=mu, beta=beta)
    return BatchWeights(
        weights=weights,
        class_names=[f"c{c}" for c in range(num_classes)],
        source=f"fabricated logits ({num_images} images, {num_classes} classes; hard classes marked *)",
        mu=mu,
        beta=beta,
        tau=tau,
        hard_classes=hard,
    )


def _short(path: str) -> str:
    """``folder/file`` of a path: enough to tell the runs apart in a title."""
    return Path(path).parent.name + "/" + Path(path).name if Path(path).parent.name else Path(path).name


def _hwd_settings(cfg: Any) -> tuple[float, float, float]:
    """``(mu, beta, tau)`` of an HWD run, else the pipeline's defaults for the run's dataset.

    The defaults are the pipeline's (``segkd_examples.methods.resolve_kd``: the paper's, and Cityscapes' ``mu`` for
    the synthetic demo).
    """
    from segkd_examples.methods import resolve_kd

    _, params = resolve_kd("hwd", cfg.dataset, None, cfg.kd if cfg.method == "hwd" else None)
    return float(params["mu"]), float(params["beta"]), float(params["tau"])


def checkpoint_weights(
    student_ckpt: str,
    teacher_ckpt: str,
    *,
    config: str | None = None,
    data_root: str | None = None,
    num_images: int = 6,
    device: str = "cpu",
    mu: float | None = None,
    beta: float | None = None,
    tau: float | None = None,
) -> BatchWeights:
    """HWD weights of the first ``num_images`` validation images through a trained student and teacher.

    ``mu``, ``beta`` and ``tau`` default to the run's HWD settings (the paper's for its dataset otherwise).

    Raises:
        segkd_examples.checkpoint.CheckpointError: a checkpoint cannot be read or does not fit its model.
        ValueError: a released state dict without ``config``; a dataset root that does not fit.
    """
    from segkd_examples import checkpoint as ckpt
    from segkd_examples.config import config_from_dict, load_config
    from segkd_examples.engine import build_datasets, load_model_weights
    from segkd_examples.models import build_model, checkpoint_generation

    student_state = ckpt.load_checkpoint(student_ckpt, what="student checkpoint")
    teacher_state = ckpt.load_checkpoint(teacher_ckpt, what="teacher checkpoint")
    if config is not None:
        cfg = load_config(config)
    elif student_state.get("format") == ckpt.FORMAT and isinstance(student_state.get("config"), dict):
        cfg = config_from_dict(student_state["config"], source=f"the config stored in {student_ckpt}")
    else:
        raise ValueError(
            f"{student_ckpt} is not a checkpoint of examples/train_ddp.py (it names no model or dataset): "
            "pass --config examples/configs/<dataset>_<student>_<method>.yaml."
        )
    if data_root is not None:
        cfg.data_root = data_root
    info, _, val_set = build_datasets(cfg)
    num_classes = int(info.num_classes)

    def model_from(state: dict[str, Any], path: str, default_name: str, what: str) -> torch.nn.Module:
        name = str(state.get("model_name", default_name)) if state.get("format") == ckpt.FORMAT else default_name
        generation = checkpoint_generation(name, state, path=path, what=what)  # CIRKD 2022 or 2025 head width
        model = build_model(name, num_classes, generation=generation)
        load_model_weights(model, path, what=what, data=state)
        return model.eval().to(device)

    student = model_from(student_state, student_ckpt, cfg.student, "student checkpoint")
    teacher = model_from(teacher_state, teacher_ckpt, cfg.teacher, "teacher checkpoint")
    run_mu, run_beta, run_tau = _hwd_settings(cfg)
    mu = run_mu if mu is None else mu
    beta = run_beta if beta is None else beta
    tau = run_tau if tau is None else tau
    rows = []
    count = min(num_images, len(val_set))
    with torch.no_grad():
        for index in range(count):  # one at a time: validation images may differ in size
            image = val_set[index][0][None].to(device)
            s_logits = student(image, with_aux=False).logits.float()
            t_logits = teacher(image, with_aux=False).logits.float()
            rows.append(hwd_weights(s_logits, t_logits, tau=tau, mu=mu, beta=beta).cpu())
    return BatchWeights(
        weights=torch.cat(rows),
        class_names=list(info.class_names),
        source=f"student {_short(student_ckpt)}, teacher {_short(teacher_ckpt)}, {count} {cfg.dataset} val images",
        mu=mu,
        beta=beta,
        tau=tau,
    )


def plot_heatmap(batch: BatchWeights, path: Path) -> Path:
    """The ``(N, C)`` weights as an image: rows are images, columns classes; white is CWD's uniform 1."""
    from matplotlib.colors import TwoSlopeNorm

    weights = batch.weights.double().numpy()
    num_images, num_classes = weights.shape
    vmax = max(float(weights.max()), 1.0 + 1e-6)
    figure = _new_figure(HEATMAP_SIZE)
    ax = figure.subplots()
    shown = ax.imshow(
        weights, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax), interpolation="none"
    )
    colorbar = figure.colorbar(shown, ax=ax)
    colorbar.set_label("HWD weight w (CWD: 1)")
    ax.set_ylabel("image")
    ax.set_yticks(range(num_images))
    ax.set_xlabel("class (channel)")
    if num_classes <= 40:
        names = [name + ("*" if c in batch.hard_classes else "") for c, name in enumerate(batch.class_names)]
        ax.set_xticks(range(num_classes))
        ax.set_xticklabels(names, rotation=90, fontsize="small")
    ax.set_title(
        f"HWD weights per image and class (mu={batch.mu:g}, beta={batch.beta:g}, tau={batch.tau:g})\n{batch.source}",
        fontsize="medium",
    )
    return _save(figure, path)


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the PNG files")
    parser.add_argument("--student-ckpt", metavar="PATH", help="trained student (best.pt of a train_ddp.py run)")
    parser.add_argument("--teacher-ckpt", metavar="PATH", help="trained teacher")
    parser.add_argument("--config", metavar="YAML", help="run config, needed for released (non-pipeline) weights")
    parser.add_argument("--data-root", metavar="DIR", help="dataset folder, if not the one the run used")
    parser.add_argument("--images", type=int, default=6, help="images in the heatmap (default 6)")
    parser.add_argument("--device", default="cpu", help="torch device for the checkpoint models (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fabricated logits")
    parser.add_argument("--mu", type=float, help="HWD mu of the heatmap (default: the run's, or 1 when fabricated)")
    parser.add_argument("--beta", type=float, help=f"HWD beta of the heatmap (default: the run's, or {PAPER_BETA})")
    parser.add_argument("--tau", type=float, help=f"HWD tau of the heatmap (default: the run's, or {PAPER_TAU})")
    args = parser.parse_args(argv)
    if (args.student_ckpt is None) != (args.teacher_ckpt is None):
        parser.error("give both --student-ckpt and --teacher-ckpt, or neither (fabricated logits).")
    if args.images < 1:
        parser.error(f"--images must be >= 1, got {args.images}.")
    for name in ("beta", "tau"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            parser.error(f"--{name} must be > 0, got {getattr(args, name)}.")

    out = Path(args.out)
    written = {
        "curve": plot_curve(out / "hwd_curve.png"),
        "weights_vs_z": plot_weights_vs_z(out / "hwd_weights_vs_z.png"),
    }
    if args.student_ckpt is not None:
        batch = checkpoint_weights(
            args.student_ckpt,
            args.teacher_ckpt,
            config=args.config,
            data_root=args.data_root,
            num_images=args.images,
            device=args.device,
            mu=args.mu,
            beta=args.beta,
            tau=args.tau,
        )
    else:
        batch = fabricated_weights(
            num_images=args.images,
            seed=args.seed,
            mu=1.0 if args.mu is None else args.mu,
            beta=PAPER_BETA if args.beta is None else args.beta,
            tau=PAPER_TAU if args.tau is None else args.tau,
        )
    written["heatmap"] = plot_heatmap(batch, out / "hwd_weights_heatmap.png")
    per_class = batch.weights.double().mean(dim=0)
    top = torch.argsort(per_class, descending=True)[: min(5, per_class.numel())].tolist()
    print(
        "largest mean weights: "
        + ", ".join(f"{batch.class_names[c]} {per_class[c]:.2f}" for c in top)
        + f" (uniform = 1; {math.prod(batch.weights.shape)} weights)"
    )
    for path in written.values():
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
