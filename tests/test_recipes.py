"""The recipes under recipes/: every one parses strictly with `trl-upo train`'s parser and trains two steps on CPU
with tiny stand-ins of the same family and data format; the accelerate configurations load with accelerate's own
loader (DeepSpeed ones are also validated by DeepSpeed's config parser); the SLURM script builds correct per-node
`accelerate launch` commands. What needs GPUs is marked `gpu`, with the command that runs it.

New recipes are picked up by the glob in tests/recipe_utils.py; a recipe naming a hub model, dataset or head model
without a stand-in fails with a message naming the table to extend.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests.recipe_utils import (
    HUB_DATASETS,
    HUB_MODELS,
    ROOT,
    accelerate_configs,
    cpu_recipe,
    dataclass_keys,
    header,
    header_commands,
    installed_keys,
    launch_keys_of,
    load_recipe,
    rel,
    sbatch_scripts,
    training_recipes,
    write_recipe,
)

RECIPES = training_recipes()
#: Recipes whose 2-step CPU run is in the default suite (the rest run with -m slow): 4-bit QLoRA through
#: bitsandbytes (Llama, implicit-prompt conversational data, two text heads) and LoRA with DDP launch keys and a
#: toxicity classifier head (run through `trl-upo train`'s own entry point).
DEFAULT_RUNS = {"recipes/qlora_llama3.1-8b.yaml", "recipes/ddp_lora_llama3.1-8b.yaml"}


def recipe_params(default_runs: set[str] | None = None):
    out = []
    for path in RECIPES:
        marks = [] if default_runs is None or rel(path) in default_runs else [pytest.mark.slow]
        out.append(pytest.param(path, id=rel(path), marks=marks))
    return out


def _parse(argv: list[str]):
    from trl_upo.cli.train import parse

    return parse(argv, prog="trl-upo train")


def _on_this_machine(data: dict) -> list[str]:
    """Flags that let a GPU recipe's dataclasses be built on a CPU-only machine (TrainingArguments refuses bf16 without
    a GPU unless use_cpu is set); nothing else changes."""
    return [] if torch.cuda.is_available() or data.get("use_cpu") else ["--use_cpu", "true"]


def _recorded_deprecations(argv: list[str]) -> set[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _parse(argv)
    return {str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))}


def test_the_tree_has_the_recipes_the_docs_list():
    names = {rel(p) for p in RECIPES}
    assert len(names) >= 7, names
    assert {rel(p) for p in accelerate_configs()} >= {
        "recipes/accelerate/multi_gpu.yaml", "recipes/accelerate/zero3.yaml", "recipes/accelerate/fsdp2_qlora.yaml",
        "recipes/accelerate/multi_node_zero3.yaml",
    }
    assert sbatch_scripts()
    doc = (ROOT / "docs" / "recipes.md").read_text()
    missing = [n for n in names | {rel(p) for p in accelerate_configs()} | {rel(p) for p in sbatch_scripts()}
               if n not in doc]
    assert not missing, f"docs/recipes.md does not mention {missing}"


# ---------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------


def _trainer_keys(trainer: str) -> set[str]:
    """The keys `trl-upo train` takes with the recipe's `trainer` (its config class instead of UPOConfig)."""
    from trl_upo.cli.train import make_parser

    return {a.dest for a in make_parser(trainer=trainer)._actions if a.option_strings and a.dest != "help"}


@pytest.mark.parametrize("path", recipe_params())
def test_recipe_parses_strictly_and_every_key_lands(path):
    """Every key of the recipe is a field of one of the four dataclasses (and the parsed value is the recipe's) or
    an `accelerate launch` option; no key triggers a deprecation warning that a recipe without it does not."""
    data = installed_keys(load_recipe(path))  # a renamed key under the name this transformers takes
    extra = _on_this_machine(data)
    argv = ["--config", str(path), *extra]
    script_args, training_args, model_args, dataset_args, launch = _parse(argv)

    fields = _trainer_keys(data.get("trainer", "dpo"))  # `trainer: kto`: the fields of UPOKTOConfig
    launch_only = launch_keys_of(data)
    assert set(data) - {"env"} <= fields | set(launch_only), f"keys in no dataclass: {set(data) - fields}"
    assert [k for k, _ in launch] == list(launch_only), "launch options parsed differently from the recipe's keys"
    for key, value in data.items():
        if key in launch_only or key == "env" or isinstance(value, (dict, list)) or key in ("use_cpu",):
            continue
        holder = next(d for d in (script_args, training_args, model_args, dataset_args) if hasattr(d, key))
        parsed = getattr(holder, key)
        parsed = getattr(parsed, "value", parsed)  # enums (eval_strategy, lr_scheduler_type, ...)
        if isinstance(value, str) and value.startswith("upo://"):
            continue  # resolved to the packaged path
        if key == "report_to" and value == "none":
            value = []  # TrainingArguments spells "none" as no integration
        if key == "lora_target_modules" and isinstance(parsed, list) and len(parsed) == 1:
            parsed = parsed[0]
        assert parsed == value or str(parsed) == str(value), f"{key}: recipe {value!r}, parsed {parsed!r}"
    heads = data.get("reward_heads") or []
    assert [h["name"] for h in training_args.reward_heads] == [h["name"] for h in heads]
    assert training_args.reward_heads, f"{rel(path)} has no reward head: a UPO recipe needs a designer objective"

    baseline = _recorded_deprecations(["--output_dir", "x", "--use_cpu", "true"])
    new = _recorded_deprecations(argv) - baseline
    assert not new, f"{rel(path)} uses deprecated settings: {new}"


def test_a_typo_in_a_recipe_is_an_error_naming_the_key(tmp_path):
    data = load_recipe(ROOT / "recipes" / "qlora_llama3.1-8b.yaml")
    data["learning_rat"] = data.pop("learning_rate")
    path = write_recipe(data, tmp_path / "typo.yaml")
    with pytest.raises(ValueError, match=r"learning_rat.*did you mean `learning_rate`"):
        _parse(["--config", str(path), "--use_cpu", "true"])


#: Shell variables the headers' per-node commands use, with example values.
HEADER_VARIABLES = {"$NODE_RANK": "1", "$MAIN_IP": "10.0.0.1"}


@pytest.mark.parametrize("path", recipe_params())
def test_recipe_header_says_what_where_memory_and_command(path):
    """The opening comment names the hardware and memory, and its commands run this very file: each `trl-upo train`
    (or `sbatch`) command parses, and each `accelerate launch` form parses with accelerate's own launch parser, runs
    `-m trl_upo.cli.train --config <this recipe>` and uses the recipe's accelerate_config."""
    from accelerate.commands.launch import launch_command_parser

    data = load_recipe(path)
    text = header(path)
    assert text.splitlines()[0], f"{rel(path)} must open with a comment saying what it trains"
    for word in ("Hardware:", "Memory:"):
        assert word in text, f"{rel(path)}'s header does not say {word}"
    own = rel(path)
    trl_cmds = [c for c in header_commands(path, "trl-upo") if own in c]
    sbatch_cmds = [c for c in header_commands(path, "sbatch") if own in c]
    assert trl_cmds or sbatch_cmds, f"{own}'s header has no `trl-upo train --config {own}` (or sbatch) command"
    for cmd in trl_cmds:
        assert cmd[:2] == ["trl-upo", "train"]
        _parse([str(ROOT / a) if a == own else a for a in cmd[2:]] + _on_this_machine(data))
    for cmd in sbatch_cmds:
        assert (ROOT / cmd[1]).is_file(), cmd
    launch_cmds = [c for c in header_commands(path, "accelerate") if own in c]
    if not data.get("use_cpu"):
        assert launch_cmds, f"{own}'s header has no `accelerate launch` form"
    for cmd in launch_cmds:
        assert cmd[:2] == ["accelerate", "launch"]
        cmd = [HEADER_VARIABLES.get(tok, tok) for tok in cmd]
        args = launch_command_parser().parse_args(cmd[2:])
        assert args.module and args.training_script == "trl_upo.cli.train", cmd
        assert args.training_script_args[:2] == ["--config", own], cmd
        if data.get("accelerate_config"):
            assert args.config_file == data["accelerate_config"], "the two commands must use the same config"
        if args.config_file:
            assert (ROOT / args.config_file).is_file(), args.config_file
        if "num_processes" in data:
            assert args.num_processes == int(data["num_processes"])


@pytest.mark.parametrize("path", [p for p in recipe_params() if launch_keys_of(load_recipe(p.values[0]))])
def test_launch_keys_resolve_to_accelerate_arguments(path, monkeypatch):
    """`trl-upo train` turns the recipe's launch keys into `accelerate launch` arguments that accelerate accepts,
    with the config file of recipes/accelerate/."""
    from accelerate.commands.launch import launch_command_parser

    from trl_upo.cli.launch import build_launch_args

    monkeypatch.chdir(ROOT)
    data = load_recipe(path)
    *_, launch = _parse(["--config", str(path), *_on_this_machine(data)])
    args = build_launch_args(launch, use_cpu=False)
    parsed = launch_command_parser().parse_args([*args, "-m", "trl_upo.cli.train", "--config", rel(path)])
    assert Path(parsed.config_file).resolve() == (ROOT / data["accelerate_config"]).resolve()
    assert parsed.num_processes == int(data["num_processes"])


# ---------------------------------------------------------------------------------------------------------------
# Two training steps on CPU
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    """Tiny models, classifiers and datasets, built once per module and shared by the recipes' runs."""
    return tmp_path_factory.mktemp("standins"), {}


def _run_two_steps(path: Path, tmp_path: Path, standins) -> tuple[object, dict, list[str]]:
    from trl_upo.cli.train import train

    base, cache = standins
    data, changes = cpu_recipe(load_recipe(path), base, cache)
    data["output_dir"] = str(tmp_path / "out")
    data["upo_score_cache_dir"] = str(tmp_path / "score-cache")
    recipe = write_recipe(data, tmp_path / "cpu.yaml")
    trainer = train(*_parse(["--config", str(recipe)])[:4])
    return trainer, data, changes


@pytest.mark.parametrize("path", recipe_params(DEFAULT_RUNS))
def test_recipe_trains_two_steps_on_cpu(path, tmp_path, standins):
    """The recipe, with its model swapped for a tiny one of the same family, its data for local rows of the same
    format and its head models for tiny local ones, and bf16/CUDA-only settings turned into CPU ones, trains two
    optimizer steps: finite losses, every head's metrics logged, PEFT/4-bit/full fine-tuning as the recipe says."""
    original = load_recipe(path)
    if original.get("load_in_4bit") or original.get("load_in_8bit"):
        pytest.importorskip("bitsandbytes", reason="the quantization extra is not installed")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, data, changes = _run_two_steps(path, tmp_path, standins)
    note = "\n".join(changes)
    no_backward = [str(w.message) for w in caught if "autograd kernel was not registered" in str(w.message)]
    assert not no_backward, f"backward through an op without a gradient: {no_backward[0]}"
    assert trainer.state.global_step == 2, note
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs), logs
    role = "completion" if original.get("trainer") == "kto" else "chosen"
    for head in original.get("reward_heads") or []:
        assert f"upo/{head['name']}/{role}" in logs[0], sorted(logs[0])
    if original.get("trainer") == "kto":
        assert any("upo/aux_loss" in h for h in logs)  # a 2-row KTO batch may hold no desirable row
    else:
        assert "upo/aux_loss" in logs[0]

    model = trainer.accelerator.unwrap_model(trainer.model)
    base = model.get_base_model() if original.get("use_peft") else model
    family = HUB_MODELS.get(original["model_name_or_path"])
    if family:
        assert base.config.model_type == family
    if original.get("use_peft"):
        assert hasattr(model, "peft_config") and trainer.ref_model is None  # adapter-disabled reference
    else:
        assert not hasattr(model, "peft_config")
        assert all(p.requires_grad for p in model.parameters()), "full fine-tuning trains every weight"
    if original.get("load_in_4bit"):
        import bitsandbytes as bnb

        layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers and layers[0].weight.quant_state.quant_type == original.get("bnb_4bit_quant_type", "nf4")
        storage = original.get("bnb_4bit_quant_storage")
        if storage:
            assert layers[0].weight.dtype == getattr(torch, storage)
    if HUB_DATASETS.get(original.get("dataset_name"), ("",))[0] == "conversational_implicit":
        assert "prompt" in trainer.train_dataset.column_names or "prompt_ids" in trainer.train_dataset.column_names
    saved = os.listdir(data["output_dir"])
    assert ("adapter_config.json" if original.get("use_peft") else "config.json") in saved, saved


def test_the_cli_entry_point_trains_a_recipe_with_launch_keys_removed(tmp_path, standins, capsys):
    """`trl-upo train --config <recipe>` end to end through the command dispatcher (in-process: no launch keys)."""
    from trl_upo.cli import main

    path = ROOT / "recipes" / "lora_qwen2.5-1.5b.yaml"
    base, cache = standins
    data, _ = cpu_recipe(load_recipe(path), base, cache)
    data["output_dir"] = str(tmp_path / "out")
    data["upo_score_cache_dir"] = str(tmp_path / "score-cache")
    recipe = write_recipe(data, tmp_path / "cpu.yaml")
    assert main(["train", "--config", str(recipe), "--upo_alpha", "0.5"]) == 0
    saved = os.listdir(tmp_path / "out")
    assert {"adapter_config.json", "upo_state.json"} <= set(saved), saved
    with open(tmp_path / "out" / "upo_state.json") as f:
        assert "length" in json.dumps(json.load(f))


@pytest.mark.slow
def test_ddp_recipe_trains_on_two_cpu_processes_through_its_launch_keys(tmp_path, standins):
    """The DDP recipe keeps its launch keys (its accelerate config, num_processes lowered to 2): `trl-upo train`
    re-launches itself through `accelerate launch`, and two CPU processes (gloo) train two steps."""
    path = ROOT / "recipes" / "ddp_lora_llama3.1-8b.yaml"
    base, cache = standins
    data, _ = cpu_recipe(load_recipe(path), base, cache)
    data["accelerate_config"] = str(ROOT / load_recipe(path)["accelerate_config"])
    data["num_processes"] = 2
    data["output_dir"] = str(tmp_path / "out")
    data["upo_score_cache_dir"] = str(tmp_path / "score-cache")
    data["save_strategy"] = "steps"
    data["save_steps"] = 2
    recipe = write_recipe(data, tmp_path / "cpu.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "TRL_UPO_LAUNCHED"))}
    env.update(OMP_NUM_THREADS="1", MASTER_PORT="29517")
    proc = subprocess.run(
        [sys.executable, "-m", "trl_upo.cli", "train", "--config", str(recipe), "--main_process_port", "29517"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "launching: accelerate launch" in proc.stdout
    with open(tmp_path / "out" / "checkpoint-2" / "trainer_state.json") as f:
        state = json.load(f)
    assert state["global_step"] == 2
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


# ---------------------------------------------------------------------------------------------------------------
# accelerate configurations
# ---------------------------------------------------------------------------------------------------------------

EXPECTED_ACCELERATE = {
    "multi_gpu.yaml": dict(distributed_type="MULTI_GPU", num_machines=1),
    "zero3.yaml": dict(distributed_type="DEEPSPEED", num_machines=1, zero_stage=3),
    "fsdp2_qlora.yaml": dict(distributed_type="FSDP", num_machines=1, fsdp_version=2),
    "multi_node_zero3.yaml": dict(distributed_type="DEEPSPEED", num_machines=2, zero_stage=3),
}


@pytest.mark.parametrize("path", [pytest.param(p, id=rel(p)) for p in accelerate_configs()])
def test_accelerate_config_loads_with_accelerates_loader(path):
    """accelerate's own config loader reads the file; its distributed mode, machines, bf16 and DeepSpeed/FSDP
    settings are the documented ones; accelerate's launch-time validation accepts it; a recipe or the SLURM script
    uses it."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    cfg = load_config_from_file(str(path))
    expected = EXPECTED_ACCELERATE.get(path.name)
    assert expected, f"add {path.name} to EXPECTED_ACCELERATE"
    assert str(cfg.distributed_type).split(".")[-1] == expected["distributed_type"]
    assert cfg.num_machines == expected["num_machines"]
    assert cfg.mixed_precision == "bf16" and not cfg.use_cpu
    if "zero_stage" in expected:
        assert cfg.deepspeed_config["zero_stage"] == expected["zero_stage"]
        assert cfg.deepspeed_config["zero3_init_flag"] and cfg.deepspeed_config["zero3_save_16bit_model"]
    if "fsdp_version" in expected:
        fsdp = cfg.fsdp_config
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_activation_checkpointing"] and fsdp["fsdp_cpu_ram_efficient_loading"]
    if expected["num_machines"] > 1:
        assert cfg.deepspeed_config["deepspeed_multinode_launcher"] == "standard"  # one launcher per node
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "trl_upo.cli.train"])
    args, defaults, _ = _validate_launch_command(args)
    assert args.num_processes == cfg.num_processes

    users = [p for p in [*RECIPES, *sbatch_scripts()] if rel(path) in p.read_text()]
    assert users, f"no recipe or SLURM script uses {rel(path)}"


def test_fsdp_qlora_recipe_has_the_settings_fsdp_needs():
    """FSDP shards only floating-point tensors: the 4-bit weights must be stored in the model's float dtype, and
    activation checkpointing belongs to FSDP (both at once would all-gather every layer twice)."""
    from accelerate.commands.config.config_args import load_config_from_file

    data = load_recipe(ROOT / "recipes" / "fsdp2_qlora_llama3.1-70b.yaml")
    assert data["load_in_4bit"] and data["use_peft"]
    assert data["bnb_4bit_quant_storage"] == data["dtype"] == "bfloat16"
    assert data["activation_checkpointing"] is False
    assert data["model_init_kwargs"] == {"device_map": None}
    cfg = load_config_from_file(str(ROOT / data["accelerate_config"]))
    assert cfg.fsdp_config["fsdp_version"] == 2 and cfg.fsdp_config["fsdp_activation_checkpointing"]


def _deepspeed_env(config: Path) -> dict[str, str]:
    """The ACCELERATE_* environment `accelerate launch --config_file <config>` gives the training processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "trl_upo.cli.train"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    # as accelerate's launch_command does before calling the DeepSpeed launcher
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    _, env = prepare_deepspeed_cmd_env(args)
    return {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}


@pytest.mark.parametrize(
    "recipe", ["recipes/zero3_full_qwen2.5-7b.yaml", "recipes/multinode_zero3_full_llama3.1-8b.yaml"]
)
def test_deepspeed_config_is_valid_for_deepspeed_with_the_recipes_values(recipe, monkeypatch):
    """As far as a CPU allows: the environment accelerate would launch with, the recipe's training arguments, the
    DeepSpeed plugin and the HF Trainer's resolution of the `auto` values, then DeepSpeed's own config parser."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    path = ROOT / recipe
    data = load_recipe(path)
    config = ROOT / (data.get("accelerate_config") or "recipes/accelerate/multi_node_zero3.yaml")
    for key, value in _deepspeed_env(config).items():
        monkeypatch.setenv(key, value)
    # bf16 is refused without a GPU: the rest of the recipe is parsed as is. Building the arguments registers their
    # ZeRO-3 config with transformers (it would partition every model loaded later in this process): undo that.
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    try:
        _, args, _, _, _ = _parse(["--config", str(path), "--bf16", "false"])
    finally:
        unset_hf_deepspeed_config()
    plugin = args.deepspeed_plugin
    assert plugin is not None and plugin.zero_stage == 3 and plugin.zero3_init_flag
    hf = HfTrainerDeepSpeedConfig(plugin.deepspeed_config)
    hf.trainer_config_process(args)
    cfg = hf.config
    assert cfg["train_micro_batch_size_per_gpu"] == data["per_device_train_batch_size"]
    assert cfg["gradient_accumulation_steps"] == data["gradient_accumulation_steps"]
    assert cfg["bf16"]["enabled"] is True  # from the accelerate config's mixed_precision
    ds = DeepSpeedConfig(dict(cfg))  # world size 1 here: no process group on this machine
    assert ds.zero_optimization_stage == 3
    assert ds.train_batch_size == data["per_device_train_batch_size"] * data["gradient_accumulation_steps"]
    assert ds.zero_config.gather_16bit_weights_on_model_save
    assert ds.gradient_clipping == args.max_grad_norm


# ---------------------------------------------------------------------------------------------------------------
# SLURM
# ---------------------------------------------------------------------------------------------------------------

_FAKE_SRUN = """#!/bin/bash
# test double: run the task once per node, as srun --ntasks-per-node=1 would, with that node's SLURM_NODEID
while [[ "$1" == --* ]]; do shift; done
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i SLURMD_NODENAME=node-$i "$@" || exit $?; done
"""
_FAKE_SCONTROL = """#!/bin/bash
# test double: `scontrol show hostnames <list>` expands the job's node list, one line at a time (so a reader that
# closes the pipe after the first host, like `| head -n 1`, gets the writer killed by SIGPIPE, as on a big cluster)
[ "$1 $2" = "show hostnames" ] || exit 1
for ((i = 0; i < SLURM_NNODES; i++)); do echo "gpu-node-0$i"; sleep 0.05; done
"""
_FAKE_ACCELERATE = """#!{python}
import json, os, sys
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "node": os.environ["SLURM_NODEID"]}}) + "\\n")
"""


@pytest.mark.parametrize("nodes", [2, 4])
def test_slurm_script_launches_one_accelerate_per_node_with_its_rank(tmp_path, nodes):
    """The sbatch script, run by bash with srun/scontrol/accelerate test doubles on PATH: one `accelerate launch` per
    node, machine rank = SLURM_NODEID, the first host of the node list as main process, all GPUs of all nodes as
    processes, the multi-node config; each command parses with accelerate's launch parser, and the recipe it runs
    parses with `trl-upo train`'s parser."""
    from accelerate.commands.launch import launch_command_parser

    script = sbatch_scripts()[0]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", _FAKE_SRUN), ("scontrol", _FAKE_SCONTROL),
                       ("accelerate", _FAKE_ACCELERATE.format(python=sys.executable))):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "launches.jsonl"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record),
           "SLURM_NNODES": str(nodes), "SLURM_JOB_NODELIST": f"gpu-node-[00-0{nodes - 1}]", "SLURM_GPUS_ON_NODE": "8"}
    recipe = "recipes/multinode_zero3_full_llama3.1-8b.yaml"
    # run from a scratch directory (the script creates logs/ there); paths stay relative, as on a cluster
    proc = subprocess.run(["bash", str(script), recipe, "--learning_rate", "1e-6"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    launches = [json.loads(line) for line in record.read_text().splitlines()]
    assert [int(x["node"]) for x in launches] == list(range(nodes))
    for x in launches:
        assert x["argv"][0] == "launch"
        args = launch_command_parser().parse_args(x["argv"][1:])
        assert args.machine_rank == int(x["node"])
        assert args.num_machines == nodes and args.num_processes == 8 * nodes
        assert args.main_process_ip == "gpu-node-00" and args.main_process_port == 29500
        assert args.config_file == "recipes/accelerate/multi_node_zero3.yaml"
        assert args.module and args.training_script == "trl_upo.cli.train"
        assert args.training_script_args == ["--config", recipe, "--learning_rate", "1e-6"]
    _, training_args, *_ = _parse(["--config", str(ROOT / recipe), *launches[0]["argv"][-2:], "--use_cpu", "true"])
    assert training_args.learning_rate == 1e-6


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------

GPU_RECIPES = [rel(p) for p in RECIPES if not load_recipe(p).get("use_cpu")]


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_recipe_runs_on_its_gpus(recipe, tmp_path):
    """Run each recipe for 5 steps on the hardware its header names (real model, real data, its accelerate config):

        python -m pytest -m gpu tests/test_recipes.py -k test_recipe_runs_on_its_gpus

    or one recipe by hand: `trl-upo train --config <recipe> --max_steps 5 --output_dir /tmp/x` (multi-node: the sbatch
    script with `--max_steps 5`). Skipped without enough CUDA devices; needs the Hub (gated Llama: `hf auth login`)."""
    data = load_recipe(ROOT / recipe)
    need = int(data.get("num_processes", 1))
    if "multinode" in recipe:
        pytest.skip("multi-node: run recipes/slurm/upo_multinode.sbatch on a cluster")
    if torch.cuda.device_count() < need:
        pytest.skip(f"needs {need} CUDA devices, found {torch.cuda.device_count()}")
    proc = subprocess.run(
        [sys.executable, "-m", "trl_upo.cli", "train", "--config", recipe, "--max_steps", "5",
         "--output_dir", str(tmp_path / "out"), "--save_strategy", "no", "--eval_strategy", "no"],
        cwd=ROOT, capture_output=True, text=True, timeout=7200,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert (tmp_path / "out").is_dir()


def _first_step_logps(out: Path) -> float:
    with open(out / "checkpoint-1" / "trainer_state.json") as f:
        return next(h for h in json.load(f)["log_history"] if "loss" in h)["logps/chosen"]


@pytest.mark.gpu
def test_fsdp2_qlora_matches_one_process(tmp_path):
    """FSDP2 with bf16-stored 4-bit weights computes the same first-step log-probabilities as one process without
    FSDP on the same global batch (2 pairs), with a small model of the recipe's family (bitsandbytes#1945 guard):

        python -m pytest -m gpu tests/test_recipes.py -k test_fsdp2_qlora_matches_one_process

    Needs 2 CUDA devices and the Hub (gated Llama: `hf auth login`)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    recipe = "recipes/fsdp2_qlora_llama3.1-70b.yaml"
    common = ["--model_name_or_path", "meta-llama/Llama-3.2-1B-Instruct", "--max_steps", "1", "--learning_rate", "0",
              "--eval_strategy", "no", "--save_strategy", "steps", "--save_steps", "1", "--seed", "0",
              "--dataloader_num_workers", "0", "--reward_heads", '[{"name": "length"}]']
    runs = {
        "fsdp2": ["--num_processes", "2", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1"],
        "single": ["--accelerate_config", "single_gpu", "--num_processes", "1", "--per_device_train_batch_size", "2",
                   "--gradient_accumulation_steps", "1"],
    }
    logps = {}
    for name, extra in runs.items():
        out = tmp_path / name
        proc = subprocess.run(
            [sys.executable, "-m", "trl_upo.cli", "train", "--config", recipe, *common, *extra,
             "--output_dir", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=3600,
        )
        assert proc.returncode == 0, proc.stderr[-5000:]
        logps[name] = _first_step_logps(out)
    assert logps["fsdp2"] == pytest.approx(logps["single"], rel=1e-2), logps


# ---------------------------------------------------------------------------------------------------------------
# docs/recipes.md
# ---------------------------------------------------------------------------------------------------------------


def _doc_blocks(lang: str, section: str | None = None) -> list[str]:
    """The ``lang`` blocks of docs/recipes.md, or of one of its ``## `` sections."""
    import re

    text = (ROOT / "docs" / "recipes.md").read_text()
    if section is not None:
        text = text[text.index(section):]
        text = text[: text.find("\n## ", len(section))]
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def test_docs_recipes_commands_parse():
    """Every command in docs/recipes.md's bash blocks parses: `trl-upo train` with its parser, `accelerate launch`
    with accelerate's launch parser (and the training arguments after it), `sbatch` names existing files."""
    import shlex

    from accelerate.commands.launch import launch_command_parser

    seen = set()
    for block in _doc_blocks("bash"):
        for line in block.splitlines():
            tokens = shlex.split(line, comments=True)
            while tokens and "=" in tokens[0] and not tokens[0].startswith("-"):
                tokens = tokens[1:]  # VAR=value prefixes
            if not tokens:
                continue
            seen.add(tokens[0])
            if tokens[:2] == ["trl-upo", "train"]:
                argv = [str(ROOT / t) if t.startswith("recipes/") else t for t in tokens[2:]]
                _parse(argv + ["--use_cpu", "true"])
            elif tokens[:2] == ["accelerate", "launch"]:
                args = launch_command_parser().parse_args(tokens[2:])
                assert args.module and args.training_script == "trl_upo.cli.train", line
                if args.config_file:
                    assert (ROOT / args.config_file).is_file(), line
                train_argv = [str(ROOT / t) if t.startswith("recipes/") else t for t in args.training_script_args]
                _parse(train_argv + ["--use_cpu", "true"])
            elif tokens[0] == "sbatch":
                files = [t for t in tokens if t.startswith("recipes/")]
                assert files and all((ROOT / f).is_file() for f in files), line
            elif tokens[0] in ("python", "mkdir"):
                continue
            else:
                raise AssertionError(f"unchecked command in docs/recipes.md: {line}")
    assert {"trl-upo", "accelerate", "sbatch"} <= seen


def test_docs_recipes_yaml_blocks_form_a_strict_recipe(tmp_path):
    """The 'write your own recipe' YAML blocks, together, are a recipe `trl-upo train` accepts."""
    import yaml

    data = {}
    for block in _doc_blocks("yaml", section="## Writing your own recipe"):
        data.update(yaml.safe_load(block))
    path = write_recipe(data, tmp_path / "own.yaml")
    _, training_args, model_args, _, launch = _parse(["--config", str(path), "--use_cpu", "true"])
    assert model_args.use_peft and len(training_args.reward_heads) == 2 and not launch


@pytest.mark.slow
def test_fsdp2_shards_the_recipes_4bit_weights_without_changing_forward_or_grads(tmp_path):
    """As far as a CPU allows: two processes (gloo) load a tiny Llama with the FSDP2 QLoRA recipe's 4-bit and LoRA
    settings (nf4, bf16 storage, nested quantization, all-linear LoRA), shard it with accelerate's own FSDP2
    preparation and the plugin built from recipes/accelerate/fsdp2_qlora.yaml (bf16 mixed precision), and compare
    with the unsharded model: every 4-bit weight is sharded, the logits and every LoRA gradient are identical, although
    the packed storage holds bf16 NaN bit patterns (the ones bitsandbytes#1945 reports FSDP2 rewriting on GPU).
    (accelerate only enables FSDP with GPUs, so the trainer's FSDP path itself is a GPU test.)"""
    pytest.importorskip("bitsandbytes", reason="the quantization extra is not installed")
    from tests.tiny import save_tiny_causal_lm

    model_dir = save_tiny_causal_lm(str(tmp_path / "tiny-llama"), family="llama", hidden_size=64)
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", MASTER_PORT="29519")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
         "-m", "tests.recipe_utils", "fsdp2-qlora", model_dir, str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["world_size"] == 2
    assert r["four_bit_weights"] > 0 and r["four_bit_weights_sharded"] == r["four_bit_weights"], r
    assert r["nan_bit_patterns_in_packed_weights"] > 0, "the check needs NaN-like packed bytes to be meaningful"
    assert r["max_abs_logit_diff"] == 0.0, r
    assert r["lora_grads_present"] == r["lora_grads"] > 0 and r["max_abs_lora_grad_diff"] == 0.0, r
    assert "bfloat16" in r["mixed_precision_policy"]


@pytest.mark.slow
def test_zero3_recipe_trains_under_deepspeed_on_cpu_exactly_like_without_it(tmp_path, standins):
    """The ZeRO-3 full fine-tuning recipe, relaunched by `trl-upo train` through `accelerate launch` with its own
    accelerate config (DeepSpeed ZeRO-3, one CPU process: DeepSpeed's CPU accelerator), trains two steps with its
    `readability` and toxicity `classifier` heads, and logs the same losses, log-probabilities and UPO terms as the
    same run without DeepSpeed. (Two CPU processes under DeepSpeed fail HF's batch-size check on this machine.)"""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    path = ROOT / "recipes" / "zero3_full_qwen2.5-7b.yaml"
    base, cache = standins
    data, _ = cpu_recipe(load_recipe(path), base, cache)
    data.update(eval_strategy="no", save_strategy="steps", save_steps=2, upo_score_cache_dir=str(tmp_path / "cache"))
    runs = {}
    for name, extra in {
        "deepspeed": dict(use_cpu=False, accelerate_config=str(ROOT / load_recipe(path)["accelerate_config"]),
                          num_processes=1, mixed_precision="no", main_process_port=29523),
        "plain": {},
    }.items():
        out = tmp_path / name
        recipe = write_recipe({**data, **extra, "output_dir": str(out)}, tmp_path / f"{name}.yaml")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "TRL_UPO_LAUNCHED"))}
        proc = subprocess.run([sys.executable, "-m", "trl_upo.cli", "train", "--config", str(recipe)], cwd=tmp_path,
                              env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        with open(out / "checkpoint-2" / "trainer_state.json") as f:
            runs[name] = [h for h in json.load(f)["log_history"] if "loss" in h]
        saved_args = torch.load(out / "training_args.bin", weights_only=False)
        if name == "deepspeed":
            assert "launching: accelerate launch" in proc.stdout
            assert saved_args.deepspeed_plugin is not None and saved_args.deepspeed_plugin.zero_stage == 3
        else:
            assert saved_args.deepspeed_plugin is None
    keys = ["loss", "logps/chosen", "logps/rejected", "upo/aux_loss", "upo/nontoxic/chosen", "upo/readability/chosen"]
    assert len(runs["deepspeed"]) == len(runs["plain"]) == 2
    for ds_log, plain_log in zip(runs["deepspeed"], runs["plain"]):
        for key in keys:
            assert ds_log[key] == pytest.approx(plain_log[key], rel=1e-4, abs=1e-6), (key, ds_log, plain_log)


def test_model_heads_load_whole_models_while_zero3_is_configured(tiny_classifier_path):
    """Under ZeRO-3 the trainer registers its DeepSpeed config with transformers, which then partitions every model
    `from_pretrained` builds; a classifier head scores with plain forwards outside the DeepSpeed engine, so it must
    load its model whole (it failed with "'weight' must be 2-D" before), and leave the registration in place."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    from trl_upo.heads import ClassifierHead

    keep = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        head = ClassifierHead(model=tiny_classifier_path, labels="positive", device="cpu")
        scores = head.score(["q", "q"], ["cats purr", "dogs bark"], role="chosen", columns={})
        assert len(scores) == 2 and all(0.0 < x < 1.0 for x in scores)
        model, _ = head.load()
        assert all(p.dim() == 2 for n, p in model.named_parameters() if n.endswith("proj.weight"))
        assert is_deepspeed_zero3_enabled(), "the trainer's ZeRO-3 registration must survive the head's loading"
    finally:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        del keep


_FAKE_SRUN_PARALLEL = """#!/bin/bash
# test double: start the task on every "node" at once (here: processes of this machine), as srun does
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i SLURMD_NODENAME=node-$i "$@" & pids+=($!); done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc
"""


@pytest.mark.slow
def test_slurm_script_trains_on_two_simulated_nodes(tmp_path, standins):
    """The sbatch script with the real `accelerate launch` on two "nodes" of this machine (srun and scontrol test
    doubles; one process per node, gloo on CPU, DDP config): both launchers rendezvous at the first host with their
    machine ranks, and the DDP recipe trains two steps across them."""
    path = ROOT / "recipes" / "ddp_lora_llama3.1-8b.yaml"
    base, cache = standins
    data, _ = cpu_recipe(load_recipe(path), base, cache)
    data.update(output_dir=str(tmp_path / "out"), upo_score_cache_dir=str(tmp_path / "cache"),
                save_strategy="steps", save_steps=2)
    recipe = write_recipe(data, tmp_path / "cpu.yaml")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = '#!/bin/bash\n[ "$1 $2" = "show hostnames" ] || exit 1\necho 127.0.0.1\necho 127.0.0.1\n'
    for name, text in (("srun", _FAKE_SRUN_PARALLEL), ("scontrol", scontrol)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "TRL_UPO_LAUNCHED"))}
    env.update(PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", SLURM_NNODES="2",
               SLURM_JOB_NODELIST="localhost-[0-1]", GPUS_PER_NODE="1", MAIN_PROCESS_PORT="29541",
               ACCELERATE_CONFIG=str(ROOT / "recipes" / "accelerate" / "multi_gpu.yaml"), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(sbatch_scripts()[0]), str(recipe)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "nodes=2 gpus/node=1 world=2 main=127.0.0.1:29541" in proc.stdout
    # each node's local main process reports the save; only the global main process lists the files it wrote
    saves = [line for line in proc.stdout.splitlines() if line.startswith("Model saved to")]
    assert len(saves) == 2 and sum(line.endswith("().") for line in saves) == 1, saves
    with open(tmp_path / "out" / "checkpoint-2" / "trainer_state.json") as f:
        state = json.load(f)
    assert state["global_step"] == 2
    assert all(math.isfinite(h["loss"]) for h in state["log_history"] if "loss" in h)
