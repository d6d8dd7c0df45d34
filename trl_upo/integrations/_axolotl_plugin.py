"""The axolotl plugin and its config schema (imports axolotl's plugin base and pydantic; nothing of axolotl's
trainers, which must be imported only after the plugin is registered: see ``UPOTrainingArgsMixin``).

Public names are re-exported by ``trl_upo.integrations.axolotl``.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Optional

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel, Field, create_model, model_validator

from trl_upo import UPOConfig
from trl_upo.integrations.axolotl import (
    PLUGIN,
    rl_name,
    check_raw_config,
    check_values,
    upo_defaults,
    upo_fields,
    upo_settings,
)

_PUBLIC_MODULE = "trl_upo.integrations.axolotl"


def _annotation(name: str) -> Any:
    """The type of the ``UPOConfig`` field ``name``, evaluated in the module of the class that declares it (a
    string under ``from __future__ import annotations``); ``Any`` if it cannot be evaluated."""
    for cls in UPOConfig.__mro__:
        annotation = cls.__dict__.get("__annotations__", {}).get(name)
        if annotation is None:
            continue
        if not isinstance(annotation, str):
            return annotation
        try:
            return eval(annotation, vars(sys.modules[cls.__module__]))  # noqa: S307 - the class's own annotation
        except Exception:  # noqa: BLE001 - an annotation pydantic cannot use is checked by UPOConfig instead
            return Any
    return Any


class _UPOArgsBase(BaseModel):
    """The validators of ``UPOArgs``; axolotl merges ``UPOArgs`` into its config model, so ``cls`` below is the
    merged model and ``cls.model_fields`` every key axolotl accepts."""

    @model_validator(mode="before")
    @classmethod
    def _check_upo_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        known = set(cls.model_fields)
        known |= {f.alias for f in cls.model_fields.values() if f.alias}
        return check_raw_config(data, known)

    @model_validator(mode="after")
    def _check_upo_values(self) -> Any:
        check_values({**self.__dict__})
        return self


def _build_args_model() -> type[BaseModel]:
    """``UPOArgs``: one optional pydantic field per ``upo_fields()`` entry (``None``: ``UPOConfig``'s default)."""
    fields = {}
    for f in upo_fields():
        help_ = f.metadata.get("help", "")
        fields[f.name] = (
            Optional[_annotation(f.name)],  # noqa: UP045 - a runtime type for pydantic
            Field(default=None, json_schema_extra={"description": f"trl-upo: {help_}"}),
        )
    model = create_model("UPOArgs", __base__=_UPOArgsBase, __module__=_PUBLIC_MODULE, **fields)
    model.__doc__ = (
        "The UPO keys of an axolotl config: ``reward_heads`` and every ``upo_*`` field of ``UPOConfig`` (see "
        "docs/configuration.md), each optional (unset: ``UPOConfig``'s default)."
    )
    return model


def _build_training_args_mixin() -> type:
    """``UPOTrainingArgsMixin``: a dataclass with the ``upo_fields()`` (same defaults and help) that axolotl merges
    into its training-argument classes, so that ``AxolotlDPOConfig`` and ``AxolotlKTOConfig`` accept the values
    ``get_training_args`` passes."""
    spec = []
    for f in upo_fields():
        kwargs: dict[str, Any] = {"metadata": f.metadata}
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default_factory"] = f.default_factory
        else:
            kwargs["default"] = None
        spec.append((f.name, Any, dataclasses.field(**kwargs)))
    mixin = dataclasses.make_dataclass("UPOTrainingArgsMixin", spec)
    mixin.__module__ = _PUBLIC_MODULE
    mixin.__doc__ = "The UPO fields of ``UPOConfig``, merged by axolotl into its training-argument classes."
    return mixin


UPOArgs = _build_args_model()
UPOTrainingArgsMixin = _build_training_args_mixin()


class UPOPlugin(BasePlugin):
    """The axolotl plugin: ``plugins: [trl_upo.integrations.axolotl.UPOPlugin]`` in a config with ``rl: dpo``,
    ``ipo`` or ``kto``."""

    def get_input_args(self) -> str:
        """The pydantic model of the UPO keys, merged into axolotl's config schema."""
        return f"{_PUBLIC_MODULE}.UPOArgs"

    def get_training_args_mixin(self) -> str:
        """The dataclass of the UPO fields, merged into axolotl's training-argument classes."""
        return f"{_PUBLIC_MODULE}.UPOTrainingArgsMixin"

    def get_training_args(self, cfg: Any) -> dict[str, Any]:
        """The UPO values of the config, passed to axolotl's training-arguments class; for ``rl: kto`` every UPO key,
        those left unset with ``UPOKTOConfig``'s defaults (the training-argument classes carry ``UPOConfig``'s).

        Raises:
            RuntimeError: when axolotl built its training-argument classes before this plugin was registered
                (they would not accept the UPO keys).
        """
        if rl_name(cfg.get("rl")) == "kto":
            from axolotl.core.training_args import AxolotlKTOConfig as args_class

            settings = {**upo_defaults("kto"), **upo_settings(cfg)}
        else:
            from axolotl.core.trainers.dpo.args import AxolotlDPOConfig as args_class

            settings = upo_settings(cfg)
        missing = [f.name for f in upo_fields() if f.name not in {g.name for g in dataclasses.fields(args_class)}]
        if missing:
            raise RuntimeError(
                f"axolotl's training-argument classes were built before {PLUGIN} was registered, so they lack "
                f"{missing}: something imported axolotl.core.training_args before the config was loaded. Load the "
                "config first (axolotl.cli.config.load_cfg, as `axolotl train` does), then build the trainer."
            )
        return settings
