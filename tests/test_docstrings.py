"""Every public module, class, function and method of ``trl_upo`` has a docstring (inherited ones count).

Public means: reachable without a leading underscore in the module path or the name, and defined in ``trl_upo``
(imported names are checked where they are defined). The API reference pages are generated from these docstrings.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import trl_upo


def _public_modules():
    names = ["trl_upo"]
    for info in pkgutil.walk_packages(trl_upo.__path__, prefix="trl_upo."):
        if any(part.startswith("_") for part in info.name.split(".")[1:]):
            continue
        names.append(info.name)
    return names


def _missing(module) -> list[str]:
    out = []
    if not inspect.getdoc(module):
        out.append(f"{module.__name__} (module)")
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj) and not inspect.getdoc(obj):
            out.append(f"{module.__name__}.{name}")
        elif inspect.isclass(obj):
            if not inspect.getdoc(obj):
                out.append(f"{module.__name__}.{name}")
            for attr, member in vars(obj).items():
                if attr.startswith("_"):
                    continue
                member = getattr(obj, attr, None)
                if (inspect.isfunction(member) or inspect.ismethod(member)) and not inspect.getdoc(member):
                    out.append(f"{module.__name__}.{name}.{attr}")
    return out


def test_every_public_object_has_a_docstring():
    missing = []
    for name in _public_modules():
        if name == "trl_upo.cli.__main__":
            continue
        missing += _missing(importlib.import_module(name))
    assert not missing, "public objects without a docstring (Google style, see docs/):\n  " + "\n  ".join(missing)
