"""The Python examples of the core docs pages run, and the test functions they define pass."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = [
    "../README.md",
    "index.md",
    "testing.md",
    "losses/hwd.md",
    "losses/cwd.md",
    "losses/dist.md",
    "losses/skd.md",
    "losses/ifvd.md",
    "losses/mgd.md",
    "losses/cirkd.md",
]


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.DOTALL | re.MULTILINE)


@pytest.mark.parametrize("page", PAGES)
def test_examples_run(page: str, capsys: pytest.CaptureFixture[str]) -> None:
    blocks = _python_blocks(DOCS / page)
    assert blocks, f"{page} has no python example"
    namespace: dict[str, object] = {"__name__": f"docs_{Path(page).stem}"}
    for block in blocks:  # blocks of a page share one namespace, as in a reader's session
        exec(compile(block, str(DOCS / page), "exec"), namespace)
    tests = [value for name, value in namespace.items() if name.startswith("test_") and callable(value)]
    for test in tests:
        test()
    output = capsys.readouterr().out
    # Printed values stated in the page's comments are the real ones.
    for expected in re.findall(r"print\(.*\)\s+# (.+)$", "\n".join(blocks), flags=re.MULTILINE):
        assert expected.strip() in output, f"{page}: expected {expected!r} in the printed output {output!r}"


def test_index_training_step_trains_a_student() -> None:
    """The ten-line example of docs/index.md runs a real step: the student's weights move, the teacher's do not."""
    namespace: dict[str, object] = {"__name__": "docs_index"}
    for block in _python_blocks(DOCS / "index.md"):
        exec(compile(block, str(DOCS / "index.md"), "exec"), namespace)
    training_step = namespace["training_step"]
    assert callable(training_step)
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    student = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1)
    teacher = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1)
    images, labels = torch.randn(2, 3, 16, 16), torch.randint(0, 5, (2, 16, 16))
    labels[0, 0, 0] = 255
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    before_student = student.weight.detach().clone()
    before_teacher = teacher.weight.detach().clone()
    training_step(student, teacher, images, labels, optimizer)
    assert not torch.equal(student.weight, before_student)
    assert torch.equal(teacher.weight, before_teacher)
    assert teacher.weight.grad is None
