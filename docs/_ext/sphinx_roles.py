"""A griffe extension, loaded by mkdocstrings (``mkdocs.yml``), that turns the Sphinx roles of trl-upo's docstrings
into mkdocstrings cross-references when the API reference is built.

The docstrings keep the roles that ``help()`` readers and Sphinx users know (``:func:`register_head```,
``:class:`~trl_upo.UPOConfig```, ``:meth:`RewardHead.score```); mkdocstrings would render them literally. Each role
becomes ``<autoref identifier="<full path>" optional><code>name</code></autoref>``: a link where the target is in
the reference, plain code where it is not (``optional``: no warning, so strict builds keep passing).

A name is resolved the way Python would see it from the documented object: its own members, then the names its
module defines or imports, then the ``trl_upo`` package; ``~`` shows only the last part of the name.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

#: ``:role:`~name``` or ``:role:`title <name>``` (roles: func, class, meth, attr, mod, data, obj, exc).
ROLE = re.compile(
    r":(?:py:)?(?P<role>func|class|meth|attr|mod|data|obj|exc):"
    r"`(?P<tilde>~?)(?P<body>[^`<]+?)(?:\s*<(?P<target>[^>]+)>)?`"
)
PACKAGE = "trl_upo"


def _resolve(obj: Any, name: str) -> str:
    """The full path of ``name`` as seen from ``obj`` (best effort; an unknown name is returned as it is)."""
    name = name.strip().rstrip("()")
    first, _, rest = name.partition(".")
    scopes = [obj] + [p for p in (getattr(obj, "parent", None), getattr(obj, "module", None)) if p is not None]
    for scope in scopes:
        try:
            base = scope.resolve(first)
        except Exception:  # griffe.NameResolutionError, or a scope that cannot resolve
            continue
        return f"{base}.{rest}" if rest else base
    if name.startswith(PACKAGE + ".") or name == PACKAGE:
        return name
    return f"{PACKAGE}.{name}"


def convert(text: str, obj: Any) -> str:
    """``text`` with every Sphinx role replaced by an optional cross-reference (see the module docstring)."""

    def repl(m: re.Match) -> str:
        target = (m["target"] or m["body"]).strip()
        shown = m["body"].strip() if m["target"] else target
        if m["tilde"]:
            shown = shown.rpartition(".")[2]
        if m["role"] in ("func", "meth") and not shown.endswith(")"):
            shown += "()"
        return f'<autoref identifier="{_resolve(obj, target)}" optional><code>{shown}</code></autoref>'

    return ROLE.sub(repl, text)


class SphinxRoles(griffe.Extension):
    """Rewrite the Sphinx roles of every docstring of the loaded package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Walk the package once it is loaded, when every name can be resolved."""
        seen: set[int] = set()
        stack: list[Any] = [pkg]
        while stack:
            obj = stack.pop()
            if id(obj) in seen or obj.is_alias:
                continue
            seen.add(id(obj))
            if obj.docstring is not None and ":" in obj.docstring.value:
                obj.docstring.value = convert(obj.docstring.value, obj)
            stack.extend(obj.members.values())
