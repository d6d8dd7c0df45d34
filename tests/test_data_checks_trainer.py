"""The data checks end to end in both trainers (``trl_upo.data.checks`` called by the core): before any scoring,
no reward head is called on data that cannot train; and TRL's own row filter is checked after its preparation."""

from __future__ import annotations

import copy

import pytest
from datasets import Dataset

from tests.helpers import cpu_args
from trl_upo import UPOConfig, UPOKTOConfig, UPOKTOTrainer, UPOTrainer
from trl_upo.formats import DataError

LONG = " ".join(["tell me about cats"] * 30)
CALLS: list[int] = []


def counting_head(prompts, completions, **kwargs):
    """A function head that records each call: a check that runs before scoring leaves it uncalled."""
    CALLS.append(len(completions))
    return [float(len(c)) for c in completions]


HEADS = [{"name": "count", "type": "function", "params": {"function": f"{__name__}.counting_head"}}]
TRAINERS = {"dpo": (UPOTrainer, UPOConfig), "kto": (UPOKTOTrainer, UPOKTOConfig)}


def _build(kind, model, tokenizer, rows, tmp_path, heads=HEADS, **kwargs):
    trainer_cls, config_cls = TRAINERS[kind]
    args = cpu_args(tmp_path / "out", config_cls=config_cls, reward_heads=heads, **kwargs)
    return trainer_cls(model=model, args=args, train_dataset=rows, processing_class=tokenizer)


@pytest.fixture(autouse=True)
def _no_calls():
    CALLS.clear()


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_every_prompt_too_long_fails_before_scoring(kind, tiny_model_path, tokenizer, tmp_path):
    rows = Dataset.from_dict({"prompt": [LONG] * 6, "chosen": [" a"] * 6, "rejected": [" b c"] * 6})
    with pytest.raises(DataError, match=r"Every prompt of the train dataset \(6 rows\).*max_length=16"):
        _build(kind, tiny_model_path, tokenizer, rows, tmp_path, max_length=16)
    assert CALLS == []


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_every_prompt_too_long_without_heads(kind, tiny_model_path, tokenizer, tmp_path):
    """No heads, no scoring: TRL's filter leaves no row, which is named after its preparation (torch's
    ``num_samples=0`` for DPO, a run of no step for KTO before)."""
    rows = Dataset.from_dict({"prompt": [LONG] * 6, "chosen": [" a"] * 6, "rejected": [" b c"] * 6})
    with pytest.raises(DataError, match=r"left none of its \d+ rows.*max_length=16"):
        _build(kind, tiny_model_path, tokenizer, rows, tmp_path, heads=[], max_length=16)


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_null_response_fails_before_scoring(kind, tiny_model_path, tokenizer, tmp_path):
    rows = Dataset.from_list([{"prompt": "tell me", "chosen": " a", "rejected": " b"}] * 3
                             + [{"prompt": "tell me", "chosen": None, "rejected": " b"}])
    with pytest.raises(DataError, match=r"Row 3 of the train dataset has no 'chosen' \(null\)"):
        _build(kind, tiny_model_path, tokenizer, rows, tmp_path)
    assert CALLS == []


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_conversational_without_chat_template_fails_before_scoring(kind, tiny_model_path, tokenizer, tmp_path):
    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    message = [{"role": "user", "content": "hi"}]
    rows = Dataset.from_list([{"prompt": message, "chosen": [{"role": "assistant", "content": "a"}],
                               "rejected": [{"role": "assistant", "content": "b"}]}] * 4)
    with pytest.raises(DataError, match="no chat template"):
        _build(kind, tiny_model_path, no_template, rows, tmp_path)
    assert CALLS == []
