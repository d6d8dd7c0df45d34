"""Bad inputs listed in docs/troubleshooting.md that no other test feeds in: recipe keys that were removed upstream,
a ``resume_from_checkpoint`` path that is no directory, ``dataset_mixture`` weights and conflicts, ``reward_funcs``
misuse, and vision data or Liger with ``UPOKTOTrainer``. Each fails in the first seconds, before anything loads or
is scored, with exit code 2 (the command line) or an error naming the fix (the Python API)."""

from __future__ import annotations

import pytest
from datasets import Dataset

from tests.helpers import cpu_args
from tests.test_cli_train import run_main, write_recipe
from trl_upo.cli.common import UsageError

CPU_RECIPE = dict(use_cpu=True, bf16=False, report_to="none")


def _never_scores(monkeypatch):
    """Fail the test if scoring starts (the checks must come first)."""
    import trl_upo.scoring as scoring

    def forbidden(*a, **k):
        raise AssertionError("scoring started before the check")

    monkeypatch.setattr(scoring, "score_dataset", forbidden)


# ------------------------------------------------------------------------------------------------------------------
# The trl-upo command
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("max_prompt_length", 128, "set `max_length` (and `truncation_mode`)"),
        ("max_completion_length", 128, "truncates prompt + completion together; set `max_length`."),
        ("padding_value", 0, "pads with the tokenizer's pad token; remove the key."),
        ("use_flash_attention_2", True, "write `attn_implementation: flash_attention_2`."),
        ("overwrite_output_dir", True, "transformers 5 always writes into `output_dir`"),
        ("chat_template", "{{ messages }}", "set the template on the tokenizer you train with"),
    ],
    ids=["max_prompt_length", "max_completion_length", "padding_value", "use_flash_attention_2",
         "overwrite_output_dir", "chat_template"],
)
def test_a_removed_key_says_what_to_write_instead(tmp_path, capsys, key, value, expected):
    recipe = write_recipe(tmp_path / "r.yaml", **CPU_RECIPE, output_dir=str(tmp_path / "o"), **{key: value})
    code, _, err = run_main(["--config", recipe], capsys)
    assert code == 2
    assert f"`{key}` in the recipe" in err and "is no longer an option" in err and expected in err
    assert "did you mean" not in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["missing", "a-file"])
def test_resume_from_a_path_that_is_not_a_directory(tmp_path, tiny_model_path, capsys, monkeypatch, kind):
    _never_scores(monkeypatch)
    target = tmp_path / "checkpoint-7"
    if kind == "a-file":
        target.write_text("not a checkpoint")
    recipe = write_recipe(tmp_path / "r.yaml", **CPU_RECIPE, model_name_or_path=tiny_model_path,
                          dataset_name="upo://quickstart-data", output_dir=str(tmp_path / "out"),
                          reward_heads=[{"name": "length"}])
    code, _, err = run_main(["--config", recipe, "--resume_from_checkpoint", str(target)], capsys)
    assert code == 2
    assert f"resume_from_checkpoint {str(target)!r} is not a directory: give a checkpoint directory" in err
    assert "upo_state.json" not in err and "Traceback" not in err


@pytest.mark.parametrize("weight", [0, 1.5, "half"], ids=["zero", "above-one", "a-string"])
def test_a_mixture_weight_out_of_range(tmp_path, capsys, weight):
    recipe = write_recipe(tmp_path / "r.yaml", **CPU_RECIPE, output_dir=str(tmp_path / "o"),
                          dataset_mixture={"datasets": [{"id": "upo://quickstart-data", "weight": weight}]})
    code, _, err = run_main(["--config", recipe], capsys)
    assert code == 2
    assert f"dataset_mixture.datasets[0].weight must be a fraction in (0, 1], got {weight!r}" in err


def test_a_mixture_and_a_dataset_name_together(tmp_path, tiny_model_path, capsys, monkeypatch):
    _never_scores(monkeypatch)
    recipe = write_recipe(tmp_path / "r.yaml", **CPU_RECIPE, model_name_or_path=tiny_model_path,
                          output_dir=str(tmp_path / "o"), dataset_name="upo://quickstart-data",
                          dataset_mixture={"datasets": [{"id": "upo://quickstart-data"}]},
                          reward_heads=[{"name": "length"}])
    code, _, err = run_main(["--config", recipe], capsys)
    assert code == 2
    assert "the recipe gives dataset_mixture and dataset_name: give one way of naming the data." in err


def test_reward_weights_without_reward_funcs(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", **CPU_RECIPE, output_dir=str(tmp_path / "o"), reward_weights=[2.0])
    code, _, err = run_main(["--config", recipe], capsys)
    assert code == 2 and "reward_weights is given without reward_funcs" in err


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("get_soft_overlong_punishment(512, 64)", "give the factory's arguments by name (`name=value`)"),
        ("get_soft_overlong_punishment(max_completion_len=n)", "the arguments must be literals (numbers, strings, lists)."),
    ],
    ids=["positional", "not-a-literal"],
)
def test_a_factory_call_with_bad_arguments(entry, expected):
    from trl_upo.cli.rewards import reward_func_heads

    with pytest.raises(UsageError) as info:
        reward_func_heads([entry], None)
    assert str(info.value).startswith(f"reward_funcs entry {entry!r}: {expected}")


# ------------------------------------------------------------------------------------------------------------------
# UPOKTOTrainer
# ------------------------------------------------------------------------------------------------------------------

HEADS = [{"name": "length"}]


def test_kto_vision_data_with_heads_is_refused(tiny_model_path, tmp_path, score_cache, monkeypatch):
    from trl_upo import UPOKTOConfig, UPOKTOTrainer

    _never_scores(monkeypatch)
    data = Dataset.from_dict({"prompt": ["a", "c"], "completion": [" b", " d"], "label": [True, False],
                              "images": [[], []]})
    args = cpu_args(tmp_path, config_cls=UPOKTOConfig, reward_heads=HEADS, upo_score_cache_dir=score_cache)
    with pytest.raises(NotImplementedError, match="Reward heads on vision-language preference data are not supported"):
        UPOKTOTrainer(model=tiny_model_path, args=args, train_dataset=data)


def test_kto_liger_on_the_logits_path_is_refused(tiny_model_path, tmp_path, score_cache, monkeypatch):
    """TRL 1.9-1.14 (the logits path, forced here on newer TRL): Liger's fused KTO loss gives no per-token
    log-probabilities, so ``use_liger_kernel`` with heads fails before anything is loaded or scored."""
    from trl_upo import UPOKTOConfig, UPOKTOTrainer, compat
    from trl_upo.compat import LOGITS, TRLContractError

    _never_scores(monkeypatch)
    monkeypatch.setattr(compat, "logprob_path", lambda *a, **k: LOGITS)
    args = cpu_args(tmp_path, config_cls=UPOKTOConfig, reward_heads=HEADS, upo_score_cache_dir=score_cache)
    args.use_liger_kernel = True  # set after construction: TRL's config checks that Liger is installed
    data = Dataset.from_dict({"prompt": ["a", "c"], "completion": [" b", " d"], "label": [True, False]})
    with pytest.raises(TRLContractError, match="use_liger_kernel=True with reward heads on TRL .*Set "
                                               "use_liger_kernel=False, or upgrade to trl>=1.15.0"):
        UPOKTOTrainer(model=tiny_model_path, args=args, train_dataset=data)


@pytest.mark.parametrize(
    ("trainer", "rows", "expected"),
    [
        pytest.param("dpo", [{"prompt": "p", "completion": "c", "label": True}],
                     "train them with UPOKTOTrainer (trainer: kto in a recipe)", id="unpaired-rows-to-dpo"),
        pytest.param("kto", [{"prompt": "p", "completion": "c", "label": 1}, {"prompt": "q", "completion": "d",
                                                                            "label": 0}],
                     "The 'label' column of the train dataset must be boolean", id="kto-integer-labels"),
    ],
)
def test_data_errors_exit_2_with_the_message_and_no_traceback(trainer, rows, expected, tmp_path, tiny_model_path,
                                                              score_cache, capsys):
    """Data a user can fix (a DataError) ends the command with exit code 2 and the message; before, a traceback and
    exit code 1."""
    import json

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path=tiny_model_path, dataset_name=str(data),
                          output_dir=str(tmp_path / "out"), trainer=trainer, max_steps=1, upo_score_cache_dir=score_cache,
                          reward_heads=[{"name": "length"}], **CPU_RECIPE)
    code, _, err = run_main(["--config", recipe], capsys)
    assert code == 2, err
    assert expected in err and "Traceback" not in err


def test_build_pairs_row_errors_exit_2(tmp_path, capsys):
    """A row-level data problem found inside the builder (a candidates cell that is no list) is a DataError: exit 2
    with the row named, no traceback."""
    import json

    from trl_upo.cli import main as trl_upo

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "p", "c": [" a", " b"]}) + "\n" + json.dumps({"prompt": "q", "c": "x"}) + "\n")
    heads = json.dumps([{"name": "words", "type": "length"}])
    rc = trl_upo(["build-pairs", "rank", "--dataset", str(data), "--candidates_column", "c", "--reward_heads", heads,
                  "--output", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Row 1: candidates_column 'c' must hold a list" in err and "Traceback" not in err
