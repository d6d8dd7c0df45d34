"""`trl-upo score`: per-head summary of a preference dataset (numbers checked against the data), the score cache,
the saved scored dataset, and strict errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT
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
        reward_heads=HEADS, upo_score_cache_dir=score_cache,
    )


def test_summary_matches_the_data_and_the_cache_is_reused(tmp_path, recipe_path, capsys):
    out_dir = tmp_path / "scored"
    assert cli_score.main(["--config", recipe_path, "--output", str(out_dir)]) == 0
    out, err = capsys.readouterr()
    assert "train split (24 pairs)" in out and "test split (8 pairs)" in out
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


def test_one_process_says_it_ignores_launch_options(recipe_path, capsys):
    assert cli_score.main(["--config", recipe_path, "--num_processes", "1", "--mixed_precision", "no"]) == 0
    assert "launch options (num_processes, mixed_precision) are ignored" in capsys.readouterr().err


def test_errors(tmp_path, recipe_path, capsys):
    assert cli_score.main(["--config", recipe_path, "--reward_heads", "[]"]) == 2
    assert "no reward heads" in capsys.readouterr().err
    assert cli_score.main(["--config", recipe_path, "--ouptut", "x"]) == 2
    assert "did you mean `output`?" in capsys.readouterr().err


def test_help_lists_only_what_scoring_reads(capsys):
    assert cli_score.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--output" in out and "--reward_heads" in out and "--num_processes" in out
    assert "--learning_rate" not in out and "--per_device_train_batch_size" not in out
    assert len(out.splitlines()) < 100


def test_an_output_that_cannot_be_written_fails_before_scoring(tmp_path, recipe_path, score_cache, capsys):
    target = tmp_path / "taken"
    target.write_text("a file")
    assert cli_score.main(["--config", recipe_path, "--output", str(target)]) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "it is a file, not a directory" in err
    assert not os.path.exists(score_cache)  # nothing was scored


def test_tokens_without_a_tokenizer_is_a_usage_error(recipe_path, score_cache, capsys):
    heads = json.dumps([{"name": "toks", "type": "length", "params": {"unit": "tokens"}}])
    assert cli_score.main(["--config", recipe_path, "--reward_heads", heads]) == 2
    err = capsys.readouterr().err
    assert "model_name_or_path" in err and "processing_class" not in err
    assert not os.path.exists(score_cache)


def test_tokens_with_the_policy_tokenizer(recipe_path, tiny_model_path, tmp_path, capsys):
    heads = json.dumps([{"name": "toks", "type": "length", "params": {"unit": "tokens", "direction": "longer"}}])
    out_dir = tmp_path / "t"
    assert cli_score.main(["--config", recipe_path, "--reward_heads", heads, "--model_name_or_path", tiny_model_path,
                           "--output", str(out_dir)]) == 0
    rows = [json.loads(line) for line in (out_dir / "train.jsonl").read_text().splitlines()]
    assert all(r["upo_toks_chosen"] >= 1 for r in rows)


def test_a_scored_output_trains_without_loading_the_head_model(tmp_path, tiny_classifier_path, tiny_model_path,
                                                                score_cache, monkeypatch, capsys):
    from trl_upo.data.loading import load_splits
    from trl_upo.heads import build_head, parse_head_specs
    from trl_upo.heads._hf import HFSequenceClassifierHead
    from trl_upo.scoring import score_dataset

    heads = [{"name": "pos", "type": "classifier",
              "params": {"model": tiny_classifier_path, "labels": "positive", "device": "cpu"}}]
    data = write_data(tmp_path / "data", n_train=12, n_test=4)
    recipe = write_recipe(tmp_path / "r.yaml", dataset_name=str(data), output_dir=str(tmp_path / "unused"), **CPU,
                          reward_heads=heads, upo_score_cache_dir=score_cache)
    out_dir = tmp_path / "scored"
    assert cli_score.main(["--config", recipe, "--output", str(out_dir)]) == 0
    splits = load_splits(str(out_dir))
    assert sorted(splits) == ["test", "train"]

    def no_loading(self):
        raise AssertionError("a head model was loaded")

    monkeypatch.setattr(HFSequenceClassifierHead, "load", no_loading)
    specs = parse_head_specs([{**heads[0], "params": {**heads[0]["params"], "batch_size": 2}}])  # speed only
    scored, report = score_dataset(splits["train"], [build_head(s) for s in specs], specs, split="train",
                                   use_cache=False)
    assert report.status == {"pos": "recorded"}
    assert scored["upo_pos_chosen"] == splits["train"]["upo_pos_chosen"]
    # The trainer (which passes the policy's tokenizer: model heads do not read it) loads no head model either.
    from tests.helpers import cpu_args
    from trl_upo import UPOTrainer

    trainer = UPOTrainer(model=tiny_model_path, args=cpu_args(tmp_path / "run", reward_heads=heads,
                                                              upo_use_score_cache=False),
                         train_dataset=splits["train"], eval_dataset=splits["test"])
    assert trainer.upo.score_report == {"train": {"pos": "recorded"}, "eval": {"pos": "recorded"}}


def _cli(args, cwd):
    exe = shutil.which("trl-upo", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "trl_upo.cli"]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("TRL_UPO_LAUNCHED", None)
    proc = subprocess.run([*cmd, "score", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_several_processes_relaunch_this_module_through_the_shared_launcher(recipe_path, monkeypatch, capsys):
    """`--num_processes 2` goes through trl_upo.cli.launch.relaunch with the score module: launch options out of the
    script's arguments, the launched processes marked so that they score instead of launching again."""
    from trl_upo.cli import launch

    calls = []
    monkeypatch.delenv(launch.LAUNCHED_ENV, raising=False)
    for name in ("ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_MIXED_PRECISION", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(launch, "run_process_tree", lambda cmd, env, prog=None: calls.append((cmd, env)) or 7)
    assert cli_score.main(["--config", recipe_path, "--num_processes", "2"]) == 7  # the launcher's exit code
    ((cmd, env),) = calls
    module_at = cmd.index("-m", 3)
    assert cmd[module_at + 1] == cli_score.SCORE_MODULE == "trl_upo.cli.score"
    assert cmd[3:module_at][:3] == ["--num_processes", "2", "--multi_gpu"]
    assert "--num_processes" not in cmd[module_at:] and cmd[module_at + 2:module_at + 4] == ["--config", recipe_path]
    assert env[launch.LAUNCHED_ENV] == "1"
    assert "launching: accelerate launch --num_processes 2" in capsys.readouterr().out


@pytest.mark.slow
def test_two_processes_write_the_scores_of_one(tmp_path, recipe_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _cli(["--config", recipe_path, "--output", str(one), "--upo_use_score_cache", "false"], tmp_path)
    out = _cli(["--config", recipe_path, "--output", str(two), "--upo_use_score_cache", "false",
                "--num_processes", "2"], tmp_path)
    assert "accelerate launch --num_processes 2 --multi_gpu" in out
    assert out.count("train split (24 pairs)") == 1 and out.count("seconds per head") == 2  # the main process prints
    for split in ("train", "test"):
        assert (one / f"{split}.jsonl").read_text() == (two / f"{split}.jsonl").read_text()


def test_unpaired_rows_are_scored_per_completion(tmp_path, score_cache, capsys):
    rows = [{"prompt": f"p{i}", "completion": " ".join(["w"] * (i + 1)), "label": i % 2 == 0} for i in range(6)]
    data = tmp_path / "kto"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(tmp_path / "k.yaml", dataset_name=str(data), output_dir=str(tmp_path / "unused"), **CPU,
                          trainer="kto", reward_heads=[HEADS[1]], upo_score_cache_dir=score_cache)
    assert cli_score.main(["--config", recipe, "--output", str(tmp_path / "out")]) == 0
    assert "train split (6 rows)" in capsys.readouterr().out
    scored = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert [r["upo_words_completion"] for r in scored] == [float(i + 1) for i in range(6)]
