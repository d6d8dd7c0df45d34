"""UPO in axolotl: a plugin that trains axolotl's own DPO or KTO trainer with the UPO term.

Enable it in an axolotl config with ``rl: dpo`` (or ``ipo``, or ``kto`` for unpaired data)::

    plugins:
      - trl_upo.integrations.axolotl.UPOPlugin
    reward_heads:
      - {name: length, params: {direction: shorter}}
    upo_alpha: 0.5

What the plugin does, at each stage of an axolotl run (``docs/axolotl.md``):

- config validation (before any model loads): ``UPOArgs`` adds ``reward_heads`` and every ``upo_*`` field of
  ``UPOConfig`` (read from the dataclass, so new fields appear by themselves) to axolotl's schema; a key that looks
  like a UPO key but is none (``upo_alpah``, ``reward_head``) is an error naming it, and the values are checked by
  checking them as ``UPOConfig`` (``UPOKTOConfig`` for ``rl: kto``) does. The run must be ``rl: dpo``, ``rl: ipo``
  or ``rl: kto``; ``trainer_cls`` is set to the UPO trainer of that kind (:data:`TRAINERS`).
- training arguments: ``UPOTrainingArgsMixin`` adds the same fields to axolotl's training-argument classes and
  ``UPOPlugin.get_training_args`` passes the config's values into them (for ``rl: kto``, ``UPOKTOConfig``'s defaults
  for the keys left unset: :func:`upo_defaults`).
- trainer: ``AxolotlUPOTrainer(UPOMixin, AxolotlDPOTrainer)`` turns axolotl's ``AxolotlDPOConfig`` into an
  ``AxolotlUPOConfig`` (both classes, one instance) and trains exactly as axolotl's DPO trainer does, plus UPO;
  ``AxolotlUPOKTOTrainer(UPOKTOMixin, AxolotlKTOTrainer)`` does the same with axolotl's ``AxolotlKTOConfig`` and an
  ``AxolotlUPOKTOConfig``.

The axolotl-dependent names (``UPOPlugin``, ``UPOArgs``, ``UPOTrainingArgsMixin``, ``AxolotlUPOTrainer``,
``AxolotlUPOConfig``, ``AxolotlUPOKTOTrainer``, ``AxolotlUPOKTOConfig``) are built on first use, so importing this
module, or ``trl_upo``, never imports axolotl.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterable, Mapping
from typing import Any

from trl_upo.lazy import lazy_getattr

#: The dotted path an axolotl config names in ``plugins:``.
PLUGIN = "trl_upo.integrations.axolotl.UPOPlugin"
#: The trainer class the plugin puts in ``trainer_cls`` (axolotl's RL builder passes the model and the reference
#: model to a ``trainer_cls``, not to a class returned by a plugin's ``get_trainer_cls``).
TRAINER = "trl_upo.integrations.axolotl.AxolotlUPOTrainer"
#: The trainer class for ``rl: kto`` (axolotl's KTO trainer plus UPO, on unpaired data).
KTO_TRAINER = "trl_upo.integrations.axolotl.AxolotlUPOKTOTrainer"
#: The axolotl ``rl:`` values the plugin trains -> the trainer class it puts in ``trainer_cls`` (``dpo`` and ``ipo``
#: are axolotl's DPO trainer, UPO keeps every DPO loss type; ``kto`` is axolotl's KTO trainer).
TRAINERS = {"dpo": TRAINER, "ipo": TRAINER, "kto": KTO_TRAINER}
RL_TYPES = tuple(TRAINERS)

#: public name -> private module that builds it (imports axolotl or pydantic)
_LAZY = {
    "UPOPlugin": "trl_upo.integrations._axolotl_plugin",
    "UPOArgs": "trl_upo.integrations._axolotl_plugin",
    "UPOTrainingArgsMixin": "trl_upo.integrations._axolotl_plugin",
    "AxolotlUPOTrainer": "trl_upo.integrations._axolotl_trainer",
    "AxolotlUPOConfig": "trl_upo.integrations._axolotl_trainer",
    "AxolotlUPOKTOTrainer": "trl_upo.integrations._axolotl_trainer",
    "AxolotlUPOKTOConfig": "trl_upo.integrations._axolotl_trainer",
}


#: Build an axolotl-dependent name the first time it is used (``from ... import UPOPlugin`` included).
__getattr__ = lazy_getattr(__name__, globals(), _LAZY)


def upo_fields() -> list[dataclasses.Field]:
    """The fields ``UPOConfig`` adds to TRL's ``DPOConfig`` (``reward_heads`` and the ``upo_*`` settings), in
    declaration order, read from the dataclasses: a field added to ``UPOConfig`` becomes an axolotl key by itself."""
    from trl import DPOConfig

    from trl_upo import UPOConfig

    dpo = {f.name for f in dataclasses.fields(DPOConfig)}
    return [f for f in dataclasses.fields(UPOConfig) if f.init and f.name not in dpo]


def upo_keys() -> list[str]:
    """The names of ``upo_fields()``: the keys the plugin adds to an axolotl config."""
    return [f.name for f in upo_fields()]


def upo_config_class(rl: Any) -> type:
    """The trl-upo config whose fields, defaults and checks apply to an axolotl run of kind ``rl``: ``UPOKTOConfig``
    for ``kto``, else ``UPOConfig``."""
    from trl_upo import UPOConfig, UPOKTOConfig

    return UPOKTOConfig if rl_name(rl) == "kto" else UPOConfig


def upo_defaults(rl: Any) -> dict[str, Any]:
    """The default of every UPO key under the config of ``rl`` (:func:`upo_config_class`); for ``kto`` they differ
    from ``UPOConfig``'s (``upo_alpha`` 0.25, ``upo_applies_to`` ``desirable``)."""
    cls = upo_config_class(rl)
    defaults = {}
    for f in dataclasses.fields(cls):
        if f.name in upo_keys():
            defaults[f.name] = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return defaults


def _looks_like_upo_key(key: str, upo: list[str]) -> bool:
    import difflib

    lowered = key.lower()
    if lowered.startswith("upo") or "reward_head" in lowered or "rewardhead" in lowered:
        return True
    return bool(difflib.get_close_matches(key, upo, n=1, cutoff=0.75))


def mistyped_upo_keys(keys: Iterable[str], known: Iterable[str]) -> list[str]:
    """The problems with ``keys`` (an axolotl config's top-level keys) that look like UPO keys but are not keys of
    the schema ``known`` (axolotl's keys plus the UPO keys): one message per key, naming it and the closest UPO key.

    Args:
        keys: The config's keys.
        known: Every key the (plugin-extended) axolotl schema accepts.

    Returns:
        The messages, empty when every UPO-looking key is known.
    """
    from trl_upo.cli.common import did_you_mean

    known = set(known)
    upo = upo_keys()
    return [
        f"unknown UPO key `{key}` in the axolotl config{did_you_mean(key, upo)}"
        for key in keys
        if isinstance(key, str) and key not in known and _looks_like_upo_key(key, upo)
    ]


def rl_name(rl: Any) -> str | None:
    """An axolotl ``rl`` value (a string or axolotl's ``RLType``) as its name (``"dpo"``, ``"kto"``), or None."""
    return None if rl is None else str(getattr(rl, "value", rl))


def check_raw_config(data: Mapping[str, Any], known: Iterable[str]) -> dict[str, Any]:
    """What the plugin checks in the raw axolotl config before axolotl parses it: no mistyped UPO key, ``rl`` is one
    of ``RL_TYPES``, and ``trainer_cls`` is unset or the UPO trainer of that ``rl`` (a subclass of it counts); sets
    ``trainer_cls``.

    Args:
        data: The raw config (a mapping of axolotl keys).
        known: Every key the plugin-extended schema accepts.

    Returns:
        A copy of ``data`` with ``trainer_cls`` set.

    Raises:
        ValueError: naming every problem found.
    """
    problems = mistyped_upo_keys(data, known)
    rl = rl_name(data.get("rl"))
    if rl not in RL_TYPES:
        problems.append(
            f"the UPO plugin trains axolotl's DPO and KTO trainers: set `rl: dpo` (or `rl: ipo`), or `rl: kto` for "
            f"unpaired data, got `rl: {rl}`; remove {PLUGIN} from `plugins` for other trainers"
        )
    trainer = TRAINERS.get(rl, TRAINER)
    trainer_cls = data.get("trainer_cls")
    other = trainer_cls in TRAINERS.values()  # the plugin's trainer for another `rl` (no import needed to tell)
    if trainer_cls not in (None, trainer) and (other or not _is_subclass(trainer_cls, trainer)):
        problems.append(
            f"`trainer_cls: {trainer_cls}` is not a subclass of {trainer}: the UPO plugin trains `rl: {rl}` with that "
            f"class; remove `trainer_cls`, or subclass {trainer.rpartition('.')[2]}"
        )
    if problems:
        raise ValueError("invalid UPO settings: " + "; ".join(problems))
    return {**data, "trainer_cls": trainer_cls or trainer}


def _is_subclass(path: Any, trainer: str) -> bool:
    """Whether the dotted ``path`` names a subclass of the plugin's trainer ``trainer`` (a dotted name here)."""
    if not isinstance(path, str) or "." not in path:
        return False
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False
    upo_trainer = __getattr__(trainer.rpartition(".")[2])
    return isinstance(cls, type) and issubclass(cls, upo_trainer)


def upo_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The UPO keys set in an axolotl config (``None`` means unset: ``UPOConfig``'s default applies).

    Args:
        cfg: The axolotl config (validated or raw).

    Returns:
        ``{key: value}`` for every UPO key whose value is not ``None``.
    """
    return {key: cfg[key] for key in upo_keys() if cfg.get(key) is not None}


def check_values(cfg: Mapping[str, Any]) -> None:
    """Check the UPO values of an axolotl config the way ``UPOConfig`` (``UPOKTOConfig`` for ``rl: kto``) checks
    them (heads, ranges, choices, and the loss the run uses for ``upo_combine: margin``), without building a config
    (that would set up accelerate's distributed state, a gloo process group under a launcher, before axolotl sets up
    NCCL); raises ``ValueError`` naming the problem."""
    from trl_upo.config import check_upo_values

    rl = rl_name(cfg.get("rl"))
    extra: dict[str, Any] = {}
    if rl == "ipo":
        extra["loss_type"] = ["ipo"]
    elif rl != "kto" and cfg.get("dpo_loss_type"):
        extra["loss_type"] = cfg["dpo_loss_type"]
    check_upo_values(upo_config_class(rl), **extra, **upo_settings(cfg))
