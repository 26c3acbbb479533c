"""examples/report.py on fabricated run folders: the Table II-shaped Markdown table and the PNG curves."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
if str(EXAMPLES) not in sys.path:  # tests/examples/conftest.py does this too
    sys.path.insert(0, str(EXAMPLES))

import report  # noqa: E402

PANEL_PX = (400, 300)  # one curve panel, in pixels (4 x 3 inches at 100 dpi)
OVERLAY_PX = (800, 500)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header (signature, then the IHDR chunk)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def expected_curve_px(loss_terms: int) -> tuple[int, int]:
    panels = 1 + loss_terms  # mIoU, then one per loss term
    columns = min(3, panels)
    return PANEL_PX[0] * columns, PANEL_PX[1] * math.ceil(panels / columns)


def write_run(
    folder: Path,
    config: str | None,
    evals: list[float],
    *,
    terms: tuple[str, ...] = ("ce", "aux", "loss"),
    step: int = 100,
    tail: str = "",
) -> None:
    folder.mkdir(parents=True)
    if config is not None:
        (folder / "config.yaml").write_text(config)
    lines = []
    for k, miou in enumerate(evals, start=1):
        train = {"kind": "train", "iter": k * step, "lr": 0.01, "images_per_s": 12.5}
        train.update({term: 1.0 / (k + i) for i, term in enumerate(terms)})
        lines.append(json.dumps(train))
        lines.append(json.dumps({"kind": "eval", "iter": k * step, "miou": miou, "iou": [miou, miou]}))
    (folder / "metrics.jsonl").write_text("".join(f"{line}\n" for line in lines) + tail)


def cfg(dataset: str, student: str, method: str, max_iters: int = 300) -> str:
    return (
        f"dataset: {dataset}\nstudent: {student}\nteacher: deeplabv3_r101\nmethod: {method}\nmax_iters: {max_iters}\n"
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fabricated") / "runs"
    write_run(root / "citys_none", cfg("cityscapes", "deeplabv3_r18", "none"), [0.70, 0.72, 0.71])
    # killed while writing its last line: the partial record must be skipped
    write_run(
        root / "citys_hwd",
        cfg("cityscapes", "deeplabv3_r18", "hwd"),
        [0.73, 0.7472, 0.745],
        terms=("ce", "aux", "kd_hwd", "loss"),
        tail='{"kind": "eval", "iter": 4',
    )
    # still running, no evaluation yet
    (root / "citys_cwd").mkdir(parents=True)
    (root / "citys_cwd" / "config.yaml").write_text(cfg("cityscapes", "deeplabv3_r18", "cwd", 40000))
    (root / "citys_cwd" / "metrics.jsonl").write_text(
        json.dumps({"kind": "train", "iter": 50, "ce": 2.0, "kd_cwd": 0.5, "loss": 2.5}) + "\n"
    )
    write_run(root / "ade_mbv2_none", cfg("ade20k", "deeplabv3_mbv2", "none"), [0.2716], terms=("ce", "loss"))
    write_run(root / "ade_mbv2_hwd", cfg("ade20k", "deeplabv3_mbv2", "hwd"), [0.3107], terms=("ce", "kd_hwd", "loss"))
    write_run(root / "ade_psp_dist", cfg("ade20k", "pspnet_r18", "dist"), [0.3234], terms=("ce", "kd_dist", "loss"))
    write_run(
        root / "ade_teacher",
        "dataset: ade20k\nteacher: deeplabv3_r101\nstudent: deeplabv3_r18\ntrain_teacher: true\nmethod: none\n"
        "max_iters: 300\n",
        [0.4246],
    )
    write_run(root / "no_config", None, [0.5])
    return root


@pytest.fixture(scope="module")
def full_report(runs: Path) -> Path:
    """The report of every fabricated run, written once for the tests that only read it."""
    out = runs.parent / "out"
    assert report.main([str(runs), "--out", str(out)]) == 0
    return out


def table_rows(markdown: str) -> dict[tuple[str, str, str], list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| dataset")]
    rows = {}
    for line in lines:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[(cells[0], cells[1], cells[2])] = cells[3:]
    return rows


def test_table_rows_and_deltas(full_report: Path) -> None:
    rows = table_rows((full_report / "report.md").read_text())
    assert set(rows) == {
        ("cityscapes", "deeplabv3_r18", "none"),
        ("cityscapes", "deeplabv3_r18", "hwd"),
        ("cityscapes", "deeplabv3_r18", "cwd"),
        ("ade20k", "deeplabv3_mbv2", "none"),
        ("ade20k", "deeplabv3_mbv2", "hwd"),
        ("ade20k", "pspnet_r18", "dist"),
        ("ade20k", "deeplabv3_r101", "teacher"),
        ("unknown", "unknown", "unknown"),
    }
    # default metric: the best evaluation; delta over the best of the baseline
    assert rows[("cityscapes", "deeplabv3_r18", "none")][:2] == ["72.00", ""]
    assert rows[("cityscapes", "deeplabv3_r18", "hwd")][:2] == ["74.72", f"{100 * (0.7472 - 0.72):+.2f}"]
    assert rows[("cityscapes", "deeplabv3_r18", "hwd")][1] == "+2.72"
    assert rows[("ade20k", "deeplabv3_mbv2", "hwd")][:2] == ["31.07", "+3.91"]
    assert rows[("ade20k", "pspnet_r18", "dist")][:2] == ["32.34", "no baseline"]
    assert rows[("ade20k", "deeplabv3_r101", "teacher")][:2] == ["42.46", ""]
    # the paper's number for the row, where the paper has one
    assert rows[("cityscapes", "deeplabv3_r18", "hwd")][4] == "74.72"
    assert rows[("ade20k", "deeplabv3_mbv2", "none")][4] == "27.16"
    assert rows[("ade20k", "deeplabv3_r101", "teacher")][4] == "42.46"
    assert rows[("unknown", "unknown", "unknown")][4] == ""
    # in progress, no evaluation yet: empty mIoU, marked running
    cwd = rows[("cityscapes", "deeplabv3_r18", "cwd")]
    assert cwd[:4] == ["", "", "1", "50/40000 (running)"]
    assert rows[("cityscapes", "deeplabv3_r18", "hwd")][2:4] == ["1", "300/300"]


def test_rows_follow_table_ii_order(full_report: Path) -> None:
    keys = list(table_rows((full_report / "report.md").read_text()))
    cityscapes = [k[2] for k in keys if k[0] == "cityscapes"]
    assert cityscapes == ["none", "cwd", "hwd"]
    assert keys.index(("cityscapes", "deeplabv3_r18", "none")) < keys.index(("ade20k", "deeplabv3_r101", "teacher"))
    assert keys.index(("ade20k", "deeplabv3_r101", "teacher")) < keys.index(("ade20k", "deeplabv3_mbv2", "none"))


def test_last_metric(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert report.main([str(runs / "citys_none"), str(runs / "citys_hwd"), "--metric", "last", "--out", str(out)]) == 0
    rows = table_rows((out / "report.md").read_text())
    assert rows[("cityscapes", "deeplabv3_r18", "none")][0] == "71.00"
    assert rows[("cityscapes", "deeplabv3_r18", "hwd")][:2] == ["74.50", "+3.50"]


def test_seeds_of_a_row_are_averaged(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for seed, (base, hwd) in enumerate([(0.70, 0.74), (0.72, 0.75)]):
        write_run(root / f"none_seed{seed}", cfg("ade20k", "pspnet_r18", "none"), [base])
        write_run(root / f"hwd_seed{seed}", cfg("ade20k", "pspnet_r18", "hwd"), [0.5, hwd])
    out = tmp_path / "out"
    assert report.main([str(root), "--out", str(out)]) == 0
    rows = table_rows((out / "report.md").read_text())
    assert rows[("ade20k", "pspnet_r18", "none")][:3] == ["71.00", "", "2 (70.00-72.00)"]
    assert rows[("ade20k", "pspnet_r18", "hwd")][:3] == [
        "74.50",
        f"{100 * ((0.74 + 0.75) / 2 - 0.71):+.2f}",
        "2 (74.00-75.00)",
    ]
    assert rows[("ade20k", "pspnet_r18", "hwd")][1] == "+3.50"
    # one curve file per run, repeats numbered
    assert (out / "curves" / "ade20k_pspnet_r18_hwd.png").is_file()
    assert (out / "curves" / "ade20k_pspnet_r18_hwd_2.png").is_file()

    per_run = tmp_path / "per_run"
    assert report.main([str(root), "--out", str(per_run), "--per-run"]) == 0
    lines = [line for line in (per_run / "report.md").read_text().splitlines() if line.startswith("| ade20k |")]
    assert len(lines) == 4
    assert sum("| 74.00 | +3.00 | 1 |" in line for line in lines) == 1  # each against the mean baseline


def test_pngs_have_the_expected_size(full_report: Path) -> None:
    out = full_report
    expected = {
        "curves/cityscapes_deeplabv3_r18_none.png": expected_curve_px(3),  # ce, aux, loss
        "curves/cityscapes_deeplabv3_r18_hwd.png": expected_curve_px(4),  # + kd_hwd
        "curves/cityscapes_deeplabv3_r18_cwd.png": expected_curve_px(3),  # ce, kd_cwd, loss
        "curves/ade20k_deeplabv3_mbv2_none.png": expected_curve_px(2),
        "miou_cityscapes_deeplabv3_r18.png": OVERLAY_PX,
        "miou_ade20k_deeplabv3_mbv2.png": OVERLAY_PX,
    }
    assert expected_curve_px(4) == (1200, 600)
    assert expected_curve_px(2) == (1200, 300)
    for name, size in expected.items():
        path = out / name
        assert path.stat().st_size > 1000, name
        assert png_size(path) == size, name
    text = (out / "report.md").read_text()
    assert "](curves/cityscapes_deeplabv3_r18_hwd.png)" in text
    assert "](miou_cityscapes_deeplabv3_r18.png)" in text


def test_bad_files_are_skipped_with_warnings(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_run(root / "good", cfg("ade20k", "deeplabv3_r18", "none"), [0.3])
    (root / "binary").mkdir()
    (root / "binary" / "metrics.jsonl").write_bytes(b'\x00\xff\xfe garbage\n[1, 2]\n{"iter": "x"}\n')
    (root / "binary" / "config.yaml").write_text("dataset: [unclosed\n")
    (root / "empty").mkdir()
    (root / "empty" / "metrics.jsonl").write_text("")
    (root / "empty" / "config.yaml").write_text(cfg("ade20k", "deeplabv3_r18", "hwd"))
    (root / "nulls").mkdir()
    (root / "nulls" / "config.yaml").write_text(cfg("ade20k", "deeplabv3_r18", "cwd"))
    (root / "nulls" / "metrics.jsonl").write_text(
        '{"kind": "train", "iter": 10, "ce": null, "loss": "inf"}\n{"kind": "eval", "iter": 10, "miou": null}\n'
    )
    out = tmp_path / "out"
    assert report.main([str(root), str(tmp_path / "missing"), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    warnings = text.split("## Warnings", 1)[1]
    assert "missing does not exist" in warnings
    assert "is not JSON" in warnings
    assert "not a JSON object" in warnings
    assert "no numeric `iter`" in warnings
    assert "config.yaml: cannot be read" in warnings
    assert "no numeric `miou`" in warnings
    rows = table_rows(text)
    assert rows[("ade20k", "deeplabv3_r18", "none")][0] == "30.00"
    assert rows[("ade20k", "deeplabv3_r18", "hwd")][:4] == ["", "", "1", "0/300 (running)"]
    assert png_size(out / "curves" / "ade20k_deeplabv3_r18_cwd.png") == expected_curve_px(0)


def test_command_line(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    done = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "report.py"),
            str(runs / "citys_none"),
            str(runs / "citys_hwd"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "last line is not JSON" in done.stderr
    assert "| cityscapes | deeplabv3_r18 | hwd | 74.72 | +2.72 | 1 |" in done.stdout
    assert (out / "report.md").is_file()

    nothing = subprocess.run(
        [sys.executable, str(EXAMPLES / "report.py"), str(tmp_path / "nowhere"), "--out", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert nothing.returncode == 1
    assert "no runs found" in nothing.stderr
    assert "Traceback" not in nothing.stderr


def _drawn_overlay(monkeypatch: pytest.MonkeyPatch, runs: list[report.Run], tmp_path: Path):
    """The axis that plot_group draws on (the figure is captured when it is created)."""
    figures = []
    original = report._new_figure

    def capture(size):
        figure = original(size)
        figures.append(figure)
        return figure

    monkeypatch.setattr(report, "_new_figure", capture)
    report.plot_group(runs, report.unique_labels(runs), tmp_path / "overlay.png", "title")
    (figure,) = figures
    (ax,) = figure.axes
    return ax


def _run(method: str, evals: list[tuple[int, float]], dataset: str = "synthetic") -> report.Run:
    return report.Run(Path(f"/runs/{method}/metrics.jsonl"), dataset, "tiny_student", method, 300, evals)


def test_method_curves_are_the_mean_and_range_of_the_seeds() -> None:
    runs = [
        _run("none", [(100, 0.40), (200, 0.50)]),
        _run("hwd", [(100, 0.42), (200, 0.56)]),
        _run("hwd", [(100, 0.46), (200, 0.50)]),
        _run("hwd", [(100, 0.44)]),  # still running: counted where it has an evaluation
        _run("cwd", []),  # no evaluation yet: no curve
    ]
    curves = report.method_curves(runs, report.unique_labels(runs))
    assert [(c.label, c.runs, c.iterations) for c in curves] == [("none", 1, [100, 200]), ("hwd", 3, [100, 200])]
    hwd = curves[1]
    assert hwd.mean == pytest.approx([44.0, 53.0])
    assert hwd.low == pytest.approx([42.0, 50.0])
    assert hwd.high == pytest.approx([46.0, 56.0])


def test_overlay_shows_one_colour_per_method_with_a_band_over_seeds(monkeypatch, tmp_path: Path) -> None:
    runs = [
        _run("none", [(100, 0.40), (200, 0.50)]),
        _run("none", [(100, 0.44), (200, 0.52)]),
        _run("hwd", [(100, 0.42), (200, 0.56)]),
        _run("hwd", [(100, 0.46), (200, 0.50)]),
        _run("hwd", [(100, 0.44), (200, 0.53)]),
        _run("cwd", [(100, 0.41), (200, 0.51)]),
    ]
    ax = _drawn_overlay(monkeypatch, runs, tmp_path)
    lines = ax.get_lines()
    labels = [line.get_label() for line in lines]
    assert labels == [
        "none (mean of 2 runs, band: min-max)",
        "cwd",
        "hwd (mean of 3 runs, band: min-max)",
    ]
    colours = report.method_colours(["none", "cwd", "hwd"])
    assert [line.get_color() for line in lines] == [colours["none"], colours["cwd"], colours["hwd"]]
    assert len(set(colours[m] for m in ("none", "cwd", "hwd"))) == 3
    assert list(lines[2].get_ydata()) == pytest.approx([44.0, 53.0])
    bands = ax.collections  # fill_between: one band per method with several runs
    assert len(bands) == 2
    hwd_band = bands[1].get_paths()[0].vertices[:, 1]
    assert min(hwd_band) == pytest.approx(42.0)
    assert max(hwd_band) == pytest.approx(56.0)
    assert [legend.get_text() for legend in ax.get_legend().get_texts()] == labels


def test_method_colours_are_fixed_and_shared_by_the_per_run_curves(monkeypatch, tmp_path: Path) -> None:
    colours = report.method_colours(["none", "mystery", "hwd"])
    assert colours["hwd"] == report.method_colours(["hwd"])["hwd"]  # the same in every plot
    assert colours["mystery"] not in {colours[m] for m in report.METHOD_ORDER}
    figures = []
    original = report._new_figure
    monkeypatch.setattr(report, "_new_figure", lambda size: figures.append(original(size)) or figures[-1])
    report.plot_run(_run("hwd", [(100, 0.5), (200, 0.6)]), tmp_path / "run.png", "hwd")
    assert figures[0].axes[0].get_lines()[0].get_color() == report.method_colours(["hwd"])["hwd"]


def test_selection_and_cocostuff_paper_scale(tmp_path: Path) -> None:
    # Two COCO-Stuff runs of the same row, one per protocol: separate evaluations, the paper's 26.05 on each scale.
    root = tmp_path / "runs"
    base = "dataset: cocostuff\nstudent: deeplabv3_r18\nteacher: deeplabv3_r101\nmethod: none\nmax_iters: 300\n"
    write_run(root / "c182", base + "num_classes: 182\nmiou_classes: all\neval_every: 100\n", [0.25, 0.26, 0.255])
    write_run(root / "c171", base + "num_classes: 171\nmiou_classes: present\neval_every: 100\n", [0.27, 0.28])
    for folder, expected in (("c182", "26.05"), ("c171", f"{26.05 * 182 / 171:.2f} (26.05 x 182/171)")):
        out = tmp_path / f"out_{folder}"
        assert report.main([str(root / folder), "--out", str(out)]) == 0
        cells = table_rows((out / "report.md").read_text())[("cocostuff", "deeplabv3_r18", "none")]
        assert cells[4] == expected
        assert cells[5] == f"best of {3 if folder == 'c182' else 2} (every 100)"
    out = tmp_path / "out_last"
    assert report.main([str(root / "c182"), "--out", str(out), "--metric", "last"]) == 0
    cells = table_rows((out / "report.md").read_text())[("cocostuff", "deeplabv3_r18", "none")]
    assert cells[0] == "25.50"
    assert cells[5] == "last (iter 300)"


def test_mgd_paper_recipe_gets_its_own_row(tmp_path: Path) -> None:
    # *_mgd_paper.yaml configs (kd.recipe: paper) are not Table II's MGD: own row, no paper number to compare with.
    root = tmp_path / "runs"
    write_run(root / "mgd", cfg("cityscapes", "deeplabv3_r18", "mgd") + "kd:\n  alpha: 2.0e-05\n", [0.70])
    write_run(root / "mgd_paper", cfg("cityscapes", "deeplabv3_r18", "mgd") + "kd:\n  recipe: paper\n", [0.71])
    out = tmp_path / "out"
    assert report.main([str(root), "--out", str(out)]) == 0
    rows = table_rows((out / "report.md").read_text())
    assert rows[("cityscapes", "deeplabv3_r18", "mgd")][0] == "70.00"
    assert rows[("cityscapes", "deeplabv3_r18", "mgd")][4] == "71.79"
    assert rows[("cityscapes", "deeplabv3_r18", "mgd_paper")][0] == "71.00"
    assert rows[("cityscapes", "deeplabv3_r18", "mgd_paper")][4] == ""
