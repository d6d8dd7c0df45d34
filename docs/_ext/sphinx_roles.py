"""A griffe extension, loaded by mkdocstrings (``mkdocs.yml``), that turns the Sphinx roles of trl-upo's docstrings
into mkdocstrings cross-references when the API reference is built.

The docstrings keep the roles that ``help()`` readers and Sphinx users know (``:func:`register_head```,
``:class:`~trl_upo.UPOConfig```, ``:meth:`RewardHead.score```); mkdocstrings would render them literally. Each role
becomes ``<autoref identifier="<full path>" optional><code>name</code></autoref>``: a link where the target is in
the reference, plain code where it is not (``optional``: no warning, so strict builds keep passing).

A name is resolved the way Python would see it from the documented object: its own members, then the names its
module defines or imports, then the ``trl_upo`` package; ``~`` shows only the last part of the name.

The configuration classes follow TRL's docstring conventions (Hugging Face's doc-builder), which mkdocstrings would
also render literally; they are rewritten too:

- ``[`UPOTrainer`]`` becomes a cross-reference like a role; ``[`~trl.DPOConfig`]`` (a name in TRL, or in
  ``transformers``) becomes a link to that name in TRL's (or transformers') documentation, :func:`external_url`.
- A parameter line ``name (`float`, *optional*, defaults to `0.5`):`` becomes ``name (float):``: the type goes to
  the table's type column and the default is shown, as a value, from the signature.
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
#: ``[`name`]`` or ``[`~name`]``: doc-builder's cross-reference.
HF_REF = re.compile(r"\[`(?P<tilde>~?)(?P<name>[A-Za-z_][\w.]*)`\]")
#: A doc-builder parameter line: ``name (`type` or `type`, *optional*, defaults to `value`):``.
HF_PARAM = re.compile(r"^(?P<indent>\s+)(?P<name>\w+) \((?P<spec>`[^)]*?)\):\s*$", re.M)
#: Where the documentation of a name in another package lives.
EXTERNAL_DOCS = {"trl": "https://huggingface.co/docs/trl", "transformers": "https://huggingface.co/docs/transformers"}
#: TRL documents each trainer's classes on one page: ``DPOConfig`` -> ``dpo_trainer``.
TRL_PAGES = ("DPO", "KTO", "SFT", "GRPO", "RLOO", "Reward", "ORPO", "CPO", "PPO", "Online DPO", "XPO", "Nash")


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


def external_url(name: str) -> str | None:
    """The documentation address of ``name`` in TRL or transformers (``trl.DPOConfig`` ->
    ``https://huggingface.co/docs/trl/dpo_trainer#trl.DPOConfig``); None for a name of another package."""
    package, _, rest = name.partition(".")
    if package not in EXTERNAL_DOCS or not rest:
        return None
    last = rest.rpartition(".")[2]
    page = "index"
    if package == "trl":
        prefix = next((p for p in TRL_PAGES if last.startswith(p.replace(" ", ""))), None)
        if prefix:
            page = prefix.lower().replace(" ", "_") + "_trainer"
    else:
        page = "main_classes/trainer" if "Trainer" in last or "TrainingArguments" in last else "index"
    return f"{EXTERNAL_DOCS[package]}/{page}#{package}.{last}"


def _hf_type(spec: str) -> str:
    """``"`list[dict]` or `str`, *optional*, defaults to `x`"`` -> ``"list[dict] | str"``."""
    kind = spec.split(",")[0]
    return " | ".join(t.strip() for t in re.findall(r"`([^`]+)`", kind)) or kind.strip("` ")


def convert_hf(text: str, obj: Any) -> str:
    """``text`` with doc-builder's cross-references and parameter lines rewritten (see the module docstring)."""

    def ref(m: re.Match) -> str:
        name, shown = m["name"], m["name"].rpartition(".")[2] if m["tilde"] else m["name"]
        url = external_url(name)
        if url:
            return f"[`{shown}`]({url})"
        return f'<autoref identifier="{_resolve(obj, name)}" optional><code>{shown}</code></autoref>'

    text = HF_PARAM.sub(lambda m: f"{m['indent']}{m['name']} ({_hf_type(m['spec'])}):", text)
    return HF_REF.sub(ref, text)


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
            if obj.docstring is not None and "`" in obj.docstring.value:
                obj.docstring.value = convert_hf(obj.docstring.value, obj)
            stack.extend(obj.members.values())
