"""Modules a newcomer reads in one sitting: over 450 lines only with a docstring line that says why."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 450


def long_modules_without_a_reason(folder: Path) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > LIMIT and f"over {LIMIT} lines" not in (ast.get_docstring(ast.parse(text)) or ""):
            found.append(f"{path.relative_to(folder.parent)} ({len(text.splitlines())} lines)")
    return found


def test_no_module_over_the_limit_without_a_reason():
    assert long_modules_without_a_reason(ROOT / "clip_ping") + long_modules_without_a_reason(ROOT / "benchmarks") == []


def test_the_check_sees_a_long_module(tmp_path):
    folder = tmp_path / "pkg"
    folder.mkdir()
    body = "x = 1\n" * LIMIT
    (folder / "long.py").write_text('"""A module."""\n' + body)
    (folder / "explained.py").write_text(f'"""A module.\n\nIt is over {LIMIT} lines because of a reason.\n"""\n' + body)
    (folder / "short.py").write_text('"""A module."""\nx = 1\n')
    assert long_modules_without_a_reason(folder) == [f"pkg/long.py ({LIMIT + 1} lines)"]
