"""Helpers for tests/test_recipes.py: find the recipes, swap their hub models, datasets and head models for tiny local
ones of the same family and format, and turn their bf16/CUDA-only settings into CPU ones.

Every hub name a recipe uses must be in one of the tables below (a recipe naming an unknown model, dataset or head
model fails its test with a message saying which table to extend): the swap is explicit, never guessed.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import ROOT

RECIPES = ROOT / "recipes"
ACCELERATE_DIR = RECIPES / "accelerate"
SLURM_DIR = RECIPES / "slurm"

#: Hub model of a recipe -> the transformers family (``model_type``) of the tiny stand-in (tests/tiny.py).
HUB_MODELS = {
    "Qwen/Qwen2.5-1.5B-Instruct": "qwen2",
    "Qwen/Qwen2.5-7B-Instruct": "qwen2",
    "meta-llama/Llama-3.1-8B-Instruct": "llama",
    "meta-llama/Llama-3.1-70B-Instruct": "llama",
    "mistralai/Mistral-7B-Instruct-v0.3": "mistral",
}
#: Hub dataset of a recipe -> its format: ``standard`` (prompt/chosen/rejected strings), ``conversational``
#: (message lists with an explicit prompt) or ``conversational_implicit`` (chosen/rejected message lists that share
#: the prompt turns, no prompt column), plus the extra columns the real dataset has.
HUB_DATASETS = {
    # chosen, rejected (user + assistant messages), score_chosen, score_rejected; splits train / test
    "trl-lib/ultrafeedback_binarized": ("conversational_implicit", ("score_chosen", "score_rejected")),
    # prompt (multi-turn messages), chosen, rejected (one assistant message each); splits train / test
    "trl-lib/hh-rlhf-helpful-base": ("conversational", ()),
    # prompt, completion (messages), label (bool); unpaired, for KTO
    "trl-lib/kto-mix-14k": ("conversational_unpaired", ()),
}
#: Hub classifier used by a ``classifier`` head -> its label names (``config.id2label``), kept by the stand-in.
HUB_CLASSIFIERS = {
    "s-nlp/roberta_toxicity_classifier": ["neutral", "toxic"],
}
#: Head types whose ``params.model`` is a hub model to swap: classifier -> labels above, reward_model -> 1 label.
MODEL_HEAD_TYPES = ("classifier", "reward_model")

#: Overrides that make any recipe a 2-step CPU run; each one says which GPU-only or slow setting it replaces.
CPU_OVERRIDES: dict[str, Any] = {
    "use_cpu": True,  # no CUDA device
    "bf16": False,  # bf16 autocast is a GPU setting here (and DPOConfig's default)
    "fp16": False,
    "tf32": None,  # Ampere-only
    "max_steps": 2,
    "logging_steps": 1,
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 2,
    "save_strategy": "no",
    "report_to": "none",
    "push_to_hub": False,
    "dataloader_num_workers": 0,
    "dataset_num_proc": None,
    "disable_tqdm": True,
}
#: ``attn_implementation`` values that need a CUDA kernel, replaced by ``sdpa``.
CUDA_ATTENTION = (
    "flash_attention_2", "flash_attention_3", "kernels-community/flash-attn", "kernels-community/flash-attn3",
)
#: Optimizers that need CUDA (bitsandbytes' paged optimizers page GPU memory to the host), replaced by AdamW.
CUDA_OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit", "paged_lion_8bit", "paged_lion_32bit")


def training_recipes() -> list[Path]:
    """Every training recipe in the tree: the YAML files under ``recipes/`` except the accelerate configs."""
    return sorted(p for p in RECIPES.rglob("*.yaml") if ACCELERATE_DIR not in p.parents)


def accelerate_configs() -> list[Path]:
    """Every accelerate configuration under ``recipes/accelerate/``."""
    return sorted(ACCELERATE_DIR.glob("*.yaml"))


def sbatch_scripts() -> list[Path]:
    """Every SLURM launch script under ``recipes/slurm/``."""
    return sorted(SLURM_DIR.glob("*.sbatch"))


def rel(path: Path) -> str:
    """``path`` relative to the repository root, as the recipes' commands spell it."""
    return str(Path(path).resolve().relative_to(ROOT))


def load_recipe(path: Path) -> dict:
    """The recipe's YAML mapping."""
    with open(path) as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict), f"{rel(path)} must be a YAML mapping"
    return data


def header(path: Path) -> str:
    """The comment block a recipe opens with, without the ``#`` markers."""
    lines = []
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return "\n".join(lines)


def header_commands(path: Path, program: str) -> list[list[str]]:
    """The command lines in a recipe's header that start with ``program`` (``trl-upo``, ``accelerate``, ``sbatch``),
    at the start of a line or after a ``Label:``, split like a shell would; a trailing ``  (comment)`` is dropped."""
    import shlex

    out = []
    for line in header(path).splitlines():
        m = re.match(rf"^(?:[A-Za-z][\w ,]*:\s+)?({re.escape(program)}\s.*)$", line)
        if m:
            out.append(shlex.split(re.sub(r"\s{2,}\(.*\)$", "", m.group(1))))
    return out


def dataclass_keys() -> set[str]:
    """Every key the dataclasses of ``trl-upo train`` take (a key that is also an ``accelerate launch`` option, such
    as ``gradient_accumulation_steps``, goes to the dataclass)."""
    from trl_upo.cli.train import make_parser

    return {a.dest for a in make_parser()._actions if a.option_strings and a.dest != "help"}


def installed_keys(data: dict) -> dict:
    """A recipe mapping as ``trl-upo train`` reads it: keys that transformers renamed
    (``trl_upo.cli.common.RENAMED_KEYS``, e.g. ``activation_checkpointing``, formerly ``gradient_checkpointing``)
    under the name the installed dataclasses take."""
    from trl_upo.cli.common import rename_keys

    return rename_keys(data, dataclass_keys(), "in the recipe")


def launch_keys_of(data: dict) -> dict:
    """The keys of a recipe mapping that go to ``accelerate launch`` rather than to a dataclass."""
    from trl_upo.cli.launch import launch_keys

    keys = set(launch_keys()) - dataclass_keys()
    return {k: v for k, v in data.items() if k in keys}


# ---------------------------------------------------------------------------------------------------------------
# Tiny stand-ins
# ---------------------------------------------------------------------------------------------------------------


def tiny_model(cache: dict, tmp: Path, hub_name: str) -> str:
    """Path of a tiny local model of the hub model's family (built once per ``cache``)."""
    from tests.tiny import save_tiny_causal_lm

    if hub_name not in HUB_MODELS:
        raise AssertionError(
            f"recipe model {hub_name!r} has no tiny stand-in: add it and its family to HUB_MODELS in "
            "tests/recipe_utils.py (a family tests.tiny.TINY_FAMILIES builds)."
        )
    family = HUB_MODELS[hub_name]
    key = ("model", family)
    if key not in cache:
        # hidden size 64: bitsandbytes' CPU kernel for 4-bit layers in eval mode packs weights in blocks of 64 input
        # features, and fails on a 32-wide layer (any real model is a multiple of 64)
        cache[key] = save_tiny_causal_lm(str(tmp / f"tiny-{family}"), family=family, hidden_size=64)
    return cache[key]


def tiny_head_model(cache: dict, tmp: Path, head_type: str, hub_name: str) -> str:
    """Path of a tiny local classifier (same labels) or scalar reward model standing in for a head's hub model."""
    from tests.tiny import save_tiny_classifier

    if head_type == "classifier":
        if hub_name not in HUB_CLASSIFIERS:
            raise AssertionError(
                f"classifier {hub_name!r} has no tiny stand-in: add it and its labels to HUB_CLASSIFIERS in "
                "tests/recipe_utils.py."
            )
        labels = HUB_CLASSIFIERS[hub_name]
    else:
        labels = None
    key = (head_type, hub_name)
    if key not in cache:
        safe = re.sub(r"[^\w.-]", "_", hub_name)
        cache[key] = save_tiny_classifier(str(tmp / f"tiny-{head_type}-{safe}"), labels=labels)
    return cache[key]


def _rows(fmt: str, extra: tuple, n: int, seed: int) -> list[dict]:
    from trl_upo.quickstart_task import preference_rows

    rng = random.Random(seed)
    out = []
    for r in preference_rows(n, seed=seed, conversational=fmt != "standard"):
        if fmt == "conversational_implicit":
            row = {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
        elif fmt == "conversational":
            # a multi-turn prompt, as in HH-RLHF
            first = [{"role": "user", "content": "tell me about rain"}, {"role": "assistant", "content": "rain is wet"}]
            row = {"prompt": first + r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
        elif fmt == "conversational_unpaired":
            out += [
                {"prompt": r["prompt"], "completion": r["chosen"], "label": True},
                {"prompt": r["prompt"], "completion": r["rejected"], "label": False},
            ]
            continue
        else:
            row = dict(r)
        for col in extra:
            row[col] = float(rng.randint(1, 10))
        out.append(row)
    return out


def tiny_dataset(cache: dict, tmp: Path, hub_name: str, n_train: int = 12, n_test: int = 4) -> str:
    """A local dataset directory (``train.jsonl``, ``test.jsonl``) in the hub dataset's format."""
    if hub_name not in HUB_DATASETS:
        raise AssertionError(
            f"recipe dataset {hub_name!r} has no local stand-in: add its format to HUB_DATASETS in "
            "tests/recipe_utils.py."
        )
    key = ("dataset", hub_name)
    if key not in cache:
        fmt, extra = HUB_DATASETS[hub_name]
        d = tmp / ("data-" + re.sub(r"[^\w.-]", "_", hub_name))
        d.mkdir(parents=True, exist_ok=True)
        for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
            with open(d / f"{split}.jsonl", "w") as f:
                for row in _rows(fmt, extra, n, seed):
                    f.write(json.dumps(row) + "\n")
        cache[key] = str(d)
    return cache[key]


def _is_hub_name(value: str) -> bool:
    return isinstance(value, str) and not value.startswith("upo://") and not os.path.exists(value)


def cpu_recipe(data: dict, tmp: Path, cache: dict) -> tuple[dict, list[str]]:
    """A copy of a recipe mapping that runs 2 training steps on CPU with tiny local stand-ins, and the list of what
    was changed (for failure messages). Launch keys are dropped: the run is one in-process CPU process."""
    out = copy.deepcopy(data)
    changes: list[str] = []

    def setv(key, value, why):
        if out.get(key, "<unset>") != value:
            changes.append(f"{key}: {out.get(key, '<unset>')!r} -> {value!r} ({why})")
        out[key] = value

    for key in launch_keys_of(out):
        changes.append(f"{key}: dropped (accelerate launch option; the test runs one CPU process)")
        del out[key]
    if _is_hub_name(out.get("model_name_or_path")):
        setv("model_name_or_path", tiny_model(cache, tmp, out["model_name_or_path"]), "tiny model, same family")
    if out.get("dtype") not in (None, "float32", "auto"):
        setv("dtype", "float32", "bf16 weights: a GPU setting")
    if out.get("attn_implementation") in CUDA_ATTENTION:
        setv("attn_implementation", "sdpa", "flash attention needs CUDA")
    if out.get("optim") in CUDA_OPTIMIZERS:
        setv("optim", "adamw_torch", "paged optimizers need CUDA")
    if _is_hub_name(out.get("dataset_name")):
        setv("dataset_name", tiny_dataset(cache, tmp, out["dataset_name"]), "local data, same format")
    for entry in out.get("datasets") or []:
        if _is_hub_name(entry.get("path")):
            changes.append(f"datasets[].path: {entry['path']!r} -> local data, same format")
            entry["path"] = tiny_dataset(cache, tmp, entry["path"])
            entry.pop("name", None)
            entry["data_files"] = {entry.get("split", "train"): str(Path(entry["path"]) / "train.jsonl")}
            entry["path"] = "json"
    for head in out.get("reward_heads") or []:
        head_type = head.get("type", head.get("name"))
        params = head.get("params") or {}
        if head_type in MODEL_HEAD_TYPES and _is_hub_name(params.get("model")):
            changes.append(f"reward_heads[{head['name']}].params.model: {params['model']!r} -> tiny local model")
            params["model"] = tiny_head_model(cache, tmp, head_type, params["model"])
            params["device"] = "cpu"
    for key, value in CPU_OVERRIDES.items():
        setv(key, value, "CPU test run")
    ga = out.get("gradient_accumulation_steps", 1)
    if ga > 2:
        setv("gradient_accumulation_steps", 2, "fewer micro-batches per step on CPU")
    if "eval_steps" in out:
        # after the last step, not between the two: on CPU, bitsandbytes (0.50) repacks 4-bit weights for inference
        # the first time they run in eval mode and keeps that layout, whose kernel has no backward (see
        # docs/recipes.md); training after an evaluation would backpropagate through it
        setv("eval_steps", 2, "evaluate within the 2 steps")
    setv("output_dir", str(tmp / "out"), "test output")
    setv("upo_score_cache_dir", str(tmp / "score-cache"), "fresh score cache")
    if out.get("report_before_after"):
        setv("report_num_prompts", 4, "short report on CPU")
        setv("report_num_samples", 1, "short report on CPU")
    return out, changes


def write_recipe(data: dict, path: Path) -> Path:
    """Write a recipe mapping to ``path`` as YAML."""
    with open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return path


# ---------------------------------------------------------------------------------------------------------------
# FSDP2 + 4-bit on CPU (a torchrun worker: python -m torch.distributed.run --nproc_per_node 2 -m tests.recipe_utils
# fsdp2-qlora <tiny model dir> <output json>)
# ---------------------------------------------------------------------------------------------------------------


def fsdp_plugin_from_accelerate_config(config: Path):
    """The ``FullyShardedDataParallelPlugin`` a process launched with ``accelerate launch --config_file <config>``
    builds: the launch environment accelerate derives from the file, then the plugin read from that environment."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "trl_upo.cli.train"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    os.environ.update({k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_"))})
    plugin = FullyShardedDataParallelPlugin()
    plugin.set_mixed_precision(env.get("ACCELERATE_MIXED_PRECISION", "no"))
    return plugin


def _fsdp2_qlora_worker(model_dir: str, out_json: str, mixed_precision: str | None = None) -> None:
    """Load the tiny model the way the FSDP2 QLoRA recipe loads its model (its 4-bit settings, its LoRA), shard it
    with accelerate's own FSDP2 preparation and the recipe's accelerate config, and compare the sharded forward and
    backward with the unsharded model's."""
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import get_peft_config, get_quantization_config

    from trl_upo.cli.train import parse

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    recipe = RECIPES / "fsdp2_qlora_llama3.1-70b.yaml"
    _, training_args, model_args, _, _ = parse(["--config", str(recipe), "--use_cpu", "true"])
    plugin = fsdp_plugin_from_accelerate_config(ROOT / load_recipe(recipe)["accelerate_config"])
    if mixed_precision is not None:
        plugin.mixed_precision_policy = None
        if mixed_precision != "no":
            plugin.set_mixed_precision(mixed_precision)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=get_quantization_config(model_args), dtype=getattr(torch, model_args.dtype),
        **{k: v for k, v in (training_args.model_init_kwargs or {}).items() if k != "device_map"},
    )
    peft_config = get_peft_config(model_args)
    peft_config.init_lora_weights = False  # non-zero adapters, so the LoRA path changes the output
    peft_config.lora_dropout = 0.0  # as DPOConfig's disable_dropout does; dropout would make two passes differ
    model = get_peft_model(model, peft_config, autocast_adapter_dtype=False)
    model.train()
    x = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]])

    def loss_of(logits):
        return logits.float().logsumexp(-1).mean()

    ref = model(x).logits
    loss_of(ref).backward()
    ref_logits = ref.detach().float()
    ref_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    model.zero_grad(set_to_none=True)
    four_bit = [n for n, p in model.named_parameters() if p.__class__.__name__ == "Params4bit"]
    nan_patterns = sum(int(torch.isnan(p.data).sum()) for n, p in model.named_parameters() if n in four_bit)
    shim = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), device=torch.device("cpu"),
                           is_main_process=rank == 0, mixed_precision="bf16", torch_device_mesh=None)
    model = fsdp2_prepare_model(shim, model)
    sharded = {n for n, p in model.named_parameters() if hasattr(p, "to_local") and p.to_local().numel() < p.numel()}
    out = model(x)
    diff = float((out.logits.detach().float() - ref_logits).abs().max())
    loss_of(out.logits).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    full = {n: (g.full_tensor() if hasattr(g, "full_tensor") else g) for n, g in grads.items() if g is not None}
    grad_diff = max(float((full[n].float() - ref_grads[n].float()).abs().max()) for n in full)
    result = dict(
        world_size=dist.get_world_size(), max_abs_logit_diff=diff, ref_logit_scale=float(ref_logits.abs().max()),
        four_bit_weights=len(four_bit), four_bit_weights_sharded=len(set(four_bit) & sharded),
        nan_bit_patterns_in_packed_weights=nan_patterns,
        lora_grads=len(grads), lora_grads_present=len(full), max_abs_lora_grad_diff=grad_diff,
        lora_grad_scale=max(float(g.abs().max()) for g in ref_grads.values()),
        mixed_precision_policy=str(plugin.mixed_precision_policy),
    )
    if rank == 0:
        with open(out_json, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    import sys

    if sys.argv[1] == "fsdp2-qlora":
        _fsdp2_qlora_worker(*sys.argv[2:])
