"""Public names imported on first use (PEP 562): how ``trl_upo`` starts without torch, and how the axolotl
integration imports without axolotl."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_getattr(module_name: str, namespace: dict[str, Any], table: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``table[name]`` (a module path) the first time ``name`` is read and
    keeps the value in ``namespace`` (the module's globals), so the import runs once."""

    def __getattr__(name: str) -> Any:
        if name in table:
            value = getattr(importlib.import_module(table[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    return __getattr__
