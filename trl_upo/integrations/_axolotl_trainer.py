"""The trainers the axolotl plugin selects: axolotl's DPO trainer plus UPO (``rl: dpo``/``ipo``) and axolotl's KTO
trainer plus UPO (``rl: kto``). Imports axolotl's trainers and training arguments, so it is imported only when
axolotl builds the trainer, after the plugin is registered.

Public names are re-exported by ``trl_upo.integrations.axolotl``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from axolotl.core.trainers.dpo.args import AxolotlDPOConfig
from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer
from axolotl.core.trainers.trl import AxolotlKTOTrainer
from axolotl.core.training_args import AxolotlKTOConfig

from trl_upo import UPOConfig, UPOKTOConfig, UPOKTOMixin, UPOMixin
from trl_upo.integrations.axolotl import PLUGIN, upo_keys


@dataclasses.dataclass
class AxolotlUPOConfig(AxolotlDPOConfig, UPOConfig):
    """axolotl's DPO training arguments and ``UPOConfig`` in one class: what ``AxolotlUPOTrainer`` trains with."""


def _upokto_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    """The UPO fields as ``UPOKTOConfig`` declares them (defaults, help and choices for unpaired data), declared again
    on ``AxolotlUPOKTOConfig``: otherwise the ``UPOTrainingArgsMixin`` axolotl merges into ``AxolotlKTOConfig`` (with
    ``UPOConfig``'s, the pair choices) would come first in the class's fields and its checks."""
    spec = []
    for f in dataclasses.fields(UPOKTOConfig):
        if f.name in upo_keys():
            default = {"default": f.default} if f.default is not dataclasses.MISSING else {
                "default_factory": f.default_factory}
            spec.append((f.name, f.type, dataclasses.field(metadata=f.metadata, **default)))
    return spec


AxolotlUPOKTOConfig = dataclasses.make_dataclass(
    "AxolotlUPOKTOConfig", _upokto_fields(), bases=(AxolotlKTOConfig, UPOKTOConfig)
)
AxolotlUPOKTOConfig.__module__ = __name__
AxolotlUPOKTOConfig.__doc__ = (
    "axolotl's KTO training arguments and ``UPOKTOConfig`` in one class: what ``AxolotlUPOKTOTrainer`` trains with "
    "(the UPO fields as ``UPOKTOConfig`` declares them)."
)


def _converted(args: Any, axolotl_class: type, upo_class: type, trainer: str) -> Any:
    """``args`` (an instance of ``axolotl_class`` built by axolotl's RL builder, UPO keys included) as an instance of
    ``upo_class`` with every value of it: the same init arguments, so the config is built, and checked, once more as
    a whole."""
    if isinstance(args, upo_class):
        return args
    names = {f.name for f in dataclasses.fields(args)} if dataclasses.is_dataclass(args) else set()
    missing = [key for key in upo_keys() if key not in names]
    if not isinstance(args, axolotl_class) or missing:
        raise TypeError(
            f"{trainer} needs axolotl's {axolotl_class.__name__} training arguments with the UPO fields (enable "
            f"{PLUGIN} in `plugins`), got {type(args).__name__}" + (f" without {missing}" if missing else "")
        )
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    return upo_class(**values)


def as_upo_config(args: Any) -> AxolotlUPOConfig:
    """The ``AxolotlUPOConfig`` with every value of ``args`` (an ``AxolotlDPOConfig`` built by axolotl's RL builder,
    UPO keys included).

    Raises:
        TypeError: ``args`` is not axolotl's DPO training arguments with the UPO fields.
    """
    return _converted(args, AxolotlDPOConfig, AxolotlUPOConfig, "AxolotlUPOTrainer")


def as_upo_kto_config(args: Any) -> AxolotlUPOKTOConfig:
    """The ``AxolotlUPOKTOConfig`` with every value of ``args`` (an ``AxolotlKTOConfig`` built by axolotl's RL
    builder, UPO keys included, with ``UPOKTOConfig``'s defaults for those the config leaves unset).

    Raises:
        TypeError: ``args`` is not axolotl's KTO training arguments with the UPO fields.
    """
    return _converted(args, AxolotlKTOConfig, AxolotlUPOKTOConfig, "AxolotlUPOKTOTrainer")


class AxolotlUPOTrainer(UPOMixin, AxolotlDPOTrainer):
    """axolotl's ``AxolotlDPOTrainer`` with UPO (``UPOMixin`` first): with no reward heads, exactly axolotl's DPO."""

    tag_names = ["axolotl", "dpo", "upo"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if "args" in kwargs:
            kwargs["args"] = as_upo_config(kwargs["args"])
        super().__init__(*args, **kwargs)


class AxolotlUPOKTOTrainer(UPOKTOMixin, AxolotlKTOTrainer):
    """axolotl's ``AxolotlKTOTrainer`` with UPO (``UPOKTOMixin`` first), on unpaired rows (``prompt``,
    ``completion``, boolean ``label``): with no reward heads, exactly axolotl's KTO."""

    tag_names = ["axolotl", "kto", "upo"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if "args" in kwargs:
            kwargs["args"] = as_upo_kto_config(kwargs["args"])
        super().__init__(*args, **kwargs)
