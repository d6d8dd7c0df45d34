"""The reward-head interface, the registry, and head specifications.

A reward head scores text for one designer objective: higher is better. Heads are found by

1. the registry (``@register_head("name")`` in this package or in user code that has been imported);
2. the ``trl_upo.heads`` entry-point group, so another installed package can ship heads;
3. a dotted path, ``"package.module:ClassName"`` or ``"package.module.ClassName"``, in the ``type`` field.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar

ENTRY_POINT_GROUP = "trl_upo.heads"
_REGISTRY: dict[str, type[RewardHead]] = {}
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


class RewardHead:
    """Base class of reward heads.

    Subclasses set ``name`` (through :func:`register_head`), take their parameters as keyword arguments of
    ``__init__`` and implement :meth:`score`. Parameters are validated against the ``__init__`` signature when a
    :class:`~trl_upo.UPOConfig` is built, before any model is loaded.
    """

    name: ClassVar[str] = ""
    #: Whether the head reads the response text; a head that only reads dataset columns sets this to False.
    needs_text: ClassVar[bool] = True
    #: Whether the head may score shards of a dataset in several worker processes (pure CPU text heads). Model heads
    #: and arbitrary user functions keep the default, False.
    parallel_safe: ClassVar[bool] = False

    def __new__(cls, *args: Any, **kwargs: Any):
        # Record the constructor arguments, so that a head built directly (not from a spec) still fingerprints on
        # its parameters and the score cache cannot mix up two configurations of the same head.
        obj = super().__new__(cls)
        try:
            bound = inspect.signature(cls.__init__).bind_partial(None, *args, **kwargs)
            obj._params = dict(list(bound.arguments.items())[1:])
        except TypeError:
            obj._params = dict(kwargs)
        return obj

    def __init__(self, **params: Any) -> None:
        if params:
            raise TypeError(f"{type(self).__name__} takes no parameters, got {sorted(params)}")

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        *,
        role: str,
        columns: dict[str, list[Any]],
        tokenizer: Any = None,
    ) -> list[float]:
        """Score a batch of responses.

        Args:
            prompts: the prompts (strings, or message lists for conversational data).
            completions: the responses to score, aligned with ``prompts`` (same formats).
            role: ``"chosen"`` or ``"rejected"``: which response of each pair is being scored.
            columns: the dataset's other columns for these rows, by name.
            tokenizer: the trainer's tokenizer, or None.

        Returns:
            One float per response, higher is better. ``None`` is read as NaN, which the trainer rejects.
        """
        raise NotImplementedError

    def release(self) -> None:
        """Free what the head loaded to score (a model); it loads again if it scores again. The trainer calls this
        once the datasets are scored, so a scoring model does not stay in memory during training."""

    def fingerprint(self) -> str:
        """A string that changes whenever the scores could change; the score cache is keyed on it."""
        return f"{type(self).__module__}.{type(self).__qualname__}:{_stable_repr(self.config())}"

    def config(self) -> dict[str, Any]:
        """The head's parameters as given (used for the fingerprint and the saved head list)."""
        return dict(getattr(self, "_params", {}))

    @classmethod
    def validate_params(cls, params: dict[str, Any]) -> None:
        """Check parameters against ``__init__`` without building the head (no model is loaded)."""
        try:
            inspect.signature(cls.__init__).bind(None, **params)
        except TypeError as e:
            sig = inspect.signature(cls.__init__)
            valid = [n for n, p in list(sig.parameters.items())[1:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            raise ValueError(
                f"Invalid parameters {sorted(params)} for reward head {cls.name or cls.__name__!r}: {e}. "
                f"Valid parameters: {valid}."
            ) from None


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the contents of a conversational message list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, (list, tuple)):
        return "\n".join(completion_text(m) for m in completion)
    raise TypeError(f"Cannot read text from a completion of type {type(completion).__name__}")


def register_head(name: str) -> Callable[[type[RewardHead]], type[RewardHead]]:
    """Class decorator that registers a :class:`RewardHead` subclass under ``name``."""
    if not _NAME_RE.match(name):
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


def _import_dotted(path: str) -> Any:
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{path!r} is not a dotted path; use 'package.module:Name' or 'package.module.Name'.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"Cannot import module {module_name!r} from {path!r}: {e}") from e
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"Module {module_name!r} has no attribute {attr!r} (from {path!r}).") from None
    return obj


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
        cls = _import_dotted(type_name)
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


# ----------------------------------------------------------------------------------------------------------------
# Head specifications (what users write in UPOConfig / YAML)
# ----------------------------------------------------------------------------------------------------------------

SPEC_KEYS = ("name", "type", "weight", "normalize", "higher_is_better", "params")


@dataclass
class HeadSpec:
    """One entry of ``UPOConfig.reward_heads``.

    Attributes:
        name: the head's id: its score columns (``upo_<name>_chosen``), metrics (``upo/<name>/...``) and saved
            statistics use it. Defaults to ``type``.
        type: registry name, entry-point name or dotted path of the head class. Defaults to ``name``.
        weight: w_i >= 0 in Eq. (3).
        normalize: ``"zscore"``, ``"rank"`` or ``"none"``; None uses ``UPOConfig.upo_normalization``.
        higher_is_better: False negates the normalised score (for costs such as toxicity).
        params: keyword arguments of the head class.
    """

    name: str
    type: str
    weight: float = 1.0
    normalize: str | None = None
    higher_is_better: bool = True
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The spec as a plain mapping (the form ``reward_heads`` takes in YAML or JSON)."""
        return {
            "name": self.name,
            "type": self.type,
            "weight": self.weight,
            "normalize": self.normalize,
            "higher_is_better": self.higher_is_better,
            "params": {k: _jsonable(v) for k, v in self.params.items()},
        }


def parse_head_specs(value: Any) -> list[HeadSpec]:
    """Parse and validate ``reward_heads``: a list of mappings, or a JSON string of one (command line)."""
    from ..objective import NORMALIZATIONS

    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"reward_heads must be a list of mappings, or a JSON string of one on the command line, e.g. "
                f"'[{{\"name\": \"length\", \"weight\": 1.0}}]'. Could not parse {value!r}: {e}"
            ) from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"reward_heads must be a list of mappings, got {type(value).__name__}.")
    specs: list[HeadSpec] = []
    for i, item in enumerate(value):
        if isinstance(item, HeadSpec):
            item = item.to_dict() | {"params": item.params}
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict):
            raise ValueError(f"reward_heads[{i}] must be a mapping with a 'name' or 'type', got {item!r}.")
        unknown = set(item) - set(SPEC_KEYS)
        if unknown:
            hints = []
            for key in sorted(unknown):
                close = difflib.get_close_matches(key, SPEC_KEYS, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(
                f"reward_heads[{i}] has unknown key(s) {', '.join(hints)}. Valid keys: {list(SPEC_KEYS)}; head "
                f"parameters go under 'params'."
            )
        type_name = item.get("type") or item.get("name")
        if not type_name:
            raise ValueError(f"reward_heads[{i}] needs a 'name' or a 'type'.")
        name = item.get("name") or (type_name if _NAME_RE.match(str(type_name)) else None)
        if not name or not _NAME_RE.match(str(name)):
            raise ValueError(
                f"reward_heads[{i}]: head name {name!r} is not valid. Give a 'name' that starts with a letter and "
                f"contains only letters, digits, '_' or '-' (it names the score columns and metrics)."
            )
        weight = item.get("weight", 1.0)
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"reward_heads[{i}] ({name}): weight must be a number, got {weight!r}.") from None
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"reward_heads[{i}] ({name}): weight must be finite and >= 0, got {weight}.")
        normalize = item.get("normalize")
        if normalize is not None and normalize not in NORMALIZATIONS:
            raise ValueError(
                f"reward_heads[{i}] ({name}): normalize must be one of {list(NORMALIZATIONS)}, got {normalize!r}."
            )
        hib = item.get("higher_is_better", True)
        if not isinstance(hib, bool):
            raise ValueError(f"reward_heads[{i}] ({name}): higher_is_better must be true or false, got {hib!r}.")
        params = item.get("params") or {}
        if not isinstance(params, dict):
            raise ValueError(f"reward_heads[{i}] ({name}): params must be a mapping, got {params!r}.")
        cls = resolve_head_class(str(type_name))
        cls.validate_params(params)
        specs.append(HeadSpec(str(name), str(type_name), weight, normalize, hib, dict(params)))
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(
            f"Reward head names must be unique, found {dupes} more than once. Give each head its own 'name' "
            f"(the 'type' can repeat)."
        )
    return specs


def build_head(spec: HeadSpec) -> RewardHead:
    """Instantiate the head described by ``spec``."""
    cls = resolve_head_class(spec.type)
    head = cls(**spec.params)
    head._params = dict(spec.params)
    return head


def _jsonable(v: Any) -> Any:
    """A JSON-safe stand-in for a parameter value (callables become their dotted path)."""
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if callable(v):
        module = getattr(v, "__module__", None)
        qual = getattr(v, "__qualname__", None) or type(v).__qualname__
        return f"{module}:{qual}" if module else repr(v)
    return repr(v)


def _stable_repr(v: Any) -> str:
    return json.dumps(_jsonable(v), sort_keys=True)


def short_hash(text: str) -> str:
    """First 16 hex digits of the SHA-256 of ``text``: the fingerprints in cache keys and ``upo_state.json``."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]
