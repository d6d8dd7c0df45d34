"""Recipes from other stacks and the newcomer's console: an alignment-handbook recipe (``dataset_mixture``,
``torch_dtype``, ``warmup_ratio``, ...), TRL's ``reward_funcs``/``reward_weights``, keys that were removed upstream,
``trl-upo train <flags>`` on the quickstart recipe, the compact console, ``--help`` order, and ``trainer: kto``."""

from __future__ import annotations

import importlib.util
import json
import warnings

import pytest

from tests.test_cli_train import CPU, run_main, write_data, write_recipe
from trl_upo.cli import train as cli_train
from trl_upo.cli.common import UsageError


def _handbook_recipe(tmp_path, model: str, **extra) -> str:
    """A recipe in the alignment handbook's layout (zephyr DPO recipes), on local files."""
    data = write_data(tmp_path / "data", n_train=16, n_test=4)
    more = write_data(tmp_path / "more", n_train=8, n_test=2)
    text = f"""
# Model arguments
model_name_or_path: {model}
torch_dtype: float32
attn_implementation: eager

# Data training arguments
dataset_mixture:
  datasets:
    - id: {data}
      split: train
      columns: [prompt, chosen, rejected]
      weight: 0.5
    - id: {more / 'train.jsonl'}
      weight: 1.0
  seed: 42
  test_split_size: 4
preprocessing_num_workers: 1

# DPOTrainer arguments
bf16: false
use_cpu: true
beta: 0.01
do_eval: false
evaluation_strategy: "no"
gradient_accumulation_steps: 1
gradient_checkpointing: false
learning_rate: 5.0e-7
log_level: info
logging_steps: 1
lr_scheduler_type: cosine
max_length: 64
max_steps: 2
num_train_epochs: 1
optim: adamw_torch
output_dir: {tmp_path / 'out'}
per_device_train_batch_size: 4
push_to_hub: false
report_to: none
save_strategy: "no"
seed: 42
warmup_ratio: 0.1
"""
    for key, value in extra.items():
        text += f"{key}: {json.dumps(value)}\n"
    path = tmp_path / "handbook.yaml"
    path.write_text(text)
    return str(path)


def test_handbook_recipe_trains_two_steps(tmp_path, tiny_model_path, score_cache, capsys):
    recipe = _handbook_recipe(tmp_path, tiny_model_path, upo_score_cache_dir=score_cache,
                              reward_heads=[{"name": "length"}])
    script, args, model, _, _ = cli_train.parse(["--config", recipe])
    assert model.dtype == "float32" and args.warmup_steps == 0.1 and args.dataset_num_proc == 1
    splits = cli_train.recipe_datasets(script, cli_train.parse(["--config", recipe])[3])
    assert len(splits["test"]) == 4 and len(splits["train"]) == 8 + 8 - 4  # half of 16, all of 8, 4 held out
    code, out, err = run_main(["--config", recipe], capsys)
    assert code == 0, err
    history = json.loads((tmp_path / "out" / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2]


def test_handbook_removed_and_unknown_keys_get_the_right_message(tmp_path, tiny_model_path, capsys):
    recipe = _handbook_recipe(tmp_path, tiny_model_path, max_prompt_length=32, torch_compil=False)
    code, _, err = run_main(["--config", recipe], capsys)
    assert code == 2
    assert "`max_prompt_length` in the recipe" in err and "set `max_length`" in err
    assert "did you mean `torch_compile`?" in err
    assert "torch_dtype" not in err and "dataset_mixture" not in err  # renamed / handbook keys are accepted


def test_dataset_mixture_errors_name_the_key(tmp_path, tiny_model_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path=tiny_model_path, output_dir=str(tmp_path / "o"),
                          **CPU, dataset_mixture={"datasets": [{"id": "x", "wieght": 0.5}, {"split": "train"}]})
    code, _, err = run_main(["--config", recipe], capsys)
    assert code == 2 and "did you mean `weight`?" in err and "datasets[1] needs `id`" in err


def test_reward_funcs_trl_factory_trains(tmp_path, tiny_model_path, score_cache, capsys):
    data = write_data(tmp_path / "data", n_train=8, n_test=4)
    recipe = write_recipe(
        tmp_path / "r.yaml", model_name_or_path=tiny_model_path, dataset_name=str(data),
        output_dir=str(tmp_path / "out"), **CPU, per_device_train_batch_size=4, max_steps=2, logging_steps=1,
        upo_score_cache_dir=score_cache,
        reward_funcs=["get_soft_overlong_punishment(max_completion_len=6, soft_punish_cache=3)"], reward_weights=[2.0],
    )
    code, _, err = run_main(["--config", recipe], capsys)
    assert code == 0, err
    state = json.loads((tmp_path / "out" / "upo_state.json").read_text())
    assert "soft_overlong_punishment" in json.dumps(state)
    history = json.loads((tmp_path / "out" / "log_history.json").read_text())
    assert any("upo/soft_overlong_punishment/chosen" in h for h in history)


def test_reward_funcs_names_paths_and_weights(tmp_path):
    from trl_upo.cli.rewards import RewardFactory, reward_func_heads

    heads = reward_func_heads(["think_format_reward", "trl_upo.quickstart_task:avoid_word_reward",
                               {"get_repetition_penalty_reward": {"ngram_size": 2}}], [1.0, 0.5, 0.25],
                              taken=["think_format_reward"])
    assert [h["name"] for h in heads] == ["think_format_reward_2", "avoid_word_reward", "repetition_penalty_reward"]
    assert heads[0]["params"]["function"] == "trl.rewards:think_format_reward"
    factory = heads[2]["params"]["function"]
    assert isinstance(factory, RewardFactory) and factory.kwargs == {"ngram_size": 2}
    assert factory(completion_ids=[[1, 2, 1, 2, 1, 2]]) == pytest.approx([factory._function()(
        completion_ids=[[1, 2, 1, 2, 1, 2]])[0]])
    import pickle

    assert pickle.loads(pickle.dumps(factory)).kwargs == {"ngram_size": 2}
    with pytest.raises(UsageError, match="did you mean `think_format_reward`"):
        reward_func_heads(["think_format_rewrd"], None)
    with pytest.raises(UsageError, match="2 values for 1 reward_funcs"):
        reward_func_heads(["think_format_reward"], [1.0, 2.0])


def test_train_flags_without_config_run_the_quickstart(tmp_path, capsys):
    code, out, err = run_main(["--output_dir", str(tmp_path / "qs"), "--max_steps", "2", "--report_before_after",
                               "false", "--logging_steps", "1"], capsys)
    assert code == 0, err
    assert "no --config: running the CPU quickstart recipe (upo://quickstart.yaml)" in out
    assert (tmp_path / "qs" / "upo_state.json").is_file()
    # The compact console: a table of the logged steps, not transformers' metric dicts.
    assert "pref. acc" in out and "aux loss" in out and "{'loss'" not in out and "'upo/" not in out
    assert "Every metric:" in out


def test_recipes_raise_no_future_warning(tmp_path, tiny_model_path):
    """Neither the quickstart (activation_checkpointing: false) nor a recipe that sets no checkpointing key (TRL's
    DPOConfig defaults the deprecated gradient_checkpointing to true) warns on transformers 5.23+; the values are
    TRL's."""
    plain = write_recipe(tmp_path / "r.yaml", model_name_or_path=tiny_model_path, output_dir=str(tmp_path / "o"),
                         use_cpu=True, bf16=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        _, quick, *_ = cli_train.parse(["--config", cli_train.QUICKSTART_RECIPE])
        _, default, *_ = cli_train.parse(["--config", plain])
    assert quick.gradient_checkpointing is False and default.gradient_checkpointing is True


def test_train_help_opens_with_trl_upo_options(capsys):
    assert cli_train.main(["--help"], prog="trl-upo train") == 0
    out = capsys.readouterr().out
    first_trl = out.index("TRL and transformers options")
    for needle in ("--config RECIPE.yaml", "num_processes", "accelerate_config", "--reward_heads", "--upo_alpha",
                   "--trainer", "--reward_funcs", "--dataset_mixture"):
        assert out.index(needle) < first_trl, needle
    assert out.index("--learning_rate") > first_trl
    assert ":class:`" not in out and ":func:`" not in out


def test_kto_trainer_is_selected_by_the_recipe(tmp_path, tiny_model_path, capsys):
    if importlib.util.find_spec("trl_upo.kto") is None:
        with pytest.raises(UsageError, match="trainer: kto needs trl_upo.kto"):
            cli_train.trainer_classes("kto")
        pytest.skip("trl_upo.kto is not there yet")
    from trl_upo.kto import UPOKTOConfig

    rows = [{"prompt": f"tell me about cats {i}", "completion": "cats purr" if i % 2 else "stones fly",
             "label": bool(i % 2)} for i in range(8)]
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(tmp_path / "r.yaml", trainer="kto", model_name_or_path=tiny_model_path,
                          dataset_name=str(data), output_dir=str(tmp_path / "out"), **CPU, max_steps=2,
                          per_device_train_batch_size=4, reward_heads=[{"name": "length"}],
                          upo_score_cache_dir=str(tmp_path / "cache"))
    _, args, *_ = cli_train.parse(["--config", recipe])
    assert isinstance(args, UPOKTOConfig)
    code, _, err = run_main(["--config", recipe], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "upo_state.json").is_file()


def test_unknown_trainer_suggests(capsys):
    with pytest.raises(UsageError, match="did you mean `kto`"):
        cli_train.trainer_classes("ktp")


def test_recipes_doc_blocks_for_other_stacks_parse(tmp_path, tiny_model_path, monkeypatch):
    """docs/recipes.md, "Recipes from other stacks": the handbook block and the reward_funcs block go through the strict
    parser (models and data are not loaded; `my_rewards.brevity` is written next to the recipe)."""
    import re
    from pathlib import Path

    import yaml

    text = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text()
    section = text[text.index("## Recipes from other stacks"):]
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", section, re.S)]
    handbook = next(b for b in blocks if "dataset_mixture" in b)
    funcs = next(b for b in blocks if "reward_funcs" in b)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "my_rewards.py").write_text("def brevity(completions, **kw):\n    return [0.0] * len(completions)\n")
    recipe = write_recipe(tmp_path / "r.yaml", **handbook, **funcs, output_dir=str(tmp_path / "o"), use_cpu=True,
                          bf16=False)
    script, args, model, *_ = cli_train.parse(["--config", recipe])
    assert model.dtype == "bfloat16" and script.dataset_mixture["test_split_size"] == 0.05
    names = [s.name for s in args.head_specs]
    assert names == ["think_format_reward", "brevity", "soft_overlong_punishment", "repetition_penalty_reward"]
    assert [s.weight for s in args.head_specs] == funcs["reward_weights"]
