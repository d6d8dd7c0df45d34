"""examples/frontier_sweep.py in a tiny mode: two configurations, a few steps, one seed; results, table and plots
are written, a second run resumes instead of retraining, and an unknown configuration is refused."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import load_script


def _load_sweep():
    return load_script("examples/frontier_sweep.py")


TINY = ["--steps", "3", "--sft-steps", "3", "--n-train", "32", "--n-eval-prompts", "4", "--n-eval-pairs", "4",
        "--num-samples", "1", "--seeds", "0"]


def test_tiny_sweep_writes_results_table_and_plots(tmp_path, capsys):
    sweep = _load_sweep()
    out = str(tmp_path / "frontier")
    argv = ["--task", "length", "--configs", "dpo,upo-a1", "--output-dir", out, *TINY]
    assert sweep.main(argv) == 0
    task_dir = os.path.join(out, "length")
    with open(os.path.join(task_dir, "results.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["config"] for r in rows] == ["start", "dpo", "upo-a1"]
    for r in rows:
        assert set(r["designer"]) == {"words", "on_topic"} and r["designer"]["words"]["n"] == 4
        assert r["preference"]["n"] == 4 and r["preference"]["reference"] == "ref_model"
    assert rows[0]["preference"]["accuracy"] == 0.5  # the start is its own reference: every pair ties
    table = open(os.path.join(task_dir, "table.md")).read()
    assert "| upo-a1 | 1 |" in table and "words (lower)" in table
    for name in ("frontier_words.png", "frontier_on_topic.png"):
        assert open(os.path.join(task_dir, name), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert sweep.main(argv) == 0  # everything is done: nothing is trained again
    assert "seed 0" not in capsys.readouterr().out
    with open(os.path.join(task_dir, "results.jsonl")) as f:
        assert len(f.readlines()) == 3


def test_unknown_config_is_refused(capsys):
    sweep = _load_sweep()
    with pytest.raises(SystemExit) as e:
        sweep.main(["--configs", "dpo,upo-a2"])
    assert e.value.code == 2
    assert "unknown config(s) 'upo-a2' (did you mean" in capsys.readouterr().err


def test_tiny_kto_sweep_writes_results_and_table(tmp_path, capsys):
    """examples/kto_sweep.py: the same tasks in unpaired form (each pair a desirable and an undesirable row), KTO and
    UPO-KTO from the same start; a second run resumes."""
    sweep = load_script("examples/kto_sweep.py")
    rows = sweep.unpair([{"prompt": "p", "chosen": " a", "rejected": " b"}], seed=0)
    assert sorted((r["completion"], r["label"]) for r in rows) == [(" a", True), (" b", False)]
    out = str(tmp_path / "kto")
    argv = ["--task", "very", "--configs", "kto,upo-kto-a1", "--output-dir", out, *TINY]
    argv[argv.index("--n-eval-pairs") + 1] = "4"
    assert sweep.main(argv) == 0
    with open(os.path.join(out, "very", "results.jsonl")) as f:
        results = [json.loads(line) for line in f]
    assert [r["config"] for r in results] == ["kto", "upo-kto-a1"]
    for r in results:
        assert r["unpaired"]["n_desirable"] == r["unpaired"]["n_undesirable"] == 4
        assert set(r["designer"]) == {"very_rate", "on_topic"}
    table = open(os.path.join(out, "very", "table.md")).read()
    assert "| upo-kto-a1 | 1 |" in table and "Δ very_rate vs KTO" in table
    capsys.readouterr()
    assert sweep.main(argv) == 0
    assert "seed 0" not in capsys.readouterr().out
