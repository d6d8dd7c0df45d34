"""The shape rules of docs/architecture.md, checked on the source: modules a maintainer can read in one sitting,
functions that fit on a screen (or say why not), and no pointers to files outside the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "trl_upo"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
#: A function longer than MAX_FUNCTION_LINES says why in one docstring line that starts with this word.
REASON = "Length:"

MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_module_is_at_most_500_lines(path):
    lines = path.read_text().count("\n")
    assert lines <= MAX_MODULE_LINES, f"{_rel(path)} has {lines} lines (at most {MAX_MODULE_LINES}): split it."


def long_functions(source: str) -> list[tuple[str, int]]:
    """``(qualified name, lines)`` of every function over MAX_FUNCTION_LINES whose docstring gives no reason."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    length = child.end_lineno - child.lineno + 1
                    doc = ast.get_docstring(child) or ""
                    reasoned = any(line.strip().startswith(REASON) for line in doc.splitlines())
                    if length > MAX_FUNCTION_LINES and not reasoned:
                        found.append((name, length))
                visit(child, name + ".")

    visit(ast.parse(source), "")
    return found


def test_long_function_detection_on_a_sample():
    """The checker itself: 81 lines without a reason is reported, with a ``Length:`` line it is not."""
    body = "".join("    x = 1\n" for _ in range(78))
    plain = f'def f():\n    """Doc."""\n{body}'
    reasoned = f'def f():\n    """Doc.\n\n    Length: one table, read top to bottom.\n    """\n{body}'
    assert long_functions(plain) == []  # exactly 80 lines
    assert long_functions(plain + "    y = 2\n") == [("f", 81)]
    assert long_functions(reasoned + "    y = 2\n") == []


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_functions_fit_on_a_screen_or_say_why(path):
    found = long_functions(path.read_text())
    assert not found, (
        f"{_rel(path)}: functions over {MAX_FUNCTION_LINES} lines without a '{REASON} ...' line in their docstring: "
        f"{found}"
    )


def test_no_reference_to_files_outside_the_repository():
    pattern = re.compile(r"shared/|UPO_SPEC|TRL_NOTES|STYLE\.md")
    places = [
        f"{_rel(p)}:{i}"
        for base in ("trl_upo", "tests", "docs", "benchmarks", "examples", "scripts")
        for p in sorted((ROOT / base).rglob("*"))
        if p.suffix in (".py", ".md", ".yaml") and p.name != Path(__file__).name
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not places, f"references to files that are not in the repository: {places}"


#: The layers of docs/architecture.md, top to bottom: a module imports only from its own layer or the ones above.
LAYERS = [
    {"formats", "fingerprints", "models", "resources", "compat", "atomic", "checkpoints", "lazy", "watchdog"},
    {"objective"},
    {"heads"},
    {"scoring", "config", "layout", "collator", "step", "state", "card", "data", "evaluation"},
    {"core"},
    {"trainer", "kto"},
    {"cli", "quickstart", "quickstart_task", "integrations", "iterate"},
]


def _unit_imports(path: Path) -> set[str]:
    """The top-level units of trl_upo (``heads``, ``scoring``, ...) that the module at ``path`` imports; the
    package root itself (``from trl_upo import __version__``) is not a unit."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1])
    units = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
            names = [module] if node.module else [f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "trl_upo" and len(parts) > 1 and not parts[1].startswith("__"):
                units.add(parts[1])
    return units


def _layer(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


@pytest.mark.parametrize("path", [p for p in MODULES if p.parent != PACKAGE or p.name != "__init__.py"], ids=_rel)
def test_imports_follow_the_layers(path):
    unit = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    assert any(unit in layer for layer in LAYERS), f"{unit} is in no layer of docs/architecture.md: add it there"
    upward = sorted(u for u in _unit_imports(path) if u in set().union(*LAYERS) and _layer(u) > _layer(unit))
    assert not upward, f"{_rel(path)} ({unit}) imports {upward} from a lower layer of docs/architecture.md"


def _architecture_tested_table() -> list[tuple[str, str]]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Where each module is tested", 1)[1].split("\n## ", 1)[0]
    return [(cells[0], cells[1]) for line in section.splitlines()
            if line.startswith("| `") and len(cells := [c.strip() for c in line.strip("|").split("|")]) == 2]


def test_every_module_is_named_on_the_architecture_page_and_in_its_tests_table():
    """docs/architecture.md names every module of trl_upo/ and says where it is tested; the test files it names
    exist (a renamed test file or a new module without a row fails here)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = _architecture_tested_table()
    covered = [m.strip("` ") for modules, _ in rows for m in modules.split(",")]
    missing_text, missing_row = [], []
    for path in MODULES:
        rel = path.relative_to(PACKAGE).as_posix()
        if path.name != "__init__.py" and path.name not in text:
            missing_text.append(rel)
        package = rel.split("/")[0] + "/*"
        if rel != "__init__.py" and rel not in covered and package not in covered:
            missing_row.append(rel)
    assert not missing_text, f"modules docs/architecture.md does not name: {missing_text}"
    assert not missing_row, f"modules without a row in the architecture page's tests table: {missing_row}"
    named = {t for _, tests in rows for t in re.findall(r"`(test_\w+\.py)`", tests)}
    assert named and all((ROOT / "tests" / t).exists() for t in named), sorted(
        t for t in named if not (ROOT / "tests" / t).exists())
