"""Head specifications: the entries of ``UPOConfig.reward_heads`` (YAML, JSON or Python), parsed and validated
before any model loads, and turned into heads by :func:`build_head`."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any

from ..fingerprints import SavedCallable, jsonable
from ..formats import mapping_list
from .protocol import RewardHead
from .registry import NAME_RE, resolve_head_class


SPEC_KEYS = ("name", "type", "weight", "normalize", "higher_is_better", "params")
#: Names of UPO's own metrics under ``upo/`` (``upo/reward_aux/chosen``, ``upo/aux_loss``, ``upo/weight/mean``, ...):
#: a head of one of these names would log ``upo/<name>/...`` over them, so it is refused when the config is built.
RESERVED_HEAD_NAMES = (
    "reward_aux", "loglik", "aux_loss", "advantage", "weight", "margin_correction", "reward_margin",
)


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
            "params": {k: jsonable(v) for k, v in self.params.items()},
        }


def parse_head_specs(value: Any) -> list[HeadSpec]:
    """Parse and validate ``reward_heads``: a list of mappings, or a JSON string of one (command line)."""
    from ..objective import NORMALIZATIONS

    value = mapping_list(value, "reward_heads", '\'[{"name": "length", "weight": 1.0}]\'', (dict, HeadSpec)) or []
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
        if isinstance(type_name, type):  # {"type": LengthHead}: the class itself, not a dotted path
            type_name = class_type_name(type_name, f"reward_heads[{i}]")
        if not type_name:
            raise ValueError(f"reward_heads[{i}] needs a 'name' or a 'type'.")
        name = item.get("name") or (type_name if NAME_RE.match(str(type_name)) else None)
        if not name or not NAME_RE.match(str(name)):
            raise ValueError(
                f"reward_heads[{i}]: head name {name!r} is not valid. Give a 'name' that starts with a letter and "
                f"contains only letters, digits, '_' or '-' (it names the score columns and metrics)."
            )
        if str(name).lower() in RESERVED_HEAD_NAMES:
            raise ValueError(
                f"reward_heads[{i}]: head name {name!r} is one of UPO's own metric names (upo/{name}/...); "
                f"reserved: {list(RESERVED_HEAD_NAMES)}. Give the head another 'name' (e.g. {name}_head); the "
                f"'type' can stay."
            )
        weight = item.get("weight", 1.0)
        try:
            if isinstance(weight, bool):  # YAML `weight: true` is a typo, not 1.0
                raise TypeError
            weight = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"reward_heads[{i}] ({name}): weight must be a number, got {weight!r} (a number >= 0, e.g. 1.0).") from None
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
        try:
            cls.validate_params(params)
        except ValueError as e:
            raise ValueError(f"reward_heads[{i}] ({name}): {e}") from None
        # Callables are kept behind a wrapper that pickles even a lambda (as its description) into checkpoints.
        params = {k: SavedCallable(v) if callable(v) and not isinstance(v, type) else v for k, v in params.items()}
        specs.append(HeadSpec(str(name), str(type_name), weight, normalize, hib, params))
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(
            f"Reward head names must be unique, found {dupes} more than once. Give each head its own 'name' "
            f"(the 'type' can repeat)."
        )
    return specs


def class_type_name(cls: type, where: str) -> str:
    """The ``type`` of a head given as a class object: its registry name, or its dotted path ``module:Qualname``.

    Raises:
        ValueError: ``cls`` is not a RewardHead subclass.
    """
    from .registry import registered_heads

    if not issubclass(cls, RewardHead):
        raise ValueError(
            f"{where}: type {cls!r} is not a RewardHead subclass. For a plain reward function use type 'function' "
            f"with params {{'function': ...}}."
        )
    for name, registered in registered_heads().items():
        if registered is cls:
            return name
    return f"{cls.__module__}:{cls.__qualname__}"


def build_head(spec: HeadSpec) -> RewardHead:
    """Instantiate the head described by ``spec``."""
    return resolve_head_class(spec.type)(**spec.params)


def weight_cap_warning(weight_cap: float, normalize_weights: bool) -> str | None:
    """The warning for a ``upo_weight_cap`` below 1 with ``upo_normalize_weights`` (``UPOConfig`` calls this and
    warns), or None. Normalised weights average 1 only when the cap lets weights above 1 through: with a cap below
    1 every weight is cut to at most the cap, so the mean falls below 1 and ``upo_alpha`` is silently scaled down."""
    if normalize_weights and weight_cap < 1:
        return (
            f"upo_weight_cap={weight_cap} is below 1 with upo_normalize_weights=True: every advantage weight is cut "
            f"to at most {weight_cap}, so the weights no longer average 1 and the auxiliary term is scaled down by "
            f"up to {weight_cap}x (an implicit smaller upo_alpha). Set upo_weight_cap >= 1 (the default is 100), "
            f"or lower upo_alpha instead."
        )
    return None
