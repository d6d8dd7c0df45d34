"""A second axolotl plugin, for the tests (``plugins: [tests.axolotl_plugins.forward_counter.ForwardCounter]``):
counts the forwards of the policy and of the reference model at every training step, with forward hooks registered
after the trainer is built, and when training ends writes them to ``<output_dir>/forwards.json``, the trainer's log
history to ``<output_dir>/log_history.json``, the training arguments to ``<output_dir>/args.json`` and the classes
of the trainer, its arguments and its model's modules to ``<output_dir>/classes.json``."""

from __future__ import annotations

import json
import os

from axolotl.integrations.base import BasePlugin
from peft import PeftModel
from transformers import TrainerCallback


def _hooked(module) -> object:
    """The module whose ``__call__`` a forward goes through (under PEFT 0.20: the tuner around the base model)."""
    return module.base_model if isinstance(module, PeftModel) else module


class _Counts(TrainerCallback):
    def __init__(self, trainer, output_dir: str):
        self.output_dir = output_dir
        self.trainer = trainer
        self.now = {"policy": 0, "ref": 0}
        self.steps: list[dict[str, int]] = []
        _hooked(trainer.model).register_forward_pre_hook(lambda *_: self._add("policy"))
        if getattr(trainer, "ref_model", None) is not None:
            trainer.ref_model.register_forward_pre_hook(lambda *_: self._add("ref"))

    def _add(self, which: str) -> None:
        self.now[which] += 1

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(dict(self.now))
        self.now = {"policy": 0, "ref": 0}

    def on_train_end(self, args, state, control, **kwargs):
        records = {
            "forwards.json": self.steps,
            "log_history.json": state.log_history,
            "args.json": args.to_dict(),
            "classes.json": {"trainer": [c.__name__ for c in type(self.trainer).__mro__],
                             "args": [c.__name__ for c in type(args).__mro__],
                             "modules": sorted({type(m).__name__ for m in self.trainer.model.modules()})},
        }
        for name, value in records.items():
            with open(os.path.join(self.output_dir, name), "w") as f:
                json.dump(value, f, default=str)


class ForwardCounter(BasePlugin):
    """Counts forwards per training step (see the module docstring)."""

    def add_callbacks_post_trainer(self, cfg, trainer):
        """The counting callback, with its hooks on the trainer's policy and reference model."""
        return [_Counts(trainer, cfg.output_dir)]
