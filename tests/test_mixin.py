"""UPO as a mixin: ``class MyUPO(UPOMixin, MyDPO)`` adds UPO to any DPOTrainer subclass, through that subclass's own
``compute_loss``; with no reward heads it changes nothing of it."""

from __future__ import annotations

import pytest
import transformers
import trl

from tests.helpers import cpu_args
from trl_upo import UPOMixin, UPOTrainer
from trl_upo.quickstart_task import avoid_word_reward

HEADS = [{"name": "novery", "type": "function", "params": {"function": avoid_word_reward}}]


class CountingDPO(trl.DPOTrainer):
    """A user's DPOTrainer subclass with its own ``compute_loss``: counts its calls and adds a constant to the loss."""

    OFFSET = 0.25

    def __init__(self, *args, **kwargs):
        self.calls = 0
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.calls += 1
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        return loss + self.OFFSET


class CountingUPO(UPOMixin, CountingDPO):
    """CountingDPO plus UPO."""


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _train(cls, tiny_model_path, tmp_path, train_dataset, **kwargs):
    transformers.set_seed(0)
    args = cpu_args(tmp_path, **kwargs)
    trainer = cls(tiny_model_path, args=args, train_dataset=train_dataset)  # model given positionally, as TRL allows
    trainer.train()
    return trainer


def test_no_heads_the_mixin_changes_nothing(tiny_model_path, tmp_path, train_dataset):
    dpo = _train(CountingDPO, tiny_model_path, tmp_path / "dpo", train_dataset, config_cls=trl.DPOConfig)
    upo = _train(CountingUPO, tiny_model_path, tmp_path / "upo", train_dataset)
    assert _losses(upo) == _losses(dpo)
    assert upo.calls == dpo.calls == 3


def test_heads_go_through_the_subclass_compute_loss(tiny_model_path, tmp_path, train_dataset, score_cache):
    """The subclass's override runs (its offset is in the loss) and the UPO term is added on top: the logged loss
    is the subclass's loss plus alpha times the logged aux loss."""
    kw = dict(reward_heads=HEADS, upo_alpha=1.0, upo_score_cache_dir=score_cache)
    mixed = _train(CountingUPO, tiny_model_path, tmp_path / "mixed", train_dataset, **kw)
    plain = _train(UPOTrainer, tiny_model_path, tmp_path / "plain", train_dataset, **kw)
    assert mixed.calls == 3
    logs = [h for h in mixed.state.log_history if "loss" in h]
    assert all("upo/aux_loss" in h and "upo/novery/chosen" in h for h in logs)
    # Same seed, same data: the first step of both sees the same weights; the offset is the only difference.
    first_mixed, first_plain = logs[0], [h for h in plain.state.log_history if "loss" in h][0]
    assert first_mixed["upo/aux_loss"] == pytest.approx(first_plain["upo/aux_loss"], rel=1e-6)
    assert first_mixed["loss"] == pytest.approx(first_plain["loss"] + CountingDPO.OFFSET, rel=1e-5)


def test_upotrainer_is_the_dpo_adapter_of_the_core_on_dpotrainer():
    from trl_upo.core import UPOCore

    assert UPOTrainer.__mro__[1:4] == (UPOMixin, UPOCore, trl.DPOTrainer)
    assert UPOTrainer._tag_names == ["trl", "dpo", "upo"]
