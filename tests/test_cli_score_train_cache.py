"""`trl-upo score` then `trl-upo train` on the same heads and data: the policy's tokenizer keys the scores of heads
that may read it the same way in both commands, so training reuses the scores `score` cached (no head call); without
`model_name_or_path`, `score` says that training will score such heads again, and why."""

from __future__ import annotations

import pytest

from tests.test_cli_train import CPU, write_data, write_recipe
from trl_upo.cli import score as cli_score
from trl_upo.cli import train as cli_train

CALLS: list[int] = []


def count(prompts, completions, completion_ids=None, **kwargs):
    """A function head (TRL's reward-function convention) that records its calls and reads ``completion_ids``."""
    CALLS.append(len(completions))
    return [float(len(ids)) if ids is not None else float(len(c)) for c, ids in
            zip(completions, completion_ids or [None] * len(completions))]


HEADS = [{"name": "cnt", "type": "function", "params": {"function": f"{__name__}:count"}},
         {"name": "novery", "type": "lexicon", "params": {"avoid": ["very"]}}]


@pytest.fixture
def recipe(tmp_path, tiny_model_path, score_cache):
    CALLS.clear()
    data = write_data(tmp_path / "data", n_train=8, n_test=4)
    return write_recipe(tmp_path / "r.yaml", model_name_or_path=tiny_model_path, dataset_name=str(data),
                        output_dir=str(tmp_path / "out"), reward_heads=HEADS, upo_score_cache_dir=score_cache,
                        max_steps=1, per_device_train_batch_size=4, **CPU)


def test_train_reuses_the_scores_of_score(recipe, capsys):
    assert cli_score.main(["--config", recipe]) == 0
    assert CALLS == [8, 8, 4, 4]  # train and test splits, chosen and rejected
    assert "note:" not in capsys.readouterr().err
    CALLS.clear()
    assert cli_train.main(["--config", recipe]) == 0
    assert CALLS == []  # every score came from score's cache


def test_score_without_a_model_says_train_scores_again(recipe, capsys):
    assert cli_score.main(["--config", recipe, "--model_name_or_path", ""]) == 0
    err = capsys.readouterr().err
    assert "reward head(s) ['cnt'] may read the policy's tokenizer" in err  # not the lexicon head: it never reads it
    assert "Give the recipe's model_name_or_path" in err


def test_a_null_response_names_its_row_before_scoring(tmp_path, score_cache, capsys):
    import json

    CALLS.clear()
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": "p", "chosen": " a", "rejected": " b"}] * 2 + [{"prompt": "p", "chosen": None, "rejected": " b"}]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(tmp_path / "r.yaml", dataset_name=str(data), output_dir=str(tmp_path / "unused"),
                          reward_heads=HEADS, upo_score_cache_dir=score_cache, **CPU)
    assert cli_score.main(["--config", recipe]) == 2
    assert "Row 2 of the train dataset has no 'chosen' (null)" in capsys.readouterr().err
    assert CALLS == []
