"""Unpaired output of the data builders (for KTO) and the unpaired evaluation metrics."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from trl_upo.data import OutputSettings, RankConfig, build_rank_pairs, unpair_rows
from trl_upo.evaluation import unpaired_metrics, unpaired_rows

NOVERY = {"name": "novery", "type": "lexicon", "params": {"avoid": ["very"]}}
SHORT = {"name": "short", "type": "length", "weight": 0.5}


def test_unpair_rows_hand_example():
    pairs = [
        {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 1.0, "score_rejected": 0.0, "id": 7},
        {"prompt": "p", "chosen": "a", "rejected": "c", "score_chosen": 1.0, "score_rejected": -1.0, "id": 8},
    ]
    assert unpair_rows(pairs) == [
        {"prompt": "p", "id": 7, "completion": "a", "label": True, "score_completion": 1.0},
        {"prompt": "p", "id": 7, "completion": "b", "label": False, "score_completion": 0.0},
        # "a" was already a desirable row: not repeated
        {"prompt": "p", "id": 8, "completion": "c", "label": False, "score_completion": -1.0},
    ]
    with pytest.raises(ValueError, match="needs pairs with 'chosen' and 'rejected'"):
        unpair_rows([{"prompt": "p", "completion": "a", "label": True}])


def test_rank_builder_writes_unpaired_rows(tmp_path):
    ds = Dataset.from_list(
        [
            {"prompt": "p0", "cands": [" a very long answer here", " short", " very very"], "src": "x"},
            {"prompt": "p1", "cands": [" one two", " one two three"], "src": "y"},
        ]
    )
    cfg = RankConfig(reward_heads=[NOVERY, SHORT], candidates_column="cands", batch_size=1)
    path = tmp_path / "rows.jsonl"
    out = build_rank_pairs(ds, cfg, OutputSettings(str(path), progress=False, unpaired=True))
    # best answers desirable, worst undesirable; the per-head scores follow their completion
    assert out["completion"] == [" short", " a very long answer here", " one two", " one two three"]
    assert out["label"] == [True, False, True, False]
    assert out["score_novery_completion"] == [0.0, -1.0, 0.0, 0.0]
    assert out["src"] == ["x", "x", "y", "y"]
    assert [json.loads(line)["label"] for line in path.read_text().splitlines()] == [True, False, True, False]


def test_rank_builder_unpaired_rejects_a_label_column_before_scoring(tmp_path):
    ds = Dataset.from_list([{"prompt": "p0", "cands": [" a", " b c"], "label": "x"}])
    cfg = RankConfig(reward_heads=[NOVERY, SHORT], candidates_column="cands", batch_size=1)
    with pytest.raises(ValueError, match=r"column\(s\) \['label'\]"):
        build_rank_pairs(ds, cfg, OutputSettings(str(tmp_path / "o.jsonl"), progress=False, unpaired=True))


def test_unpaired_metrics_hand_checked(tiny_model_path):
    """The policy is its own reference: every reward is 0, so both accuracies are 0.5 (ties count half); with no
    reference the log-probabilities decide."""
    rows = [{"prompt": "tell me about cats answer", "completion": " cats purr", "label": True},
            {"prompt": "tell me about cats answer", "completion": " dogs bark loudly today", "label": False}]
    same = unpaired_metrics(tiny_model_path, None, rows, ref_model=tiny_model_path)
    assert (same["accuracy"], same["ranking_accuracy"], same["n_desirable"]) == (0.5, 0.5, 1)
    pairs = [{"prompt": "tell me about cats answer", "chosen": " cats purr", "rejected": " dogs bark loudly today"}]
    assert unpaired_rows(pairs) == rows
    with pytest.raises(ValueError, match="labels must be True"):
        unpaired_metrics(tiny_model_path, None, [dict(rows[0], label=1)])


def test_evaluate_policy_measures_unpaired_rows(tiny_model_path):
    from trl_upo.evaluation import evaluate_policy

    rows = [{"prompt": "tell me about cats answer", "completion": " cats purr", "label": True},
            {"prompt": "tell me about cats answer", "completion": " dogs bark", "label": False}]
    result = evaluate_policy(tiny_model_path, prompts=["tell me about cats answer"], unpaired=rows,
                             ref_model=tiny_model_path, max_new_tokens=2)
    assert result["unpaired"]["ranking_accuracy"] == 0.5 and result["unpaired"]["reference"] == "ref_model"
    assert "unpaired" not in evaluate_policy(tiny_model_path, prompts=["tell me about cats answer"], max_new_tokens=2)
