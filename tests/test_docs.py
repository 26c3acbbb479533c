"""The Python examples of the core docs pages run, and the test functions they define pass."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = ["losses/hwd.md", "losses/cwd.md", "testing.md"]


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
