"""docs/troubleshooting.md: the tables of bad inputs name the tests that cover them; every named test must exist, so
the table cannot rot when a test is renamed or removed."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "troubleshooting.md"
HEADER = ["bad input", "message (abridged)", "fix", "test"]
TEST_RE = re.compile(r"^`(tests/[\w/]+\.py)::(\w+)(?:\[([^\]]+)\])?`$")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split(" | ")]


def table_rows(text: str) -> list[dict[str, str]]:
    """The rows of every table of the page whose header is :data:`HEADER`."""
    rows, in_table = [], False
    for line in text.splitlines():
        if not line.startswith("|"):
            in_table = False
            continue
        cells = _cells(line)
        if cells == HEADER:
            in_table = True
        elif in_table and not set(line) <= set("|-: "):
            assert len(cells) == len(HEADER), f"row with {len(cells)} cells, not {len(HEADER)}: {line}"
            rows.append(dict(zip(HEADER, cells)))
    return rows


@cache
def _rows() -> list[dict[str, str]]:
    return table_rows(PAGE.read_text())


@cache
def _tests_in(path: str) -> tuple[set[str], set[str]]:
    """The test functions of a test file (module level and in classes) and every string constant in it (where
    explicit parametrisation ids live)."""
    tree = ast.parse((ROOT / path).read_text())
    names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test")}
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return names, strings


def test_the_table_has_enough_distinct_cases():
    rows = _rows()
    assert len(rows) >= 60, len(rows)
    inputs = [r["bad input"] for r in rows]
    dupes = sorted({i for i in inputs if inputs.count(i) > 1})
    assert not dupes, f"cases listed twice: {dupes}"
    assert all(r["message (abridged)"] for r in rows)


def test_every_named_test_exists():
    """Each row's test is ``tests/<file>.py::<test>`` or ``...::<test>[<id>]``; the file defines the test, and an id
    is one the file spells out (``pytest.param(..., id=...)`` or ``ids=[...]``)."""
    problems = []
    for row in _rows():
        m = TEST_RE.match(row["test"])
        if not m:
            problems.append(f"{row['bad input']}: test cell {row['test']!r} is not `tests/<file>.py::<test>[<id>]`")
            continue
        path, name, case = m.groups()
        if not (ROOT / path).is_file():
            problems.append(f"{row['test']}: no file {path}")
            continue
        names, strings = _tests_in(path)
        if name not in names:
            problems.append(f"{row['test']}: {path} has no test {name!r}")
        elif case is not None and case not in strings:
            problems.append(f"{row['test']}: {path} spells out no case id {case!r}")
    assert not problems, "\n".join(problems)


def test_parser_rejects_a_renamed_test(tmp_path):
    """The check can fail: a row naming a test that does not exist is reported."""
    text = "| " + " | ".join(HEADER) + " |\n|---|---|---|---|\n| x | `m` | f | `tests/test_errors_table.py::test_gone` |\n"
    (row,) = table_rows(text)
    path, name, _ = TEST_RE.match(row["test"]).groups()
    assert name not in _tests_in(path)[0]


@pytest.mark.slow
def test_every_named_test_is_collected_by_pytest():
    """The same, through pytest's own collection (imports every test module named; slow)."""
    wanted = {}
    for row in _rows():
        path, name, case = TEST_RE.match(row["test"]).groups()
        wanted.setdefault(path, set()).add((name, case))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "", "-p", "no:cacheprovider", *sorted(wanted)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    ).stdout
    collected = {line.strip() for line in out.splitlines() if "::" in line}
    missing = []
    for path, items in wanted.items():
        for name, case in items:
            node = f"{path}::{name}" + (f"[{case}]" if case else "")
            if not any(c == node or (case is None and c.startswith(node + "[")) for c in collected):
                missing.append(node)
    assert not missing, missing
