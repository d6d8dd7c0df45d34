"""`trl-upo score`: per-head summary of a preference dataset (numbers checked against the data), the score cache,
the saved scored dataset, and strict errors."""

from __future__ import annotations

import json

import pytest

from tests.test_cli_train import CPU, write_data, write_recipe
from trl_upo.cli import score as cli_score

HEADS = [
    {"name": "novery", "type": "lexicon", "params": {"avoid": ["very"], "mode": "presence"}},
    {"name": "words", "type": "length", "params": {"unit": "words", "direction": "longer"}},
]


@pytest.fixture
def recipe_path(tmp_path, score_cache):
    data = write_data(tmp_path / "data", n_train=24, n_test=8)
    return write_recipe(
        tmp_path / "r.yaml", dataset_name=str(data), output_dir=str(tmp_path / "unused"), **CPU,
        reward_heads=HEADS, upo_score_cache_dir=score_cache, num_processes=2,
    )


def test_summary_matches_the_data_and_the_cache_is_reused(tmp_path, recipe_path, capsys):
    out_dir = tmp_path / "scored"
    assert cli_score.main(["--config", recipe_path, "--output", str(out_dir)]) == 0
    out, err = capsys.readouterr()
    assert "train split (24 pairs)" in out and "test split (8 pairs)" in out
    assert "launch options (num_processes) are ignored" in err
    rows = [json.loads(line) for line in (out_dir / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    # Hand check from the rows themselves: lexicon presence is -1 with "very", else 0; length counts words.
    for r in rows:
        assert r["upo_novery_chosen"] == (-1.0 if "very" in r["chosen"].split() else 0.0)
        assert r["upo_words_chosen"] == len(r["chosen"].split())
    diffs = [r["upo_novery_chosen"] - r["upo_novery_rejected"] for r in rows]
    decided = [d for d in diffs if d != 0]
    summary = json.loads((out_dir / "summary.json").read_text())["splits"]["train"]
    assert summary["novery"]["agree"] == pytest.approx(sum(d > 0 for d in decided) / len(decided))
    assert summary["novery"]["ties"] == pytest.approx(diffs.count(0) / len(diffs))
    pooled = [r[f"upo_words_{k}"] for r in rows for k in ("chosen", "rejected")]
    assert summary["words"]["mean"] == pytest.approx(sum(pooled) / len(pooled))
    assert (summary["words"]["min"], summary["words"]["max"]) == (min(pooled), max(pooled))
    assert out.count("scored") >= 4
    # A second run reads every score from the cache.
    assert cli_score.main(["--config", recipe_path]) == 0
    out2 = capsys.readouterr().out
    assert out2.count(" cached") == 4 and " scored" not in out2


def test_higher_is_better_false_flips_agreement(tmp_path, recipe_path, capsys):
    flipped = json.dumps([{**HEADS[0], "higher_is_better": False}])
    assert cli_score.main(["--config", recipe_path, "--reward_heads", flipped, "--output", str(tmp_path / "a")]) == 0
    assert cli_score.main(["--config", recipe_path, "--reward_heads", json.dumps(HEADS[:1]),
                           "--output", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "summary.json").read_text())["splits"]["train"]["novery"]["agree"]
    b = json.loads((tmp_path / "b" / "summary.json").read_text())["splits"]["train"]["novery"]["agree"]
    assert a == pytest.approx(1 - b)


def test_errors(tmp_path, recipe_path, capsys):
    assert cli_score.main(["--config", recipe_path, "--reward_heads", "[]"]) == 2
    assert "no reward heads" in capsys.readouterr().err
    assert cli_score.main(["--config", recipe_path, "--ouptut", "x"]) == 2
    assert "did you mean `output`?" in capsys.readouterr().err
