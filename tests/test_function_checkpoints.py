"""A ``function`` head given as a lambda or a closure (Python API): the run still writes complete checkpoints and a
final save (``training_args.bin`` holds the callable's description in its place), through a real UPOTrainer on the
tiny model."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from tests.helpers import cpu_args
from trl_upo import UPOTrainer
from trl_upo.fingerprints import MissingCallable, SavedCallable

CHECKPOINT_FILES = {"optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin", "upo_state.json",
                    "model.safetensors"}


def _closure_reward(word):
    def reward(completions, **kwargs):
        return [float(word not in c) for c in completions]

    return reward


def _saved_function(path):
    args = torch.load(path / "training_args.bin", weights_only=False)
    return args.reward_heads[0]["params"]["function"], args.head_specs[0].params["function"]


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        pytest.param(lambda: (lambda completions, **kw: [float(len(c.split())) for c in completions]), "lambda",
                     id="lambda"),
        pytest.param(lambda: _closure_reward("very"), "closure", id="closure"),
    ],
)
def test_lambda_head_checkpoints_are_complete(tiny_model_path, tmp_path, train_dataset, score_cache, make, kind):
    fn = make()
    heads = [{"name": "fn", "type": "function", "params": {"function": fn}}]
    out = tmp_path / "out"
    args = cpu_args(out, reward_heads=heads, upo_score_cache_dir=score_cache, max_steps=2, save_strategy="steps",
                    save_steps=1)
    trainer = UPOTrainer(model=tiny_model_path, args=args, train_dataset=train_dataset)
    trainer.train()  # died at the first checkpoint before (Can't pickle <function <lambda>>)
    assert trainer.state.global_step == 2
    for step in (1, 2):
        ckpt = out / f"checkpoint-{step}"
        assert CHECKPOINT_FILES <= {p.name for p in ckpt.iterdir()}, sorted(p.name for p in ckpt.iterdir())
        saved, in_spec = _saved_function(ckpt)
        # In its place: a description that says what it was, and how to pass it again when called.
        for value in (saved, in_spec):
            assert isinstance(value, MissingCallable)
            assert kind in value.description and "test_function_checkpoints.py" in value.description
        with pytest.raises(ValueError, match="could not be pickled with the training arguments"):
            saved(completions=["x"])
        state = json.loads((ckpt / "upo_state.json").read_text())
        assert [h["name"] for h in state["heads"]] == ["fn"]
    # The live run kept the real function.
    assert trainer.args.reward_heads[0]["params"]["function"].fn is fn


def test_lambda_head_final_save_without_checkpoints(tiny_model_path, tmp_path, train_dataset, score_cache):
    """``save_strategy: no``: the final save_model() writes the model, training_args.bin and upo_state.json."""
    heads = [{"name": "fn", "type": "function", "params": {"function": lambda completions, **kw: [1.0] * len(completions)}}]
    out = tmp_path / "out"
    args = cpu_args(out, reward_heads=heads, upo_score_cache_dir=score_cache, max_steps=1)
    trainer = UPOTrainer(model=tiny_model_path, args=args, train_dataset=train_dataset)
    trainer.train()
    trainer.save_model()
    assert {"model.safetensors", "training_args.bin", "upo_state.json"} <= {p.name for p in out.iterdir()}
    saved, _ = _saved_function(out)
    assert isinstance(saved, MissingCallable) and "lambda" in saved.description


def test_picklable_callables_are_saved_as_themselves():
    """A module-level function (or a partial of one) pickles as itself; deep copies keep the live callable."""
    import copy
    import functools

    from trl_upo.quickstart_task import avoid_word_reward

    for fn in (avoid_word_reward, functools.partial(avoid_word_reward)):
        wrapped = SavedCallable(fn)
        again = pickle.loads(pickle.dumps(wrapped))
        assert isinstance(again, SavedCallable) and again(prompts=["p"], completions=[" very"]) == [0.0]
    closure = SavedCallable(_closure_reward("x"))
    assert copy.deepcopy(closure) is closure
    assert isinstance(pickle.loads(pickle.dumps(closure)), MissingCallable)
