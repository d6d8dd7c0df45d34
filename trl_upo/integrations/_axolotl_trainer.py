"""The trainer the axolotl plugin selects: axolotl's DPO trainer plus UPO (imports axolotl's trainers; imported
only when axolotl builds the trainer, after the plugin is registered).

Public names are re-exported by ``trl_upo.integrations.axolotl``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from axolotl.core.trainers.dpo.args import AxolotlDPOConfig
from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer

from trl_upo import UPOConfig, UPOMixin
from trl_upo.integrations.axolotl import PLUGIN, upo_keys


@dataclasses.dataclass
class AxolotlUPOConfig(AxolotlDPOConfig, UPOConfig):
    """axolotl's DPO training arguments and ``UPOConfig`` in one class: what ``AxolotlUPOTrainer`` trains with."""


def as_upo_config(args: Any) -> AxolotlUPOConfig:
    """The ``AxolotlUPOConfig`` with every value of ``args`` (an ``AxolotlDPOConfig`` built by axolotl's RL builder,
    UPO keys included): the same init arguments, so the config is built, and checked, once more as a whole.

    Raises:
        TypeError: ``args`` is not axolotl's DPO training arguments with the UPO fields.
    """
    if isinstance(args, AxolotlUPOConfig):
        return args
    names = {f.name for f in dataclasses.fields(args)} if dataclasses.is_dataclass(args) else set()
    missing = [key for key in upo_keys() if key not in names]
    if not isinstance(args, AxolotlDPOConfig) or missing:
        raise TypeError(
            f"AxolotlUPOTrainer needs axolotl's DPO training arguments with the UPO fields (enable {PLUGIN} in "
            f"`plugins`), got {type(args).__name__}" + (f" without {missing}" if missing else "")
        )
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    return AxolotlUPOConfig(**values)


class AxolotlUPOTrainer(UPOMixin, AxolotlDPOTrainer):
    """axolotl's ``AxolotlDPOTrainer`` with UPO (``UPOMixin`` first): with no reward heads, exactly axolotl's DPO."""

    tag_names = ["axolotl", "dpo", "upo"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if "args" in kwargs:
            kwargs["args"] = as_upo_config(kwargs["args"])
        super().__init__(*args, **kwargs)
