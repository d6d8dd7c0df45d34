"""Import the object a dotted path names (``package.module:Name`` or ``package.module.Name``), for a recipe's
``type:`` (a head class) and a ``function`` head's ``function:``.

What a recipe can execute (docs/trust.md): the module a dotted path names runs when it is imported. Two rules keep
that explicit:

- Before the import, the module's source is read, not run (:func:`static_problem`): a path whose attribute the module
  does not define, or a ``type:`` that names a function instead of a class, is refused without running the module.
- A module in the current directory is imported only when no installed module has that name, with a warning that
  names the file. The current directory goes at the *end* of ``sys.path`` then, so it never shadows an installed
  package (the ``trl-upo`` command itself never puts it first: a ``yaml.py`` there is not imported).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("trl_upo")


def split_dotted(path: str) -> tuple[str, str]:
    """``(module, attribute)`` of ``"pkg.mod:Name"`` or ``"pkg.mod.Name"``.

    Raises:
        ValueError: not a dotted path of Python identifiers.
    """
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    parts = [*module_name.split("."), *attr.split(".")]
    if not module_name or not attr or not all(p.isidentifier() for p in parts):
        raise ValueError(f"{path!r} is not a dotted path; use 'package.module:Name' or 'package.module.Name'.")
    return module_name, attr


def _local_module(module_name: str) -> Path | None:
    """The file of top-level module ``module_name``'s package or module in the current directory, if any."""
    top = module_name.split(".")[0]
    for candidate in (Path.cwd() / f"{top}.py", Path.cwd() / top / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _source_of(module_name: str) -> str | None:
    """The source text of ``module_name`` without running it (None when it cannot be read that way: a compiled or
    namespace module, or a submodule whose parent package is not imported yet)."""
    try:
        if "." in module_name and module_name.rpartition(".")[0] not in sys.modules:
            return None  # finding a submodule would run its parent package
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        spec = None
    origin = getattr(spec, "origin", None)
    if spec is None and "." not in module_name:
        origin = str(_local_module(module_name) or "") or None
    if not origin or not origin.endswith(".py"):
        return None
    try:
        return Path(origin).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _top_level_bindings(tree: ast.Module) -> dict[str, ast.AST] | None:
    """Names bound at a module's top level (into ``if``/``try``/``with`` blocks), or None when names may come from
    elsewhere (``from x import *``, a module ``__getattr__``, writes to ``globals()``)."""
    out: dict[str, ast.AST] = {}
    todo = list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":
                    return None
                out[(alias.asname or alias.name).split(".")[0]] = node
        elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
            todo += [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", [])]
            for handler in getattr(node, "handlers", []):
                todo += handler.body
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else ():
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                out.setdefault(sub.id, node)
    if "__getattr__" in out:
        return None
    return out


def static_problem(path: str, expect: str = "any") -> str | None:
    """What is wrong with ``path`` that its module's source shows without running it, or None.

    Args:
        path: The dotted path.
        expect: ``"class"`` (a head ``type:``: a function definition is refused) or ``"any"``.

    Returns:
        The problem, or None (also when the source cannot be read: the import then decides).
    """
    module_name, attr = split_dotted(path)
    source = _source_of(module_name)
    if source is None or "globals()" in source:
        return None
    try:
        bindings = _top_level_bindings(ast.parse(source))
    except SyntaxError:
        return None
    first = attr.split(".")[0]
    if bindings is None:
        return None
    if first not in bindings:
        return f"Module {module_name!r} has no attribute {attr!r} (from {path!r}; read without importing it)."
    if expect == "class" and "." not in attr and isinstance(bindings[first], (ast.FunctionDef, ast.AsyncFunctionDef)):
        return (f"{path!r} is a function, not a RewardHead subclass (read without importing it). For a plain "
                f"reward function use type 'function' with params {{'function': {path!r}}}.")
    return None


def import_module_explicit(module_name: str) -> Any:
    """Import ``module_name``; a module found only in the current directory is imported from there with a warning
    naming the file (the current directory is appended to ``sys.path``, never put first)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        local = _local_module(module_name)
        if e.name != module_name.split(".")[0] or local is None:
            raise
        logger.warning("importing %r from the current directory (%s): a recipe names it; see docs/trust.md",
                       module_name, local)
        cwd = os.getcwd()
        if cwd not in sys.path:
            sys.path.append(cwd)
        return importlib.import_module(module_name)


def import_dotted(path: str, expect: str = "any") -> Any:
    """The object at ``"package.module:name"`` or ``"package.module.name"`` (attributes may be nested).

    Args:
        path: The dotted path.
        expect: ``"class"`` to refuse, before importing, a path whose source shows a function (see
            :func:`static_problem`).

    Raises:
        ValueError: not a dotted path, a problem the source shows, the module cannot be imported, or it has no such
            attribute.
    """
    module_name, attr = split_dotted(path)
    problem = static_problem(path, expect)
    if problem:
        raise ValueError(problem)
    try:
        module = import_module_explicit(module_name)
    except ImportError as e:
        raise ValueError(f"Cannot import module {module_name!r} from {path!r}: {e}") from e
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"Module {module_name!r} has no attribute {attr!r} (from {path!r}).") from None
    return obj
