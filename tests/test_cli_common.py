"""Fixes of the `trl-upo` command from a review: checks before the re-launch, `~` in paths where they are used, our
`--debug` next to TrainingArguments' `debug`, eval reading `reward_funcs`, `upo://` inside a `--reward_heads` flag,
`--help` of a KTO recipe, usage errors narrowed to the user's mistakes, and the accelerate configs `--help` names."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from tests.test_cli_train import CPU, write_data, write_recipe
from trl_upo.cli import launch as cli_launch
from trl_upo.cli import main as cli
from trl_upo.cli import pop_debug
from trl_upo.cli import train as cli_train
from trl_upo.resources import RESOURCES_DIR

LAUNCH_ENV = ("TRL_UPO_LAUNCHED", "ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_MIXED_PRECISION", "LOCAL_RANK",
              "TORCHELASTIC_RUN_ID")
HEADS = [{"name": "words", "type": "length", "params": {"unit": "words", "direction": "longer"}}]


@pytest.fixture
def no_launcher(monkeypatch):
    """Outside any launcher; `subprocess.call` of the re-launch recorded instead of run."""
    for key in LAUNCH_ENV:
        monkeypatch.delenv(key, raising=False)
    calls = []
    monkeypatch.setattr(cli_launch.subprocess, "call", lambda cmd, env: calls.append(cmd) or 0)
    return calls


@pytest.fixture
def home(tmp_path, monkeypatch):
    """HOME is a temporary directory; the current directory another one (a literal `./~` would show there)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path / "home"


def _recipe(tmp_path, score_cache, **fields) -> str:
    data = write_data(tmp_path / "data", n_train=8, n_test=4)
    base = dict(dataset_name=str(data), output_dir=str(tmp_path / "out"), **CPU, reward_heads=HEADS,
                upo_score_cache_dir=score_cache)
    return write_recipe(tmp_path / "r.yaml", **{**base, **fields})


# 1. pre-flight checks before the re-launch ------------------------------------------------------------------------


def test_a_usage_error_with_num_processes_is_one_message_before_the_relaunch(tmp_path, score_cache, no_launcher,
                                                                             capsys):
    path = _recipe(tmp_path, score_cache, model_name_or_path="./nope")
    code = cli_train.main(["--config", path, "--num_processes", "2"], prog="trl-upo train")
    err = capsys.readouterr().err
    assert code == 2 and no_launcher == []
    assert err.count("`model_name_or_path` './nope' does not exist") == 1


def test_score_checks_the_model_path_before_the_relaunch(tmp_path, score_cache, no_launcher, capsys):
    from trl_upo.cli import score as cli_score

    path = _recipe(tmp_path, score_cache)
    code = cli_score.main(["--config", path, "--model_name_or_path", "./nope", "--num_processes", "2"])
    assert code == 2 and no_launcher == []
    assert "`model_name_or_path` './nope' does not exist" in capsys.readouterr().err


# 2. `~` expanded where the paths are used ------------------------------------------------------------------------


def test_tilde_in_dataset_model_and_output_of_score(tmp_path, home, tiny_model_path, score_cache, capsys):
    from trl_upo.cli import score as cli_score

    write_data(home / "d", n_train=6, n_test=2)
    os.symlink(tiny_model_path, home / "tl")
    argv = ["--dataset_name=~/d", "--model_name_or_path=~/tl", "--output=~/scored", "--reward_heads",
            json.dumps([{"name": "toks", "type": "length", "params": {"unit": "tokens"}}]),
            "--upo_score_cache_dir", score_cache, "--use_cpu", "true"]
    code = cli_score.main(argv)
    assert code == 0, capsys.readouterr().err[-2000:]
    assert (home / "scored" / "train.jsonl").is_file() and not (tmp_path / "cwd" / "~").exists()


def test_tilde_in_train_model_and_output_dir(tmp_path, home, tiny_model_path, score_cache):
    from trl_upo.cli.checks import preflight

    os.symlink(tiny_model_path, home / "tl")
    path = _recipe(tmp_path, score_cache)
    script_args, training_args, model_args, *_ = cli_train.parse(
        ["--config", path, "--model_name_or_path=~/tl", "--output_dir=~/runs/x"])
    preflight(script_args, training_args, model_args)
    assert model_args.model_name_or_path == str(home / "tl")
    assert training_args.output_dir == str(home / "runs" / "x")


def test_tilde_in_the_dataset_loader_and_eval_paths(home):
    from trl_upo.cli.eval import parse_args
    from trl_upo.data.loading import load_splits

    write_data(home / "d", n_train=3, n_test=2)
    assert load_splits("~/d")["train"].num_rows == 3
    args = parse_args(["--model=~/m", "--dataset=~/d/test.jsonl", "--output_dir=~/ev", "--ref_model=~/r"], "e")
    assert (args.model, args.ref_model, args.output_dir) == (str(home / "m"), str(home / "r"), str(home / "ev"))
    assert args.dataset == str(home / "d" / "test.jsonl")


# 3. `--debug` (ours, no value) and `--debug VALUE` (TrainingArguments) -------------------------------------------


def test_pop_debug_takes_only_a_debug_without_a_value(monkeypatch):
    monkeypatch.setenv("TRL_UPO_DEBUG", "0")
    assert pop_debug(["train", "--debug", "underflow_overflow"]) == ["train", "--debug", "underflow_overflow"]
    assert pop_debug(["train", "--debug=underflow_overflow"]) == ["train", "--debug=underflow_overflow"]
    assert os.environ["TRL_UPO_DEBUG"] == "0"
    assert pop_debug(["train", "--debug", "--config", "r.yaml"]) == ["train", "--config", "r.yaml"]
    assert os.environ["TRL_UPO_DEBUG"] == "1"
    assert pop_debug(["train", "--config", "r.yaml", "--debug"]) == ["train", "--config", "r.yaml"]
    assert pop_debug(["--debug", "train", "--x"], commands=("train",)) == ["train", "--x"]


def test_debug_with_a_value_reaches_training_arguments(tmp_path, score_cache, tiny_model_path, monkeypatch):
    monkeypatch.setenv("TRL_UPO_DEBUG", "0")
    seen = {}
    monkeypatch.setattr(cli_train, "train", lambda s, t, m, d: seen.update(debug=t.debug))
    path = _recipe(tmp_path, score_cache, model_name_or_path=tiny_model_path)
    assert cli(["train", "--config", path, "--debug", "underflow_overflow"]) == 0
    assert [str(getattr(d, "value", d)) for d in seen["debug"]] == ["underflow_overflow"]
    assert os.environ["TRL_UPO_DEBUG"] == "0"


def test_module_entry_point_takes_our_debug(tmp_path, score_cache):
    path = _recipe(tmp_path, score_cache, model_name_or_path="./nope")
    env = {**os.environ, "TRL_UPO_DEBUG": "0"}
    for key in LAUNCH_ENV:
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "trl_upo.cli.train", "--config", path, "--debug"], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "expected at least one argument" not in proc.stderr
    assert "Traceback" in proc.stderr and "'./nope' does not exist" in proc.stderr


def test_train_help_says_which_debug_is_which(capsys):
    assert cli_train.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--debug                (no value) print the traceback" in out
    assert "`--debug VALUE` (e.g. underflow_overflow) is transformers' `debug` option" in out


# 4. eval reads reward_funcs / reward_weights ---------------------------------------------------------------------


def test_eval_builds_heads_from_reward_funcs_as_train_does(tmp_path):
    from trl_upo.cli.eval import CONFIG_KEYS, read_heads
    from trl_upo.cli.rewards import reward_func_heads

    config = write_recipe(tmp_path / "r.yaml", reward_funcs=["think_format_reward"], reward_weights=[0.5], beta=0.2,
                          learning_rate=1e-3)
    heads, used, unused = read_heads(None, config)
    expected = reward_func_heads(["think_format_reward"], [0.5])
    assert [(h["name"], h["type"], h["weight"]) for h in heads] == [("think_format_reward", "function", 0.5)]
    assert [(h["name"], h["weight"]) for h in heads] == [(h["name"], h["weight"]) for h in expected]
    assert used["beta"] == 0.2 and unused == ["learning_rate"]
    assert {"reward_funcs", "reward_weights"} <= set(CONFIG_KEYS)


def test_eval_runs_a_recipe_with_reward_funcs(tiny_model_path, tmp_path, capsys, monkeypatch):
    data = write_data(tmp_path / "data", n_train=2, n_test=2)
    (tmp_path / "review_rewards.py").write_text(
        "def brevity(completions, **kwargs):\n    return [-float(len(c)) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = write_recipe(tmp_path / "r.yaml", reward_funcs=["review_rewards.brevity"], learning_rate=1e-3)
    rc = cli(["eval", "--model", tiny_model_path, "--dataset", str(data / "test.jsonl"), "--config", config,
              "--output_dir", str(tmp_path / "ev"), "--num_prompts", "2", "--max_new_tokens", "2", "--no_plots"])
    err = capsys.readouterr().err
    assert rc == 0, err[-2000:]
    assert "eval reads reward_heads and reward_funcs from it" in err
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert "brevity" in json.dumps(result["designer"])


def test_eval_config_without_heads_or_funcs_and_bad_heads_json(tmp_path, capsys):
    from trl_upo.cli.common import UsageError
    from trl_upo.cli.eval import read_heads

    with pytest.raises(UsageError, match="has no reward_heads or reward_funcs"):
        read_heads(None, write_recipe(tmp_path / "a.yaml", learning_rate=1e-3))
    with pytest.raises(UsageError, match="reward_heads is a string that is not valid JSON"):
        read_heads(None, write_recipe(tmp_path / "b.yaml", reward_heads="[{name: x"))


# 5. upo:// inside a --reward_heads JSON flag ----------------------------------------------------------------------


def test_upo_names_inside_a_reward_heads_flag_are_resolved(tmp_path, score_cache):
    path = _recipe(tmp_path, score_cache, model_name_or_path="upo://tiny-llama")
    heads = [{"name": "rm", "type": "reward_model", "params": {"model": "upo://tiny-llama"}}]
    _, training_args, *_ = cli_train.parse(["--config", path, "--reward_heads", json.dumps(heads)])
    assert training_args.head_specs[0].params["model"] == str(RESOURCES_DIR / "tiny-llama")


# 6. --help of a KTO recipe ---------------------------------------------------------------------------------------


def test_help_of_a_kto_recipe_lists_upokto_options(tmp_path, score_cache, capsys):
    path = _recipe(tmp_path, score_cache, trainer="kto")
    assert cli_train.main(["--config", path, "--help"]) == 0
    out = capsys.readouterr().out
    assert "UPOKTOConfig" in out and "--desirable_weight" in out and "UPOConfig adds" not in out


# 7. only the user's mistakes are usage errors --------------------------------------------------------------------


def test_an_internal_value_error_in_eval_keeps_its_traceback(tiny_model_path, tmp_path, monkeypatch):
    from trl_upo.cli import eval as cli_eval

    def broken(*a, **k):
        raise ValueError("internal")

    monkeypatch.setattr(cli_eval, "run", broken)
    data = write_data(tmp_path / "data", n_train=2, n_test=2)
    with pytest.raises(ValueError, match="internal"):
        cli(["eval", "--model", tiny_model_path, "--dataset", str(data / "test.jsonl"), "--output_dir",
             str(tmp_path / "ev"), "--no_plots"])


def test_build_pairs_settings_errors_are_usage_errors_and_internal_ones_are_not(tmp_path, monkeypatch, capsys):
    import trl_upo.data

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "a": "x y", "b": "x", "chosen": "old"}) + "\n"
                            for i in range(2)))
    common = ["build-pairs", "rank", "--dataset", str(data), "--candidate_columns", "a", "b", "--reward_heads",
              json.dumps(HEADS)]
    assert cli([*common, "--output", str(tmp_path / "a.jsonl")]) == 2  # the builder's own check, before building
    assert "['chosen'], which the output would overwrite" in capsys.readouterr().err
    assert cli([*common, "--remove_columns", "chosen", "--output", str(tmp_path / "a.txt")]) == 2
    assert "use a .jsonl or .parquet file, or a directory" in capsys.readouterr().err  # a settings ValueError

    def broken(*a, **k):
        raise ValueError("internal")

    monkeypatch.setattr(trl_upo.data, "build_rank_pairs", broken)
    with pytest.raises(ValueError, match="internal"):
        cli([*common, "--remove_columns", "chosen", "--output", str(tmp_path / "b.jsonl")])


# 8. accelerate configs named in --help ---------------------------------------------------------------------------


def test_help_names_only_configs_an_installed_package_resolves(tmp_path, monkeypatch):
    """From a wheel (no recipes/ next to the package) the names `--help` says ship are found; the repository-only
    ones are files in recipes/accelerate/, passed by path."""
    import re

    from trl_upo.cli.common import UsageError
    from trl_upo.cli.help import HELP_INTRO

    monkeypatch.setattr(cli_launch, "RESOURCES_DIR", tmp_path / "site-packages" / "trl_upo" / "resources")
    monkeypatch.chdir(tmp_path)
    text = " ".join(HELP_INTRO.split())
    shipped = re.search(r"ships with TRL \(([^)]*)\)", text).group(1).split(", ")
    assert {"multi_gpu", "zero3", "fsdp2"} <= set(shipped)
    for name in shipped:
        assert os.path.isfile(cli_launch.resolve_accelerate_config(name))
    for name in ("fsdp2_qlora", "multi_node_zero3"):
        assert name not in shipped and f"{name}" in text
        with pytest.raises(UsageError):
            cli_launch.resolve_accelerate_config(name)
        by_path = ROOT / "recipes" / "accelerate" / f"{name}.yaml"
        assert cli_launch.resolve_accelerate_config(str(by_path)) == str(by_path.resolve())
    assert "recipes/accelerate/ (not in the installed package): pass them by path" in text


def test_tilde_in_build_pairs_output(tmp_path, home):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "a": "x y", "b": "x"}) + "\n" for i in range(2)))
    assert cli(["build-pairs", "rank", "--dataset", str(data), "--candidate_columns", "a", "b", "--reward_heads",
                json.dumps(HEADS), "--output=~/pairs.jsonl", "--no-progress"]) == 0
    assert (home / "pairs.jsonl").is_file() and not (tmp_path / "cwd" / "~").exists()
