"""The head registry: heads are found by

1. name, for heads registered with ``@register_head("name")`` (the built-in heads, one file each in this package,
   and user code that has been imported);
2. the ``trl_upo.heads`` entry-point group, so another installed package can ship heads;
3. a dotted path, ``"package.module:ClassName"`` or ``"package.module.ClassName"``.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from .dotted import import_dotted
from .protocol import RewardHead

ENTRY_POINT_GROUP = "trl_upo.heads"
_REGISTRY: dict[str, type[RewardHead]] = {}
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


def register_head(name: str) -> Callable[[type[RewardHead]], type[RewardHead]]:
    """Class decorator that registers a :class:`RewardHead` subclass under ``name``."""
    if not NAME_RE.match(name):
        raise ValueError(f"Head name {name!r} must start with a letter and contain only letters, digits, '_' or '-'.")

    def deco(cls: type[RewardHead]) -> type[RewardHead]:
        if not (isinstance(cls, type) and issubclass(cls, RewardHead)):
            raise TypeError(f"@register_head({name!r}) must decorate a RewardHead subclass, got {cls!r}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"A reward head named {name!r} is already registered ({existing.__qualname__}).")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def registered_heads() -> dict[str, type[RewardHead]]:
    """All heads known by name: the built-in registry plus the ``trl_upo.heads`` entry points."""
    _load_builtin_heads()
    out = dict(_REGISTRY)
    for ep in _entry_points():
        out.setdefault(ep.name, None)  # loaded lazily by resolve_head_class
    return out


def _entry_points():
    return list(entry_points(group=ENTRY_POINT_GROUP))


def _load_builtin_heads() -> None:
    # Importing the package registers the built-in heads (one file each).
    importlib.import_module("trl_upo.heads")


def resolve_head_class(type_name: str) -> type[RewardHead]:
    """Find a head class by registry name, entry-point name or dotted path."""
    _load_builtin_heads()
    if type_name in _REGISTRY:
        return _REGISTRY[type_name]
    for ep in _entry_points():
        if ep.name == type_name:
            cls = ep.load()
            _check_head_class(cls, f"entry point {ep.value!r}")
            return cls
    if "." in type_name or ":" in type_name:
        cls = import_dotted(type_name, expect="class")
        _check_head_class(cls, repr(type_name))
        return cls
    known = sorted(registered_heads())
    close = difflib.get_close_matches(type_name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"Unknown reward head {type_name!r}.{hint} Registered heads: {known}. A custom head can be given as a dotted "
        f"path ('package.module:ClassName'), registered with @trl_upo.register_head, or shipped by a package under "
        f"the {ENTRY_POINT_GROUP!r} entry-point group."
    )


def _check_head_class(cls: Any, where: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, RewardHead)):
        raise ValueError(
            f"{where} resolves to {cls!r}, which is not a RewardHead subclass. For a plain reward function use "
            f"type 'function' with params {{'function': ...}}."
        )
