"""Every mistake a user can fix gets exit code 2 and one message naming the problem and the fix, before anything
heavy runs; ``--debug`` / ``TRL_UPO_DEBUG=1`` adds the traceback; internal errors keep theirs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.test_cli_train import run_main, write_data, write_recipe
from trl_upo.cli import main as cli_main
from trl_upo.cli.common import run_command


@pytest.fixture
def recipe(tmp_path, tiny_model_path, score_cache):
    from tests.test_cli_train import CPU

    data = write_data(tmp_path / "data", n_train=8, n_test=4)
    return dict(model_name_or_path=tiny_model_path, dataset_name=str(data), output_dir=str(tmp_path / "out"), **CPU,
                per_device_train_batch_size=4, max_steps=1, reward_heads=[{"name": "length"}],
                upo_score_cache_dir=score_cache)


def _never_scores(monkeypatch):
    """Fail the test if scoring starts (the checks must come first)."""
    import trl_upo.scoring as scoring

    def forbidden(*a, **k):
        raise AssertionError("scoring started before the check")

    monkeypatch.setattr(scoring, "score_dataset", forbidden)


def test_missing_local_model_path_names_the_path_not_a_repo_id(tmp_path, recipe, capsys):
    recipe["model_name_or_path"] = str(tmp_path / "no-such-model")
    code, _, err = run_main(["--config", write_recipe(tmp_path / "r.yaml", **recipe)], capsys)
    assert code == 2
    assert "no-such-model' does not exist" in err and "Repo id" not in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["file", "under_a_file"])
def test_output_dir_that_is_a_file_fails_before_scoring(tmp_path, recipe, capsys, monkeypatch, kind):
    _never_scores(monkeypatch)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    recipe["output_dir"] = str(blocker if kind == "file" else blocker / "out")
    code, _, err = run_main(["--config", write_recipe(tmp_path / "r.yaml", **recipe)], capsys)
    assert code == 2
    assert ("is a file, not a directory" if kind == "file" else "which is a file") in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_output_dir_not_writable_fails_before_scoring(tmp_path, recipe, capsys, monkeypatch):
    _never_scores(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    recipe["output_dir"] = str(locked / "out")
    code, _, err = run_main(["--config", write_recipe(tmp_path / "r.yaml", **recipe)], capsys)
    assert code == 2 and "is not writable" in err


def test_resume_true_without_checkpoints_says_where_it_looked(tmp_path, recipe, capsys, monkeypatch):
    _never_scores(monkeypatch)
    path = write_recipe(tmp_path / "r.yaml", **recipe)
    code, _, err = run_main(["--config", path, "--resume_from_checkpoint", "true"], capsys)
    assert code == 2
    assert "last checkpoint-* in output_dir" in err and "there is none" in err and "upo_state.json" not in err


def test_resume_true_picks_the_last_checkpoint(tmp_path):
    from trl_upo.cli.checks import resolve_resume

    for step in (2, 10, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")  # a finished save writes it
    assert resolve_resume("true", str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert resolve_resume(True, str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert resolve_resume("false", str(tmp_path)) is None


@pytest.mark.parametrize("content,expected", [
    ("", "is empty"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
     '{"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}], '
     '"rejected": [{"role": "assistant", "content": "c"}]}\n', "mixes formats (row 0 is string, row 1 is messages)"),
])
def test_empty_and_mixed_format_files(tmp_path, recipe, capsys, content, expected):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    recipe["dataset_name"] = str(data)
    code, _, err = run_main(["--config", write_recipe(tmp_path / "r.yaml", **recipe)], capsys)
    assert code == 2 and expected in err and "Traceback" not in err


def test_debug_prints_the_traceback_of_a_usage_error(capsys, monkeypatch):
    from trl_upo.cli.common import UsageError

    def body():
        raise UsageError("bad thing: do the other thing.")

    assert run_command("trl-upo x", body) == 2
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.setenv("TRL_UPO_DEBUG", "1")
    assert run_command("trl-upo x", body) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith("trl-upo x: error: bad thing: do the other thing.")


def test_debug_flag_anywhere_sets_debug_mode(monkeypatch, capsys):
    monkeypatch.setenv("TRL_UPO_DEBUG", "0")  # restored (removed) after the test, whatever the command sets
    assert cli_main(["--debug", "--version"]) == 0
    assert os.environ["TRL_UPO_DEBUG"] == "1"


def test_internal_errors_keep_their_traceback():
    def body():
        raise KeyError("internal")

    with pytest.raises(KeyError):
        run_command("trl-upo x", body)


def test_function_module_in_the_current_directory_imports_from_the_console_script(tmp_path):
    """A console script starts with its own directory on sys.path, not the current directory: a module next to the
    recipe is imported explicitly (trl_upo.heads.dotted), without the command putting the directory first."""
    module = "def brevity(completions, **kw):\n    return [0.0] * len(completions)\n"
    (tmp_path / "my_rewards_cwd.py").write_text(module)
    code = (
        "import sys\n"
        "sys.path[:] = [p for p in sys.path if p not in ('', %r)]\n"
        "from trl_upo.heads.registry import import_dotted\n"
        "print(import_dotted('my_rewards_cwd:brevity').__name__)\n"
    ) % str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "brevity"


def test_eval_without_pairs_says_preference_metrics_are_skipped(tmp_path, tiny_model_path, capsys):
    from trl_upo.cli import eval as cli_eval

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"tell me about cats {i}"}) + "\n" for i in range(3)))
    code = cli_eval.main(["--model", tiny_model_path, "--dataset", str(data), "--split", "train", "--output_dir",
                          str(tmp_path / "ev"), "--heads", '[{"name": "length"}]', "--num_prompts", "2",
                          "--max_new_tokens", "4", "--no_plots"], prog="trl-upo eval")
    err = capsys.readouterr().err
    assert code == 0
    assert "preference metrics skipped: the dataset has neither `chosen` and `rejected` columns" in err
    assert "Skipped:" in (tmp_path / "ev" / "report.md").read_text()


def test_eval_missing_model_path(tmp_path, capsys):
    from trl_upo.cli import eval as cli_eval

    code = cli_eval.main(["--model", str(tmp_path / "nope"), "--dataset", "upo://quickstart-data", "--output_dir",
                          str(tmp_path / "ev"), "--no_plots"], prog="trl-upo eval")
    assert code == 2 and "nope' does not exist" in capsys.readouterr().err


def test_output_dir_not_writable_message(tmp_path, monkeypatch):
    """The not-writable branch, also where the tests run as root (which may write anywhere): `os.access` says no."""
    from trl_upo.cli.checks import check_output_dir
    from trl_upo.cli.common import UsageError

    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: os.fspath(path) != str(locked))
    with pytest.raises(UsageError, match="cannot be created: .*locked' is not writable"):
        check_output_dir(str(locked / "run"))
    with pytest.raises(UsageError, match="'.*locked' is not writable: choose a directory"):
        check_output_dir(str(locked))


def test_bf16_on_a_cpu_machine_says_how_to_turn_it_off(tmp_path, recipe, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    recipe.update(bf16=True, use_cpu=False)
    code, _, err = run_main(["--config", write_recipe(tmp_path / "r.yaml", **recipe)], capsys)
    assert code == 2 and "set `bf16: false` and `use_cpu: true`" in err
