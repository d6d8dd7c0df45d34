"""A head's parameter schema, declared once in its ``__init__`` signature and read by the config, the fingerprints,
the resume guard and the docs.

A parameter's name and default are the signature's; its type is the annotation; the rest is a :class:`Param` in
``typing.Annotated``::

    def __init__(self, unit: Annotated[str, Param("the length unit", choices=UNITS)] = "words",
                 batch_size: Annotated[int, Param("responses per call", speed_only=True, minimum=1)] = 8): ...

``speed_only`` parameters (batch sizes, devices) change how fast a head scores, never the scores: they are left out
of the head's fingerprint (the score-cache key) and of the identity the resume guard compares. A head without
``Annotated`` parameters (a third-party head) still gets its names, required parameters and plain annotations
checked.
"""

from __future__ import annotations

import collections.abc
import difflib
import inspect
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

#: The default of a parameter that has none (it must be given).
REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class Param:
    """What a head says about one parameter, beyond its name, type and default.

    Attributes:
        doc: one line for the parameter table of the head's page (Markdown).
        choices: the allowed values, when there is a fixed set.
        speed_only: True when the parameter changes only how fast the head scores (never the scores).
        permission: True when the parameter only allows something (``trust_remote_code``: running the model's own
            code), never changes the scores: like a speed-only one, it is left out of the fingerprint and of the
            identity the resume guard compares (what the model's code is, is in its content fingerprint).
        minimum: the smallest allowed value of a number (inclusive).
        default_doc: how the docs show a ``None`` default (e.g. "the current CUDA device, else CPU").
    """

    doc: str = ""
    choices: tuple[Any, ...] | None = None
    speed_only: bool = False
    permission: bool = False
    minimum: float | None = None
    default_doc: str | None = None


@dataclass(frozen=True)
class ParamInfo:
    """One parameter of a head's schema: the signature's name, default and type, plus its :class:`Param`."""

    name: str
    default: Any
    type: Any
    meta: Param

    @property
    def required(self) -> bool:
        """Whether the parameter has no default."""
        return self.default is REQUIRED


def head_schema(cls: type) -> dict[str, ParamInfo]:
    """The parameters of head class ``cls``, in signature order (read from its ``__init__``)."""
    cached = cls.__dict__.get("_schema_cache")
    if cached is not None:
        return cached
    init = cls.__init__
    sig = inspect.signature(init)
    try:
        hints = typing.get_type_hints(init, include_extras=True)
    except Exception:  # noqa: BLE001 - an annotation that cannot be evaluated is simply not type-checked
        hints = {}
    out: dict[str, ParamInfo] = {}
    for name, p in list(sig.parameters.items())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        hint, meta = hints.get(name, Any), Param()
        if typing.get_origin(hint) is typing.Annotated:
            hint, *extras = typing.get_args(hint)
            meta = next((e for e in extras if isinstance(e, Param)), meta)
        out[name] = ParamInfo(name, p.default, hint, meta)
    cls._schema_cache = out
    return out


def accepts_var_keywords(cls: type) -> bool:
    """Whether ``cls.__init__`` takes ``**kwargs`` (then unknown parameters cannot be detected)."""
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())


def speed_only_params(cls: type) -> set[str]:
    """Names of the parameters of ``cls`` that only change scoring speed."""
    return {n for n, info in head_schema(cls).items() if info.meta.speed_only}


def type_name(hint: Any) -> str:
    """A short readable name of a type annotation (``list[str] | str``, ``a number``, ...)."""
    if hint is Any:
        return "anything"
    if hint is type(None):
        return "null"
    if hint is float:
        return "a number"
    if hint is bool:
        return "true or false"
    if hint in (int, str):
        return "an integer" if hint is int else "a string"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(hint))
    if origin is collections.abc.Callable or hint is collections.abc.Callable:
        return "a callable"
    if origin in (list, tuple, collections.abc.Sequence):
        args = typing.get_args(hint)
        return f"a list of ({type_name(args[0])})" if args else "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def matches_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the annotation ``hint``. Booleans are not numbers here (``weight: true`` is not 1),
    integers are accepted where a float is asked for."""
    if hint is Any or isinstance(hint, (str, typing.TypeVar)):
        return True
    if hint is type(None) or hint is None:
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin is collections.abc.Callable or hint is collections.abc.Callable:
        return callable(value)
    if origin in (list, tuple, collections.abc.Sequence):
        (item, *_) = typing.get_args(hint) or (Any,)
        return isinstance(value, (list, tuple)) and all(matches_type(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def validate_params(cls: type, params: dict[str, Any], head: str) -> None:
    """Check ``params`` against the schema of ``cls``: names (with a did-you-mean), required parameters, types,
    allowed values and minimums; then the head's own cross-parameter rules (``check_params``, a classmethod that
    the constructor runs too).

    Raises:
        ValueError: naming the head, the parameter, what was given and what is allowed.
    """
    schema = head_schema(cls)
    valid = list(schema)
    unknown = [k for k in params if k not in schema]
    if unknown and not accepts_var_keywords(cls):
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, valid, n=1)
            hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
        raise ValueError(
            f"Invalid parameters {sorted(unknown)} for reward head {head!r}: unknown {', '.join(hints)}. "
            f"Valid parameters: {valid}."
        )
    missing = [n for n, info in schema.items() if info.required and n not in params]
    if missing:
        raise ValueError(
            f"Invalid parameters {sorted(params)} for reward head {head!r}: missing required parameter(s) "
            f"{missing}. Valid parameters: {valid}."
        )
    for name, value in params.items():
        info = schema.get(name)
        if info is not None:
            _check_value(info, value, head)
    check = getattr(cls, "check_params", None)
    if check is not None:
        try:
            check(params)
        except ValueError as e:
            raise ValueError(f"Invalid parameters {sorted(params)} for reward head {head!r}: {e}") from e


def _check_value(info: ParamInfo, value: Any, head: str) -> None:
    where = f"reward head {head!r}: parameter {info.name!r}"
    if not matches_type(value, info.type):
        raise ValueError(f"{where} must be {type_name(info.type)}, got {value!r} ({type(value).__name__}).")
    meta = info.meta
    if meta.choices is not None and value is not None and value not in meta.choices:
        names = [str(c) for c in meta.choices]
        close = difflib.get_close_matches(str(value), names, n=1) or [n for n in names if n.startswith(str(value))][:1]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{where} must be one of {list(meta.choices)}, got {value!r}{hint}.")
    if meta.minimum is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not (math.isfinite(value) and value >= meta.minimum):
            raise ValueError(f"{where} must be >= {meta.minimum:g}, got {value!r}.")


def full_params(cls: type, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with the schema's defaults filled in (so ``{}`` and ``{"unit": "words"}`` are the same head)."""
    out = {n: info.default for n, info in head_schema(cls).items() if not info.required}
    out.update(params)
    return out


def semantic_params(cls: type, params: dict[str, Any]) -> dict[str, Any]:
    """The parameters that decide the scores: defaults filled in, speed-only parameters left out."""
    left_out = speed_only_params(cls) | {n for n, info in head_schema(cls).items() if info.meta.permission}
    return {k: v for k, v in full_params(cls, params).items() if k not in left_out}


def _default_cell(info: ParamInfo) -> str:
    if info.required:
        return "required"
    if info.default is None:
        return info.meta.default_doc or "none"
    if isinstance(info.default, bool):
        return f"`{str(info.default).lower()}`"
    return f"`{info.default}`"


def markdown_table(cls: type) -> str:
    """The parameter table of a head's page, generated from its schema (``tests/test_heads.py`` checks the pages
    hold exactly this). Speed-only parameters say so."""
    rows = ["| parameter | default | meaning |", "|---|---|---|"]
    for name, info in head_schema(cls).items():
        doc = info.meta.doc or "(undocumented)"
        if info.meta.speed_only:
            doc += " (speed only: not part of the fingerprint)"
        if info.meta.permission:
            doc += " (a permission: not part of the fingerprint)"
        rows.append(f"| `{name}` | {_default_cell(info)} | {doc} |")
    return "\n".join(rows)
