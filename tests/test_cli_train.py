"""`trl-upo train`: strict recipes and flags, env block, overrides, packaged assets, accelerate launch options, and
short real training runs from YAML (full fine-tuning, LoRA through ModelConfig, a dataset mixture)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from trl_upo import resources
from trl_upo.cli import launch as cli_launch
from trl_upo.cli import train as cli_train
from trl_upo.quickstart_task import preference_rows

CPU = dict(use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
           disable_tqdm=True, dataloader_num_workers=0)


def write_data(directory: Path, n_train: int = 16, n_test: int = 8) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        with open(directory / f"{split}.jsonl", "w") as f:
            for row in preference_rows(n, seed=seed):
                f.write(json.dumps(row) + "\n")
    return directory


def write_recipe(path: Path, **fields) -> str:
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return str(path)


@pytest.fixture
def recipe(tmp_path, tiny_model_path, score_cache):
    """A 2-step recipe on the tiny model and a local jsonl dataset, with a lexicon head."""
    data = write_data(tmp_path / "data")
    return dict(
        model_name_or_path=tiny_model_path,
        dataset_name=str(data),
        output_dir=str(tmp_path / "out"),
        **CPU,
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        seed=0,
        reward_heads=[{"name": "novery", "type": "lexicon", "params": {"avoid": ["very"], "mode": "presence"}}],
        upo_score_cache_dir=score_cache,
    )


def run_main(argv, capsys):
    code = cli_train.main(argv, prog="trl-upo train")
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------------------------------
# Strictness: unknown keys fail before anything loads, with a did-you-mean
# ------------------------------------------------------------------------------------------------------------------


def test_unknown_yaml_key_suggests_closest_and_loads_nothing(tmp_path, recipe, capsys):
    recipe["model_name_or_path"] = str(tmp_path / "no-such-model")  # loading it would fail differently
    recipe["learning_rat"] = 1e-3
    path = write_recipe(tmp_path / "r.yaml", **recipe)
    code, out, err = run_main(["--config", path], capsys)
    assert code == 2
    assert "unknown key `learning_rat`" in err and "did you mean `learning_rate`?" in err
    assert not (tmp_path / "out").exists()


def test_unknown_flag_and_stray_value_are_errors(tmp_path, recipe, capsys):
    path = write_recipe(tmp_path / "r.yaml", **recipe)
    code, _, err = run_main(["--config", path, "--per_device_train_bach_size", "2", "oops"], capsys)
    assert code == 2
    assert "unknown key `per_device_train_bach_size` in the command line" in err
    assert "did you mean `per_device_train_batch_size`?" in err
    assert "unexpected argument 'oops'" in err


def test_abbreviated_flag_is_not_a_prefix_match(tmp_path, recipe, capsys):
    path = write_recipe(tmp_path / "r.yaml", **recipe)
    code, _, err = run_main(["--config", path, "--learning_rat", "0.1"], capsys)
    assert code == 2 and "did you mean `learning_rate`?" in err


def test_unknown_key_in_a_dataset_mixture_entry(tmp_path, recipe, capsys):
    recipe.pop("dataset_name")
    recipe["datasets"] = [{"pth": "json", "data_files": "x.jsonl"}]
    code, _, err = run_main(["--config", write_recipe(tmp_path / "r.yaml", **recipe)], capsys)
    assert code == 2 and "unknown key `pth`" in err and "did you mean `path`?" in err


def test_bad_value_is_a_clean_error(tmp_path, recipe, capsys):
    recipe["upo_alpha"] = -1.0
    code, _, err = run_main(["--config", write_recipe(tmp_path / "r.yaml", **recipe)], capsys)
    assert code == 2 and "upo_alpha must be >= 0" in err


# ------------------------------------------------------------------------------------------------------------------
# Parsing: env block, overrides, launch options, packaged assets
# ------------------------------------------------------------------------------------------------------------------


def test_env_block_is_exported_and_flags_override_yaml(tmp_path, recipe, monkeypatch):
    monkeypatch.delenv("UPO_TEST_ENV", raising=False)
    recipe["env"] = {"UPO_TEST_ENV": 7}
    recipe["upo_alpha"] = 0.5
    path = write_recipe(tmp_path / "r.yaml", **recipe)
    script, args, model, data, launch = cli_train.parse(
        ["--config", path, "--learning_rate", "0.02", "--reward_heads", '[{"name": "length"}]', "--use_peft", "true"]
    )
    assert os.environ["UPO_TEST_ENV"] == "7"
    assert args.learning_rate == 0.02 and args.upo_alpha == 0.5 and args.max_steps == 2  # flag > YAML > default
    assert [s.name for s in args.head_specs] == ["length"]
    assert model.use_peft is True and model.model_name_or_path == recipe["model_name_or_path"]
    assert launch == []


def test_launch_options_from_yaml_and_flags(tmp_path, recipe):
    recipe.update(num_processes=2, main_process_port=29600)
    path = write_recipe(tmp_path / "r.yaml", **recipe)
    *_, launch = cli_train.parse(["--config", path, "--num_machines", "1", "--same_network"])
    assert launch == [("num_processes", "2"), ("main_process_port", "29600"), ("num_machines", "1"),
                      ("same_network", True)]
    argv = ["--config", path, "--num_machines", "1", "--same_network", "--max_steps", "3"]
    assert cli_launch.strip_launch_args(argv, launch) == ["--config", path, "--max_steps", "3"]


def test_cpu_multi_process_uses_the_multi_gpu_launcher():
    """`accelerate launch --cpu --num_processes 2` starts one process: two CPU processes need --multi_gpu."""
    args = cli_launch.build_launch_args([("num_processes", "2"), ("cpu", "True")], use_cpu=True)
    assert "--multi_gpu" in args and "--cpu" not in args
    assert args[args.index("--num_processes") + 1] == "2"
    assert cli_launch.build_launch_args([("num_processes", "1")], use_cpu=True) == ["--num_processes", "1"]


def test_accelerate_config_names_and_files(tmp_path):
    trl_zero3 = cli_launch.resolve_accelerate_config("zero3")
    assert trl_zero3.endswith("zero3.yaml") and Path(trl_zero3).is_file()
    own = tmp_path / "mine.yaml"
    own.write_text("compute_environment: LOCAL_MACHINE\n")
    args = cli_launch.build_launch_args([("accelerate_config", str(own)), ("num_processes", "2")], use_cpu=False)
    assert args[:2] == ["--config_file", str(own)]
    with pytest.raises(ValueError, match="did you mean 'zero3'|Did you mean 'zero3'"):
        cli_launch.resolve_accelerate_config("zer03")


def test_under_launcher_detection(monkeypatch):
    for key in ("TRL_UPO_LAUNCHED", "ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_MIXED_PRECISION", "LOCAL_RANK",
                "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    assert not cli_launch.under_launcher()
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert cli_launch.under_launcher()


def test_packaged_assets_resolve_and_unknown_asset_errors(capsys):
    model_dir = Path(resources.resolve_resource("upo://tiny-llama"))
    assert (model_dir / "model.safetensors").is_file()
    assert resources.resolve_resource({"a": ["upo://quickstart-data", "hub/name"]})["a"][1] == "hub/name"
    code, _, err = run_main(["--config", "upo://no-such.yaml"], capsys)
    assert code == 2 and "upo://quickstart.yaml" in err  # the error lists what is packaged


def test_make_parser_is_a_trl_parser():
    from trl import TrlParser

    parser = cli_train.make_parser(prog="x")
    assert isinstance(parser, TrlParser)
    dests = {a.dest for a in parser._actions}
    assert {"report_before_after", "upo_alpha", "lora_r", "load_in_4bit", "datasets", "dataset_name"} <= dests


# ------------------------------------------------------------------------------------------------------------------
# Real runs (two steps each)
# ------------------------------------------------------------------------------------------------------------------


def test_two_step_train_from_yaml_saves_model_and_upo_state(tmp_path, recipe, capsys):
    path = write_recipe(tmp_path / "r.yaml", **recipe)
    code, out, err = run_main(["--config", path, "--max_steps", "2"], capsys)
    assert code == 0, err[-3000:]
    out_dir = tmp_path / "out"
    assert f"Model saved to {out_dir}" in out
    assert (out_dir / "model.safetensors").is_file()
    state = json.loads((out_dir / "upo_state.json").read_text())
    assert [h["name"] for h in state["heads"]] == ["novery"]


def test_lora_through_model_config_and_a_dataset_mixture_under_a_launcher(tmp_path, recipe, capsys, monkeypatch):
    """LoRA options of trl.ModelConfig reach the trainer; a `datasets:` mixture with a test split loads; launch keys
    in the recipe are left to the launcher when the process already runs under one (no re-launch)."""
    monkeypatch.setenv("TRL_UPO_LAUNCHED", "1")
    data = Path(recipe.pop("dataset_name"))
    recipe.update(
        datasets=[{"path": "json", "data_files": str(data / "train.jsonl")},
                  {"path": "json", "data_files": str(data / "test.jsonl")}],
        test_split_size=0.25,
        eval_strategy="steps",
        eval_steps=2,
        per_device_eval_batch_size=4,
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        lora_target_modules=["q_proj", "v_proj"],
        num_processes=1,
    )
    code, out, err = run_main(["--config", write_recipe(tmp_path / "r.yaml", **recipe)], capsys)
    assert code == 0, err[-3000:]
    assert "launch options (num_processes) are the launcher's business" in err
    out_dir = tmp_path / "out"
    adapter = json.loads((out_dir / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert (out_dir / "upo_state.json").is_file()


# ------------------------------------------------------------------------------------------------------------------
# docs/cli.md: every command is parsed strictly, the short ones run; the recipe blocks run for two steps
# ------------------------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
CLI_DOC = ROOT / "docs" / "cli.md"


def _doc_blocks(lang: str) -> list[str]:
    import re

    return re.findall(rf"```{lang}\n(.*?)```", CLI_DOC.read_text(), re.S)


def _doc_commands() -> list[list[str]]:
    import shlex

    return [shlex.split(line) for block in _doc_blocks("bash") for line in block.splitlines() if line.strip()]


def _absolute(args: list[str]) -> list[str]:
    return [str(ROOT / a) if a.startswith("recipes/") else a for a in args]


def test_cli_doc_commands(tmp_path, monkeypatch, capsys, score_cache):
    """`trl-upo train` lines parse strictly (those with `--max_steps` <= 20 and no launch options also train, with
    the report off); `accelerate launch ... -m trl_upo.cli.train` lines pass accelerate's launch parser and ours;
    `trl-upo score` lines run."""
    from accelerate.commands.launch import launch_command_parser

    from trl_upo.cli import score as cli_score

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    commands = _doc_commands()
    assert len(commands) >= 8
    ran = 0
    for cmd in commands:
        if cmd[:2] == ["trl-upo", "train"]:
            args = _absolute(cmd[2:])
            script, targs, _, _, launch = cli_train.parse(cli_train.with_quickstart(args))
            if args and not launch and targs.max_steps <= 20:
                assert cli_train.main([*args, "--max_steps", "2", "--report_before_after", "false"]) == 0
                assert (Path(targs.output_dir) / "model.safetensors").is_file()
                ran += 1
        elif cmd[:2] == ["trl-upo", "score"]:
            assert cli_score.main(_absolute(cmd[2:]) + ["--upo_score_cache_dir", score_cache]) == 0, cmd
            ran += 1
        elif cmd[:2] == ["accelerate", "launch"]:
            i = cmd.index("trl_upo.cli.train")
            parsed = launch_command_parser().parse_args(_absolute(cmd[2:]))
            assert parsed.module and parsed.training_script == "trl_upo.cli.train"
            cli_train.parse(_absolute(cmd[i + 1 :]))
        else:
            raise AssertionError(f"docs/cli.md: a command the test does not know how to check: {cmd}")
    assert ran >= 5
    assert "novery" in capsys.readouterr().out


def test_cli_doc_recipe_blocks_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = {}
    for block in _doc_blocks("yaml"):
        recipe.update(yaml.safe_load(block))
    assert {"env", "use_peft", "datasets", "reward_heads"} <= set(recipe)
    path = write_recipe(tmp_path / "r.yaml", **recipe)
    code, out, err = run_main(["--config", path, "--max_steps", "2", "--upo_score_cache_dir", str(tmp_path / "c")],
                              capsys)
    assert code == 0, err[-3000:]
    assert (tmp_path / "runs" / "lora" / "adapter_config.json").is_file()


def test_launch_options_relaunch_through_accelerate(tmp_path, recipe, capsys, monkeypatch):
    """Outside a launcher, launch keys re-launch the same entry point with `accelerate launch -m trl_upo.cli.train`
    (the two-process run itself is the slow test in tests/test_cli_distributed.py)."""
    for key in ("TRL_UPO_LAUNCHED", "ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_MIXED_PRECISION", "LOCAL_RANK",
                "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    calls = []
    monkeypatch.setattr(cli_launch, "run_process_tree", lambda cmd, env, prog=None: calls.append((cmd, env)) or 0)
    recipe["num_processes"] = 2
    path = write_recipe(tmp_path / "r.yaml", **recipe)
    code, out, _ = run_main(["--config", path, "--max_steps", "3", "--main_process_port", "29611"], capsys)
    assert code == 0 and len(calls) == 1
    cmd, env = calls[0]
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and env["TRL_UPO_LAUNCHED"] == "1"
    i = cmd.index("trl_upo.cli.train")
    launch, script = cmd[3 : i - 1], cmd[i + 1 :]
    assert script == ["--config", path, "--max_steps", "3"]
    assert launch[:2] == ["--num_processes", "2"] and "--multi_gpu" in launch  # use_cpu: true in the recipe
    assert launch[launch.index("--main_process_port") + 1] == "29611"
    assert "launching: accelerate launch" in out
    assert not (tmp_path / "out").exists()  # nothing trained in this process


def test_report_with_sharded_parameters_is_refused_before_loading(tmp_path, recipe, capsys, monkeypatch):
    monkeypatch.setenv("TRL_UPO_LAUNCHED", "1")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    recipe["report_before_after"] = True
    code, _, err = run_main(["--config", write_recipe(tmp_path / "r.yaml", **recipe)], capsys)
    assert code == 2 and "report_before_after generates on the main process only" in err
    assert not (tmp_path / "out").exists()


def test_config_key_inside_a_recipe_is_an_error(tmp_path, recipe, capsys):
    """`config` is the command line's recipe path, not a recipe key (TrlParser would drop it silently)."""
    recipe["config"] = "other.yaml"
    code, _, err = run_main(["--config", write_recipe(tmp_path / "r.yaml", **recipe)], capsys)
    assert code == 2 and "unknown key `config`" in err


def test_report_leaves_out_column_heads_and_says_so(tmp_path, recipe, capsys):
    """A column head scores the data, not generated answers: training uses it, the before/after report skips it."""
    data = tmp_path / "data-cols"
    data.mkdir()
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (Path(recipe["dataset_name"]) / f"{split}.jsonl").read_text().splitlines()]
        with open(data / f"{split}.jsonl", "w") as f:
            for i, row in enumerate(rows):
                f.write(json.dumps({**row, "tox_chosen": 0.1 * (i % 3), "tox_rejected": 0.2}) + "\n")
    recipe.update(
        dataset_name=str(data),
        report_before_after=True,
        report_num_prompts=4,
        report_num_samples=1,
        report_max_new_tokens=4,
        reward_heads=[
            *recipe["reward_heads"],
            {"name": "tox", "type": "column", "higher_is_better": False,
             "params": {"chosen": "tox_chosen", "rejected": "tox_rejected"}},
        ],
    )
    code, out, err = run_main(["--config", write_recipe(tmp_path / "r.yaml", **recipe)], capsys)
    assert code == 0, err
    assert "left out of the report (training uses them): tox (reads tox_chosen, tox_rejected)" in out
    report = json.loads((Path(recipe["output_dir"]) / "report.json").read_text())
    assert set(report["before"]["designer"]) == set(report["after"]["designer"]) == {"novery"}
    state = json.loads((Path(recipe["output_dir"]) / "upo_state.json").read_text())
    assert "tox" in json.dumps(state)  # trained with both heads


def test_report_with_4bit_on_cpu_is_refused_before_loading(tmp_path, recipe, capsys):
    recipe.update(report_before_after=True, load_in_4bit=True, use_peft=True)
    code, _, err = run_main(["--config", write_recipe(tmp_path / "r.yaml", **recipe)], capsys)
    assert code == 2 and "report_before_after with a bitsandbytes-quantized model on CPU" in err
    assert not (tmp_path / "out").exists()
