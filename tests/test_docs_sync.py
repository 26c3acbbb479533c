"""Docs stay in sync with the code: docs/api.md lists every public name, and relative Markdown links resolve."""

from __future__ import annotations

import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = DOCS / "api.md"

#: Modules whose ``__all__`` docs/api.md must list, each under a heading naming the module in backticks.
API_MODULES = (
    "segkd",
    "segkd.functional",
    "segkd.ops",
    "segkd.testing",
    "segkd.testing.checks",
    "segkd.testing.reference",
    "segkd.testing.strategies",
)

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
LISTED_NAME = re.compile(r"^- \[`([^`]+)`\]\(", re.MULTILINE)
HEADING = re.compile(r"^#{2,3} `([A-Za-z0-9_.]+)`\s*$", re.MULTILINE)


def api_sections() -> dict[str, set[str]]:
    """Module name -> the names listed (``- [`name`](page)``) under its heading in docs/api.md."""
    text = API.read_text()
    headings = list(HEADING.finditer(text))
    sections: dict[str, set[str]] = {}
    for i, heading in enumerate(headings):
        end = headings[i + 1].start() if i + 1 < len(headings) else len(text)
        sections[heading.group(1)] = set(LISTED_NAME.findall(text, heading.end(), end))
    return sections


@pytest.mark.parametrize("module_name", API_MODULES)
def test_api_md_lists_exactly_the_public_names(module_name: str) -> None:
    module = importlib.import_module(module_name)
    sections = api_sections()
    assert module_name in sections, f"docs/api.md has no section headed `{module_name}`"
    public = set(module.__all__)
    listed = sections[module_name]
    assert not public - listed, f"docs/api.md does not list {sorted(public - listed)} of {module_name}"
    assert not listed - public, f"docs/api.md lists {sorted(listed - public)}, not in {module_name}.__all__"


def test_link_pattern_finds_links_and_skips_code() -> None:
    sample = 'See [a](x.md), ![img](img/p.png "title") and `[no](skip.md)`.\n```\n[no](fenced.md)\n```\n'
    text = INLINE_CODE.sub("", FENCE.sub("", sample))
    assert LINK.findall(text) == ["x.md", "img/p.png"]


def markdown_files() -> list[Path]:
    return sorted([*DOCS.glob("*.md"), *DOCS.glob("losses/*.md"), *DOCS.glob("design/*.md"), ROOT / "README.md"])


def relative_links(path: Path) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text()))
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s)://, mailto:, or an anchor on the same page
        targets.append(target)
    return targets


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(path: Path) -> None:
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
    broken = []
    for target in relative_links(path):
        file_part = target.split("#", 1)[0].split("?", 1)[0]
        if file_part and not (path.parent / file_part).exists():
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)} links to missing files: {broken}"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.DOTALL | re.MULTILINE)


def test_hwd_page_examples_print_what_they_say(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = python_blocks(DOCS / "hwd.md")
    assert blocks
    namespace: dict[str, object] = {"__name__": "docs_hwd"}
    for block in blocks:
        exec(compile(block, str(DOCS / "hwd.md"), "exec"), namespace)
    output = capsys.readouterr().out.splitlines()
    expected = re.findall(r"print\(.*\)\s+# (.+)$", "\n".join(blocks), flags=re.MULTILINE)
    assert expected
    assert [line.strip() for line in output] == [e.strip() for e in expected]


def train_commands(path: Path) -> list[list[str]]:
    """The arguments after ``examples/train_ddp.py`` of every command line in the page's bash blocks."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", path.read_text(), flags=re.DOTALL | re.MULTILINE):
        for line in block.splitlines():
            if "examples/train_ddp.py" not in line or "${" in line:  # loop bodies use shell variables
                continue
            args = shlex.split(line.split("examples/train_ddp.py", 1)[1], comments=True)
            commands.append([arg.replace("$DATA", "/data").replace("$CKPT", "/ckpt") for arg in args])
    return commands


def test_reproduce_commands_parse_and_match_their_configs() -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        train_ddp = importlib.import_module("train_ddp")
    finally:
        sys.path.remove(str(ROOT / "examples"))
    commands = train_commands(DOCS / "reproduce.md")
    configs = sorted(p.name for p in (ROOT / "examples" / "configs").glob("*.yaml") if "synthetic" not in p.name)
    used = sorted(Path(args[args.index("--config") + 1]).name for args in commands)
    assert used == configs, "docs/reproduce.md must have one command per real-dataset config"
    for args in commands:
        cfg = train_ddp.resolve_config(train_ddp.build_parser().parse_args(args))
        name = Path(args[args.index("--config") + 1]).stem
        dataset, rest = name.split("_", 1)
        assert cfg.dataset == dataset, name
        assert cfg.data_root is not None, name
        assert cfg.student_pretrained is not None, name
        if cfg.train_teacher:
            assert rest == f"{cfg.teacher}_teacher", name
            assert cfg.student_pretrained.endswith("resnet101-imagenet.pth"), name
        else:
            recipe = "_paper" if cfg.kd.get("recipe") == "paper" else ""  # *_mgd_paper.yaml: MGD's own recipe
            assert rest == f"{cfg.student}_{cfg.method}{recipe}", name
            backbone = "mobilenetv2" if "mbv2" in cfg.student else "resnet18"
            assert cfg.student_pretrained.endswith(f"{backbone}-imagenet.pth"), name
            assert (cfg.teacher_ckpt is None) == (cfg.method == "none"), name
            if cfg.teacher_ckpt is not None and cfg.dataset != "cityscapes":
                assert cfg.teacher_ckpt == f"runs/{cfg.dataset}/teacher_deeplabv3_r101/best.pt", name


def test_published_numbers_agree_with_report_py() -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        report = importlib.import_module("report")
    finally:
        sys.path.remove(str(ROOT / "examples"))
    table_row = re.compile(r"^\| [^|]+ \| [^|]+ \| \[(\w+)\.yaml\]\([^)]*\) \|[^|]*\|[^|]*\| ([^|]+) \|", re.MULTILINE)
    found = {}
    for name, published in table_row.findall((DOCS / "reproduce.md").read_text()):
        dataset, rest = name.split("_", 1)
        student, method = rest.rsplit("_", 1)
        found[(dataset, student, method)] = published.strip()
    assert len(found) == 72  # 3 datasets x 3 students x 8 methods
    for key, cell in found.items():
        expected = report.PUBLISHED.get(key)
        assert cell == (f"{expected:.2f}" if expected is not None else "not in paper"), key
