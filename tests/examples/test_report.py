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
