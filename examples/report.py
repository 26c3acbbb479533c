"""Summarise training runs: a Markdown table shaped like Table II of the HWD paper, and training-curve plots.

Reads the ``metrics.jsonl`` and ``config.yaml`` that ``examples/train_ddp.py`` writes into each run folder and
writes, under ``--out``:

* ``report.md``: one row per dataset, student and method (dataset, student, method, mIoU, delta over the no-KD
  baseline of the same dataset and student, number of runs, iterations done; several seeds of a row are
  averaged, ``--per-run`` lists them apart), the plots below, and every warning raised while reading;
* ``curves/<dataset>_<student>_<method>[_N].png``: per run, the mIoU and each loss term against the iteration;
* ``miou_<dataset>_<student>.png``: the mIoU curves of one dataset and student, one colour per method: the
  mean over the method's runs (seeds) as a line, their min-max range as a band.

Runs still in progress, runs without any evaluation yet, records with missing values and lines that are not
JSON (a run killed in the middle of a write) are reported with a warning, never a crash.

Usage::

    python examples/report.py runs/ --out reports/            # every run folder found under runs/
    python examples/report.py runs/ade20k/deeplabv3_r18_none runs/ade20k/deeplabv3_r18_hwd --out reports/
    python examples/report.py runs/x/metrics.jsonl --metric last --out reports/

A path may be a ``metrics.jsonl`` file, a run folder holding one, or a folder searched recursively for them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

#: Order of the table's rows: datasets, students and methods as in the HWD paper's tables.
DATASET_ORDER = ("cityscapes", "ade20k", "cocostuff", "synthetic")
STUDENT_ORDER = ("deeplabv3_r101", "deeplabv3_r18", "deeplabv3_mbv2", "pspnet_r18", "tiny_teacher", "tiny_student")
METHOD_ORDER = ("teacher", "none", "skd", "ifvd", "cwd", "cirkd", "dist", "mgd", "hwd")
BASELINE_METHOD = "none"
TEACHER_METHOD = "teacher"
UNKNOWN = "unknown"

#: Published mIoU (%) of the HWD paper's complete comparison (Table II of its supplementary material, latest
#: revision): (dataset, model, method) -> mIoU. The COCO-Stuff numbers average the IoU over 182 class ids, 11 of
#: which never occur (see docs/reproduce.md and :func:`paper_scale`). docs/reproduce.md shows the same numbers
#: (a test checks).
PUBLISHED: dict[tuple[str, str, str], float] = {
    ("cityscapes", "deeplabv3_r101", "teacher"): 78.07,
    ("ade20k", "deeplabv3_r101", "teacher"): 42.46,
    ("cocostuff", "deeplabv3_r101", "teacher"): 35.31,
    **{
        (dataset, student, method): value
        for (dataset, student), values in {
            ("cityscapes", "deeplabv3_r18"): (71.78, 72.79, 72.20, 73.57, 72.23, 71.98, 71.79, 74.72),
            ("ade20k", "deeplabv3_r18"): (29.86, 31.05, 29.87, 32.90, 30.47, 31.68, 30.32, 33.85),
            ("ade20k", "deeplabv3_mbv2"): (27.16, 26.96, 26.03, 29.19, 27.39, 28.69, 27.39, 31.07),
            ("ade20k", "pspnet_r18"): (31.64, 31.30, 31.58, 33.43, 31.36, 32.34, 32.10, 34.37),
            ("cocostuff", "deeplabv3_r18"): (26.05, 25.94, 25.14, 26.17, 25.85, 26.51, 26.44, 26.76),
        }.items()
        for method, value in zip(METHOD_ORDER[1:], values, strict=True)
    },
}

#: COCO-Stuff: the paper's mIoU sums the IoU of the 171 classes that occur and divides by 182 (CIRKD's
#: utils/score.py over the raw ids, the 11 unused ones counting 0). A run that divides by 171 reads 182/171 higher.
COCOSTUFF_PAPER_BINS, COCOSTUFF_REAL_CLASSES = 182, 171

#: Keys of a training record that are not loss terms.
NON_LOSS_KEYS = frozenset({"kind", "iter", "lr", "images_per_s"})

#: Figure geometry (inches at :data:`DPI`): a PNG's size in pixels is ``inches * DPI``, exactly.
DPI = 100
PANEL_SIZE = (4.0, 3.0)
PANEL_COLUMNS = 3
OVERLAY_SIZE = (8.0, 5.0)


class Warnings:
    """Collects warnings: each is printed to stderr at once and listed again at the end of ``report.md``."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def __call__(self, message: str) -> None:
        self.messages.append(message)
        print(f"report.py: warning: {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Run:
    """What the report needs from one run folder.

    Attributes:
        metrics_path: the ``metrics.jsonl`` file.
        dataset: dataset name from ``config.yaml`` (``"unknown"`` without one).
        student: the trained model (the teacher's name for a ``train_teacher`` run).
        method: distillation method, ``"teacher"`` for a ``train_teacher`` run; ``<method>_<recipe>`` for a run
            whose ``kd.recipe`` is not Table II's (``mgd_paper``: not compared with the paper's MGD number).
        max_iters: planned iterations, or ``None`` when unknown.
        evals: ``(iteration, mIoU in [0, 1])`` pairs in iteration order.
        losses: per loss term, ``(iteration, value)`` pairs in iteration order.
        last_iter: the largest iteration of any record (0 for an empty file).
        eval_every: iterations between evaluations, or ``None`` when unknown.
        num_classes: classes of the trained model (``config.yaml``), or ``None`` when unknown.
        miou_classes: how its mIoU averages: ``"present"`` classes or ``"all"`` bins (runs before the key:
            ``"present"``).
    """

    metrics_path: Path
    dataset: str = UNKNOWN
    student: str = UNKNOWN
    method: str = UNKNOWN
    max_iters: int | None = None
    evals: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    losses: dict[str, list[tuple[int, float]]] = dataclasses.field(default_factory=dict)
    last_iter: int = 0
    eval_every: int | None = None
    num_classes: int | None = None
    miou_classes: str = "present"

    @property
    def group(self) -> tuple[str, str]:
        """``(dataset, student)``: the runs whose mIoU is compared with the same baseline."""
        return self.dataset, self.student

    @property
    def in_progress(self) -> bool:
        """Whether the run has not reached its planned iterations (or their number is unknown)."""
        return self.max_iters is None or self.last_iter < self.max_iters

    def miou(self, metric: str) -> float | None:
        """The run's mIoU in [0, 1]: the ``"best"`` or the ``"last"`` evaluation; ``None`` before the first."""
        if not self.evals:
            return None
        return max(v for _, v in self.evals) if metric == "best" else self.evals[-1][1]

    def selection(self, metric: str) -> str:
        """Which evaluation gives the mIoU: ``"best of 100 (every 400)"``, ``"last (iter 40000)"``, or ``""``."""
        if not self.evals:
            return ""
        if metric == "last":
            return f"last (iter {self.evals[-1][0]})"
        every = f" (every {self.eval_every})" if self.eval_every is not None else ""
        return f"best of {len(self.evals)}{every}"


def paper_scale(run: Run) -> float:
    """Factor that puts the paper's number of ``run``'s row on the scale of ``run``'s mIoU.

    1 except on COCO-Stuff when the run does not average over the paper's 182 bins (the 182-class protocol with
    ``miou_classes: all``): a 171-class run, or a 182-class run averaging the present classes, divides the same
    sum of IoUs by 171, so the paper's number is shown times 182/171. Assumes, as on COCO-Stuff-164k val, that the
    171 real classes all occur in the validation labels or predictions.
    """
    if run.dataset != "cocostuff":
        return 1.0
    if run.num_classes == COCOSTUFF_PAPER_BINS and run.miou_classes == "all":
        return 1.0
    return COCOSTUFF_PAPER_BINS / COCOSTUFF_REAL_CLASSES


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` (``null`` for NaN, strings such as ``"inf"``, booleans)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def find_metrics_files(paths: Iterable[str | Path], warn: Warnings) -> list[Path]:
    """Resolve the command-line paths to ``metrics.jsonl`` files (each once, in order of discovery)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            candidates = [path]
        elif (path / "metrics.jsonl").is_file():
            candidates = [path / "metrics.jsonl"]
        elif path.is_dir():
            candidates = sorted(path.rglob("metrics.jsonl"))
            if not candidates:
                warn(f"no metrics.jsonl under {path}; skipped.")
        else:
            warn(f"{path} does not exist; skipped.")
            candidates = []
        for candidate in candidates:
            if candidate.resolve() not in {f.resolve() for f in found}:
                found.append(candidate)
    return found


def read_records(path: Path, warn: Warnings) -> list[dict[str, Any]]:
    """The JSON objects of a ``metrics.jsonl`` file; a line that is not a JSON object is skipped with a warning."""
    records: list[dict[str, Any]] = []
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            where = "last line" if number == len(lines) else f"line {number}"
            warn(f"{path}: {where} is not JSON (a run killed while writing?); skipped.")
            continue
        if not isinstance(record, dict):
            warn(f"{path}: line {number} is not a JSON object; skipped.")
            continue
        if _number(record.get("iter")) is None:
            warn(f"{path}: line {number} has no numeric `iter`; skipped.")
            continue
        records.append(record)
    return records


def _read_config(run_dir: Path, warn: Warnings) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        warn(f"{run_dir}: no config.yaml; dataset, student and method are shown as {UNKNOWN!r}.")
        return {}
    try:
        import yaml

        data = yaml.safe_load(path.read_text(errors="replace"))
    except Exception as exc:  # a YAML error, or PyYAML missing: the run is still worth reporting
        warn(f"{path}: cannot be read ({type(exc).__name__}: {exc}); dataset, student and method unknown.")
        return {}
    if not isinstance(data, dict):
        warn(f"{path}: not a mapping; dataset, student and method unknown.")
        return {}
    return data


def load_run(metrics_path: Path, warn: Warnings) -> Run | None:
    """Read one run (its ``metrics.jsonl`` and the ``config.yaml`` beside it); ``None`` if unreadable."""
    try:
        records = read_records(metrics_path, warn)
    except OSError as exc:
        warn(f"{metrics_path}: cannot be read ({exc}); skipped.")
        return None
    config = _read_config(metrics_path.parent, warn)
    run = Run(metrics_path)
    if config.get("train_teacher"):
        run.student, run.method = str(config.get("teacher", UNKNOWN)), TEACHER_METHOD
    else:
        run.student, run.method = str(config.get("student", UNKNOWN)), str(config.get("method", UNKNOWN))
        kd = config.get("kd")
        recipe = kd.get("recipe") if isinstance(kd, dict) else None
        if recipe not in (None, "hwd"):  # another recipe of the method (e.g. MGD's own paper): its own row
            run.method = f"{run.method}_{recipe}"
    run.dataset = str(config.get("dataset", UNKNOWN))
    max_iters = _number(config.get("max_iters"))
    run.max_iters = int(max_iters) if max_iters is not None else None
    eval_every = _number(config.get("eval_every"))
    run.eval_every = int(eval_every) if eval_every is not None else None
    num_classes = _number(config.get("num_classes", config.get("cocostuff_classes")))
    run.num_classes = int(num_classes) if num_classes is not None else None
    run.miou_classes = "all" if config.get("miou_classes") == "all" else "present"

    evals: dict[int, float] = {}
    losses: dict[str, dict[int, float]] = {}
    for record in records:
        iteration = int(record["iter"])
        run.last_iter = max(run.last_iter, iteration)
        if record.get("kind") == "eval" or "miou" in record:
            miou = _number(record.get("miou"))
            if miou is None:
                warn(f"{metrics_path}: evaluation at iteration {iteration} has no numeric `miou`; skipped.")
            else:
                evals[iteration] = miou  # a resumed run may repeat an iteration: the later record wins
            continue
        for key, value in record.items():
            number = _number(value)
            if key not in NON_LOSS_KEYS and number is not None:
                losses.setdefault(key, {})[iteration] = number
    run.evals = sorted(evals.items())
    run.losses = {key: sorted(points.items()) for key, points in losses.items()}
    if not run.evals:
        warn(f"{metrics_path}: no evaluation yet; the mIoU cell is left empty.")
    return run


def _order(value: str, order: Sequence[str]) -> tuple[int, str]:
    return (order.index(value) if value in order else len(order), value)


def sort_runs(runs: Iterable[Run]) -> list[Run]:
    """Runs in Table II order: dataset, then student, then method (teacher and baseline first)."""
    return sorted(
        runs,
        key=lambda r: (
            _order(r.dataset, DATASET_ORDER),
            _order(r.student, STUDENT_ORDER),
            _order(r.method, METHOD_ORDER),
            str(r.metrics_path),
        ),
    )


def baselines(runs: Iterable[Run], metric: str) -> dict[tuple[str, str, float], float]:
    """The no-KD mIoU of each ``(dataset, student, paper_scale)``: the mean over its baseline runs with an evaluation.

    The scale keeps COCO-Stuff runs scored over 171 and over 182 bins apart (:func:`paper_scale`).
    """
    values: dict[tuple[str, str, float], list[float]] = {}
    for run in runs:
        miou = run.miou(metric)
        if run.method == BASELINE_METHOD and miou is not None:
            values.setdefault((*run.group, paper_scale(run)), []).append(miou)
    return {group: sum(found) / len(found) for group, found in values.items()}


def table_rows(runs: Sequence[Run], per_run: bool) -> list[list[Run]]:
    """Group sorted runs into table rows: one per dataset, student and method (several seeds are averaged).

    With ``per_run``, or for runs whose config is unknown, every run is a row of its own.
    """
    rows: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        key: tuple[str, ...] = (run.dataset, run.student, run.method, str(paper_scale(run)))
        if per_run or UNKNOWN in key:
            key = (*key, str(run.metrics_path))
        rows.setdefault(key, []).append(run)
    return list(rows.values())


def run_label(run: Run) -> str:
    """``<dataset>_<student>_<method>``, safe as a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{run.dataset}_{run.student}_{run.method}")


def unique_labels(runs: Sequence[Run]) -> list[str]:
    """:func:`run_label` of each run, with ``_2``, ``_3`` ... appended to repeats (several seeds of one row)."""
    seen: dict[str, int] = {}
    labels = []
    for run in runs:
        label = run_label(run)
        seen[label] = seen.get(label, 0) + 1
        labels.append(label if seen[label] == 1 else f"{label}_{seen[label]}")
    return labels


def format_table(rows: Sequence[Sequence[Run]], metric: str, base: dict[tuple[str, str, float], float]) -> str:
    """The Markdown table, one line per row of runs (see :func:`table_rows`).

    mIoU: the mean over the row's runs that have an evaluation, in percent with two decimals; delta: in points
    over the mean of the baseline runs of the same dataset and student; runs: how many, with the range of their
    mIoU when more than one.
    """
    lines = [
        "| dataset | student | method | mIoU (%) | delta | runs | iterations | paper (%) | selection | folder |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in rows:
        first = row[0]
        values = [v for v in (run.miou(metric) for run in row) if v is not None]
        miou = sum(values) / len(values) if values else None
        miou_cell = f"{100 * miou:.2f}" if miou is not None else ""
        if first.method in (BASELINE_METHOD, TEACHER_METHOD) or miou is None:
            delta_cell = ""
        elif (*first.group, paper_scale(first)) in base:
            delta_cell = f"{100 * (miou - base[(*first.group, paper_scale(first))]):+.2f}"
        else:
            delta_cell = "no baseline"
        runs_cell = str(len(row))
        if len(values) > 1:
            runs_cell += f" ({100 * min(values):.2f}-{100 * max(values):.2f})"
        planned = {run.max_iters for run in row}
        planned_cell = str(planned.pop()) if len(planned) == 1 and None not in planned else "?"
        iters_cell = f"{min(run.last_iter for run in row)}/{planned_cell}"
        if any(run.in_progress for run in row):
            iters_cell += " (running)"
        folders = ", ".join(f"`{run.metrics_path.parent}`" for run in row)
        published = PUBLISHED.get((first.dataset, first.student, first.method))
        scale = paper_scale(first)
        paper_cell = ""
        if published is not None:
            paper_cell = f"{published:.2f}" if scale == 1.0 else f"{published * scale:.2f} ({published:.2f} x 182/171)"
        selections = sorted({run.selection(metric) for run in row} - {""})
        lines.append(
            f"| {first.dataset} | {first.student} | {first.method} | {miou_cell} | {delta_cell} | {runs_cell} | "
            f"{iters_cell} | {paper_cell} | {'; '.join(selections)} | {folders} |"
        )
    return "\n".join(lines)


def _new_figure(size: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)  # Agg, no display, no global pyplot state
    return figure


def plot_run(run: Run, path: Path, title: str) -> Path:
    """Write one run's curves: a panel for the mIoU and one per loss term, :data:`PANEL_COLUMNS` to a row.

    The curves have the colour of the run's method (:func:`method_colours`), as in the mIoU overlay.
    """
    colour = method_colours([run.method])[run.method]
    names = ["mIoU", *sorted(run.losses)]
    columns = min(PANEL_COLUMNS, len(names))
    rows = math.ceil(len(names) / columns)
    figure = _new_figure((PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, name in zip(axes, names, strict=False):
        points = [(i, 100 * v) for i, v in run.evals] if name == "mIoU" else run.losses[name]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, color=colour, marker="o" if len(points) < 30 else None, markersize=3)
        else:
            ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{name} (%)" if name == "mIoU" else name)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    for ax in axes[len(names) :]:
        ax.set_axis_off()
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path


@dataclasses.dataclass(frozen=True)
class MethodCurve:
    """The mIoU of one method's runs (seeds) against the iteration.

    Attributes:
        label: the method (or the run's label when its config is unknown).
        runs: how many runs have at least one evaluation.
        iterations: every iteration at which some run was evaluated, ascending.
        mean, low, high: mean, minimum and maximum mIoU (%) over the runs evaluated at that iteration.
    """

    label: str
    runs: int
    iterations: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]


def method_curves(runs: Sequence[Run], labels: Sequence[str]) -> list[MethodCurve]:
    """One :class:`MethodCurve` per method, in Table II order; runs of unknown config stay apart (their label)."""
    grouped: dict[str, list[Run]] = {}
    for run, label in zip(runs, labels, strict=True):
        if run.evals:
            grouped.setdefault(label if run.method == UNKNOWN else run.method, []).append(run)
    curves = []
    for key in sorted(grouped, key=lambda k: _order(k, METHOD_ORDER)):
        at: dict[int, list[float]] = {}
        for run in grouped[key]:
            for iteration, miou in run.evals:
                at.setdefault(iteration, []).append(100 * miou)
        iterations = sorted(at)
        curves.append(
            MethodCurve(
                label=key,
                runs=len(grouped[key]),
                iterations=iterations,
                mean=[sum(at[i]) / len(at[i]) for i in iterations],
                low=[min(at[i]) for i in iterations],
                high=[max(at[i]) for i in iterations],
            )
        )
    return curves


def method_colours(methods: Iterable[str]) -> dict[str, str]:
    """A fixed colour per method (Matplotlib's ``tab10``, in :data:`METHOD_ORDER`), the same in every plot."""
    palette = [f"C{k}" for k in range(10)]
    extra = [m for m in dict.fromkeys(methods) if m not in METHOD_ORDER]
    colours = {m: palette[k % len(palette)] for k, m in enumerate(METHOD_ORDER)}
    colours.update({m: palette[(len(METHOD_ORDER) + k) % len(palette)] for k, m in enumerate(extra)})
    return colours


def plot_group(runs: Sequence[Run], labels: Sequence[str], path: Path, title: str) -> Path:
    """Write the mIoU curves of one dataset and student: per method, the mean over its runs and a min-max band."""
    figure = _new_figure(OVERLAY_SIZE)
    ax = figure.subplots()
    curves = method_curves(runs, labels)
    colours = method_colours(curve.label for curve in curves)
    for curve in curves:
        colour = colours[curve.label]
        marker = "o" if len(curve.iterations) < 30 else None
        label = curve.label if curve.runs == 1 else f"{curve.label} (mean of {curve.runs} runs, band: min-max)"
        ax.plot(curve.iterations, curve.mean, color=colour, marker=marker, markersize=3, label=label)
        if curve.runs > 1:
            ax.fill_between(curve.iterations, curve.low, curve.high, color=colour, alpha=0.2, linewidth=0)
    ax.set_xlabel("iteration")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path


def write_report(
    runs: Sequence[Run], out: Path, metric: str, warn: Warnings, *, per_run: bool = False
) -> tuple[Path, str]:
    """Write ``report.md`` and the plots under ``out``; return the path of ``report.md`` and the table."""
    out.mkdir(parents=True, exist_ok=True)
    runs = sort_runs(runs)
    base = baselines(runs, metric)
    labels = unique_labels(runs)
    table = format_table(table_rows(runs, per_run), metric, base)

    figures: list[str] = []
    groups: dict[tuple[str, str], list[int]] = {}
    for index, run in enumerate(runs):
        groups.setdefault(run.group, []).append(index)
    for (dataset, student), indices in groups.items():
        if not any(runs[i].evals for i in indices):
            continue
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"miou_{dataset}_{student}") + ".png"
        try:
            plot_group([runs[i] for i in indices], [labels[i] for i in indices], out / name, f"{dataset}, {student}")
            figures.append(f"![mIoU, {dataset}, {student}]({name})")
        except Exception as exc:  # a plotting failure must not lose the table
            warn(f"mIoU plot of {dataset}/{student} failed ({type(exc).__name__}: {exc}).")
    for run, label in zip(runs, labels, strict=True):
        try:
            written = plot_run(run, out / "curves" / f"{label}.png", f"{label} ({run.metrics_path.parent})")
            figures.append(f"![{label}]({written.relative_to(out).as_posix()})")
        except Exception as exc:
            warn(f"plot of {run.metrics_path} failed ({type(exc).__name__}: {exc}).")

    other = "last" if metric == "best" else "best"
    text = [
        "# Results",
        "",
        table,
        "",
        f"mIoU: the {metric} evaluation of each run, in percent (`--metric {other}` for the {other} one), "
        "averaged over the runs of a row (several seeds; `--per-run` to list them apart). delta: mIoU points over "
        "the no-KD runs (`method: none`) of the same dataset and student, empty for the baseline and the teacher. "
        "runs: how many, with their range. iterations: done/planned (the least advanced run of the row). "
        "paper: the HWD paper's number for the row, on the row's scale: its COCO-Stuff numbers average over 182 "
        "class ids, 11 of them empty (counted 0), so for a run that averages over 171 classes (`cocostuff_classes: "
        "171`, or `miou_classes: present`) it is shown times 182/171 (see docs/reproduce.md). selection: which "
        "evaluation each run's mIoU is (the best of how many evaluations, or the last); the paper took the best of "
        "evaluations every 400 iterations.",
        "",
        "## Training curves",
        "",
        "mIoU plots: one colour per method; the line is the mean over the method's runs (seeds), the shaded band "
        "their min-max range (at each evaluation, over the runs evaluated there).",
        "",
        *[f"{figure}\n" for figure in figures],
    ]
    if warn.messages:
        text += ["## Warnings", "", *[f"- {message}" for message in warn.messages], ""]
    path = out / "report.md"
    path.write_text("\n".join(text))
    return path, table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="metrics.jsonl files, run folders, or folders to search")
    parser.add_argument("--out", required=True, help="folder for report.md and the PNG plots")
    parser.add_argument(
        "--metric",
        choices=("best", "last"),
        default="best",
        help="which evaluation gives a run's mIoU (default: best, as the HWD authors' code reported)",
    )
    parser.add_argument("--per-run", action="store_true", help="one table row per run instead of per method")
    args = parser.parse_args(argv)
    warn = Warnings()
    files = find_metrics_files(args.paths, warn)
    runs = [run for run in (load_run(path, warn) for path in files) if run is not None]
    if not runs:
        print("report.py: no runs found (no readable metrics.jsonl under the given paths).", file=sys.stderr)
        return 1
    path, table = write_report(runs, Path(args.out), args.metric, warn, per_run=args.per_run)
    print(table)
    print(f"(report written to {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
