"""``trl-upo train``: train with UPO from a YAML recipe, like ``trl dpo``.

    trl-upo train --config recipe.yaml [--any_field value ...]
    trl-upo train                                    # no arguments: the CPU quickstart recipe
    accelerate launch [launch options] -m trl_upo.cli.train --config recipe.yaml

One parser over four dataclasses, as in ``trl dpo``: :class:`UPOScriptArguments` (data and reporting),
:class:`~trl_upo.UPOConfig` (every ``DPOConfig`` field plus the UPO fields), ``trl.ModelConfig`` (model, LoRA and
4-bit options) and ``trl.DatasetMixtureConfig`` (dataset mixtures). The YAML sets defaults, flags override them, an
``env:`` block is exported before anything else runs. ``trl-upo score`` reads the same recipes with this parser.

Keys that no dataclass takes are ``accelerate launch`` options (``num_processes``, ``accelerate_config``,
``num_machines``, ``machine_rank``, ``main_process_ip``, ...): the command then re-launches itself through
``accelerate launch`` (:mod:`trl_upo.cli.launch`). Any other key is an error that names the closest valid key,
raised before anything loads.

Packaged assets: a string value that starts with ``upo://`` names a file or directory under the package's
``trl_upo/resources/`` (:mod:`trl_upo.resources`), so a recipe can point at the embedded model and data wherever
the package is installed. The dataset is read by :mod:`trl_upo.data.loading`.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from trl import ScriptArguments, TrlParser

from trl_upo.cli.common import (
    UsageError,
    leftover_problems,
    option_names,
    pop_config,
    raise_problems,
    read_yaml,
    rename_flags,
    rename_keys,
    run_command,
    split_leftovers,
    unknown_key,
)
from trl_upo.cli.launch import launch_keys, launch_options, relaunch, under_launcher
from trl_upo.resources import RESOURCE_PREFIX, resolve_resource

#: The recipe ``trl-upo train`` runs when it is given no arguments.
QUICKSTART_RECIPE = RESOURCE_PREFIX + "quickstart.yaml"
#: Where ``report_before_after`` writes its numbers, in ``output_dir``.
REPORT_FILE = "report.json"


@dataclass
class UPOScriptArguments(ScriptArguments):
    """Script arguments of ``trl-upo train``: TRL's ``ScriptArguments`` plus a before/after report.

    Args:
        report_before_after: Before and after training, sample answers to the test split's prompts and print the
            designer metrics (each reward head's mean score on the generated text) and the held-out preference
            accuracy, with ``trl_upo.evaluation.evaluate_policy``.
        report_num_prompts: At most this many test prompts (and pairs) in the report.
        report_num_samples: Answers sampled per prompt in the report.
        report_max_new_tokens: Length limit of the sampled answers.
        torch_num_threads: CPU threads of torch in each process (``torch.set_num_threads``); unset: torch's
            default. Small models on a shared machine run several times faster with 1 (measured on the quickstart:
            31 s instead of 186 s on 2 busy cores).
    """

    report_before_after: bool = field(
        default=False,
        metadata={
            "help": "Before and after training, print each reward head's mean score on answers sampled for the test "
            "prompts, and the held-out preference accuracy."
        },
    )
    report_num_prompts: int = field(default=64, metadata={"help": "Test prompts (and pairs) in the report."})
    report_num_samples: int = field(default=4, metadata={"help": "Answers sampled per prompt in the report."})
    report_max_new_tokens: int = field(default=16, metadata={"help": "Length limit of the sampled answers."})
    torch_num_threads: int | None = field(
        default=None, metadata={"help": "CPU threads of torch per process (torch.set_num_threads); unset: default."}
    )


class UPOParser(TrlParser):
    """``trl.TrlParser`` that resolves ``upo://`` asset names in the recipe's values and in flag values, and gives
    renamed keys (``trl_upo.cli.common.RENAMED_KEYS``) the name the installed dataclasses take."""

    def set_defaults_with_config(self, **kwargs):
        """Set the recipe's values as defaults, ``upo://`` names resolved (see ``trl.TrlParser``)."""
        kwargs = rename_keys(kwargs, option_names(self), "in the recipe")
        return super().set_defaults_with_config(**resolve_resource(kwargs))

    def parse_args_into_dataclasses(self, args=None, *a, **kw):
        """Parse flags into the dataclasses, ``upo://`` names resolved (see ``transformers.HfArgumentParser``)."""
        if args is not None:
            args = [_resolve_token(t) for t in rename_flags(list(args), self)]
        return super().parse_args_into_dataclasses(args, *a, **kw)


def _resolve_token(tok: str) -> str:
    if tok.startswith("--") and "=" in tok:
        key, value = tok.split("=", 1)
        return f"{key}={resolve_resource(value)}"
    return resolve_resource(tok)


def make_parser(subparsers=None, prog: str | None = None, extra_dataclasses: tuple[type, ...] = ()):
    """The ``trl.TrlParser`` of ``trl-upo train``, over (UPOScriptArguments, UPOConfig, ModelConfig,
    DatasetMixtureConfig), with abbreviated flags disabled (``--learning_rat`` is an error, not a prefix match).

    Args:
        subparsers: An ``argparse`` subparsers action to register a ``upo`` subcommand on (as ``trl``'s scripts
            accept); ``None`` returns a standalone parser.
        prog: Program name shown in usage and errors.
        extra_dataclasses: More argument dataclasses, after the four (a calling command's own options).

    Returns:
        The parser.
    """
    from trl import DatasetMixtureConfig, ModelConfig

    from trl_upo import UPOConfig

    dataclass_types = (UPOScriptArguments, UPOConfig, ModelConfig, DatasetMixtureConfig, *extra_dataclasses)
    if subparsers is not None:
        return subparsers.add_parser("upo", help="Run UPO training", dataclass_types=dataclass_types)
    return UPOParser(dataclass_types, prog=prog, allow_abbrev=False)


def _recipe_problems(path: str, config: dict[str, Any], valid: list[str], launch: dict[str, bool]) -> list[str]:
    """Unknown keys of a recipe, and of each entry of its ``datasets:`` mixture."""
    from trl.scripts.utils import DatasetConfig

    if "env" in config and not isinstance(config["env"], dict):
        raise UsageError(f"`env` in {path!r} must be a mapping of environment variables to values.")
    taken = set(valid) - set(launch)
    problems = [unknown_key(str(k), f"recipe {path}", valid) for k in config if k not in taken and k not in launch]
    fields = list(DatasetConfig.__dataclass_fields__)
    for j, entry in enumerate(config.get("datasets") or []):
        if not isinstance(entry, dict):
            problems.append(f"datasets[{j}] must be a mapping with `path` and optional {fields[1:]}")
            continue
        problems += [unknown_key(str(k), f"recipe {path} (datasets[{j}])", fields) for k in entry if k not in fields]
    return problems


def _check_keys(path: str | None, config: dict[str, Any] | None, rest: list[str], parser, prog: str | None,
                extra_dataclasses: tuple[type, ...]) -> None:
    """Find unknown keys in the recipe and on the command line before any dataclass is built; raise one
    :class:`~trl_upo.cli.common.UsageError` listing every unknown key with the closest valid one."""
    launch = launch_keys()
    dests = sorted({*option_names(parser), "env"})
    valid = dests + sorted(launch)
    problems = _recipe_problems(path, config, valid, launch) if config is not None else []
    _, remaining = parser.parse_known_args(rest)
    _, cli_unknown, stray = split_leftovers(remaining, launch)
    problems += leftover_problems(cli_unknown, stray, valid)
    names = ["UPOScriptArguments", "UPOConfig", "trl.ModelConfig", *(d.__name__ for d in extra_dataclasses)]
    raise_problems(
        problems,
        f"Valid keys are the fields of {', '.join(names)} and trl.DatasetMixtureConfig, and `accelerate launch` "
        f"options; `{prog or 'trl-upo train'} --help` lists them.",
        header="invalid recipe or options:",
    )


def parse(argv: list[str], prog: str | None = None, extra_dataclasses: tuple[type, ...] = ()):
    """Parse ``argv`` strictly: returns ``(script_args, training_args, model_args, dataset_args, launch_options)``.

    Renamed keys (``trl_upo.cli.common.RENAMED_KEYS``) take their installed name, then unknown keys are checked,
    before any dataclass is built or anything is loaded. The recipe's ``env:`` block is exported to ``os.environ``.

    Args:
        argv: The command's arguments (``--config PATH`` or ``--config=PATH``, flags).
        prog: Program name for usage and errors.
        extra_dataclasses: A calling command's own argument dataclasses; their instances come before the launch
            options in the result.

    Returns:
        The parsed dataclasses, then the ``accelerate launch`` options as ``(key, value)`` pairs.

    Raises:
        UsageError: a key that no dataclass and no ``accelerate launch`` option takes (naming the closest valid
            key), both names of a renamed key, a stray value, or a value a dataclass rejects.
    """
    path, rest = pop_config(argv)
    config = read_yaml(path, "recipe", allow_empty=False) if path else None
    parser = make_parser(prog=prog, extra_dataclasses=extra_dataclasses)
    config = rename_keys(config, option_names(parser), f"in the recipe {path}") if config is not None else None
    rest = rename_flags(rest, parser)
    _check_keys(path, config, rest, parser, prog, extra_dataclasses)
    try:
        *dataclasses, config_remaining, cli_remaining = parser.parse_args_and_config(
            (["--config", path] if path else []) + rest, return_remaining_strings=True, separate_remaining_strings=True
        )
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from e
    return (*dataclasses, launch_options(config_remaining, cli_remaining))


def main(argv: list[str] | None = None, prog: str | None = "trl-upo train") -> int:
    """Run ``trl-upo train`` with ``argv`` (no arguments: the packaged CPU quickstart recipe).

    Args:
        argv: Command-line arguments after ``train``.
        prog: Program name for usage and error messages.

    Returns:
        The exit code: 0 on success, 2 on a usage error, the launcher's code when re-launched.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(f"{prog}: no recipe given, running the CPU quickstart ({QUICKSTART_RECIPE}).", flush=True)
        argv = ["--config", QUICKSTART_RECIPE]
    return run_command(prog, lambda: _run(argv, prog))


def _run(argv: list[str], prog: str | None) -> int:
    script_args, training_args, model_args, dataset_args, launch = parse(argv, prog)
    if launch and not under_launcher():
        return relaunch(argv, launch, use_cpu=bool(training_args.use_cpu), prog=prog)
    if launch:
        keys = ", ".join(k for k, _ in launch)
        print(f"{prog}: already running under a launcher; launch options ({keys}) are the launcher's business.",
              file=sys.stderr)
    train(script_args, training_args, model_args, dataset_args)
    return 0


def recipe_datasets(script_args, dataset_args):
    """The ``DatasetDict`` of a recipe: its ``datasets:`` mixture (``trl.get_dataset``, as ``trl dpo`` loads it), or
    ``dataset_name`` read by :func:`trl_upo.data.loading.load_splits` (a single file becomes the train split).

    Args:
        script_args: The parsed :class:`UPOScriptArguments`.
        dataset_args: The parsed ``trl.DatasetMixtureConfig``.

    Returns:
        The splits.

    Raises:
        UsageError: no dataset given.
        DatasetLoadError: a dataset that cannot be loaded (see :mod:`trl_upo.data.loading`).
    """
    from trl import get_dataset

    from trl_upo.data.loading import load_splits

    if dataset_args.datasets:
        if script_args.dataset_name:
            print("Both `datasets` and `dataset_name` are given: the `datasets` mixture is used.", file=sys.stderr)
        return get_dataset(dataset_args)
    if not script_args.dataset_name:
        raise UsageError(
            "no dataset: give `dataset_name` (hub name, local path or upo://...) or a `datasets:` mixture."
        )
    return load_splits(
        script_args.dataset_name,
        config_name=script_args.dataset_config,
        file_split=script_args.dataset_train_split,
        streaming=script_args.dataset_streaming,
    )


def _split(ds, name: str, what: str):
    from trl_upo.data.loading import select_split

    return select_split(ds, name, fix=f"set dataset_{what}_split, or test_split_size for a mixture")


def _sharded_parameters(training_args) -> bool:
    """Whether the run shards parameters across processes (FSDP, or DeepSpeed ZeRO-3 as far as it is visible)."""
    env = os.environ
    return bool(
        getattr(training_args, "fsdp", None)
        or env.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        or (
            env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
            and env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
        )
    )


def quiet_progress(training_args) -> None:
    """With ``disable_tqdm``, also silence the progress bars of datasets and of weight loading."""
    if training_args.disable_tqdm:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def _check_report(script_args, training_args, model_args) -> None:
    """Refuse, before anything loads, a before/after report the run cannot make correctly."""
    if not script_args.report_before_after:
        return
    if _sharded_parameters(training_args):
        raise UsageError(
            "report_before_after generates on the main process only, which sharded parameters (FSDP, DeepSpeed "
            "ZeRO-3) do not allow. Set report_before_after: false and evaluate the saved model with `trl-upo eval`."
        )
    if model_args.load_in_4bit or model_args.load_in_8bit:
        import torch

        if not torch.cuda.is_available():
            raise UsageError(
                "report_before_after with a bitsandbytes-quantized model on CPU: the 'before' report runs the model "
                "in inference mode, after which bitsandbytes' CPU kernel keeps its inference layout and some LoRA "
                "gradients are silently lost (measured with bitsandbytes 0.50). Set report_before_after: false and "
                "evaluate the saved adapter with `trl-upo eval`."
            )


def _model_init_kwargs(training_args, model_args) -> dict[str, Any]:
    """``from_pretrained`` arguments from ``ModelConfig``, updated by the recipe's ``model_init_kwargs``."""
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        kwargs.update(training_args.model_init_kwargs)
    return kwargs


def train(script_args, training_args, model_args, dataset_args):
    """Train with the parsed recipe, save the model (and ``upo_state.json``) to ``output_dir``; return the
    trainer.

    Args:
        script_args: The parsed :class:`UPOScriptArguments`.
        training_args: The parsed :class:`~trl_upo.UPOConfig`.
        model_args: The parsed ``trl.ModelConfig`` (model, LoRA and 4-bit options).
        dataset_args: The parsed ``trl.DatasetMixtureConfig``.

    Returns:
        The ``UPOTrainer``.
    """
    from trl import get_peft_config, get_quantization_config

    from trl_upo import UPOTrainer

    quiet_progress(training_args)
    _check_report(script_args, training_args, model_args)
    if script_args.torch_num_threads:
        import torch

        torch.set_num_threads(script_args.torch_num_threads)
    model_id = model_args.model_name_or_path
    if not model_id:
        raise UsageError("no model: give `model_name_or_path` (hub name, local path or upo://...).")
    training_args.model_init_kwargs = _model_init_kwargs(training_args, model_args)

    ds = recipe_datasets(script_args, dataset_args)
    train_ds = _split(ds, script_args.dataset_train_split, "train")
    eval_ds = _split(ds, script_args.dataset_test_split, "test") if training_args.eval_strategy != "no" else None
    report_ds = _split(ds, script_args.dataset_test_split, "test") if script_args.report_before_after else None

    trainer = UPOTrainer(
        model=model_id,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    if script_args.ignore_bias_buffers:
        import torch

        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]
    before = _report(trainer, script_args, model_id, report_ds, before=True) if report_ds is not None else None
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if report_ds is not None:
        after = _report(trainer, script_args, model_id, report_ds, before=False)
        if trainer.accelerator.is_main_process:
            with open(os.path.join(training_args.output_dir, REPORT_FILE), "w") as f:
                json.dump({"before": before, "after": after}, f, indent=2, default=str)
            print(format_report(before, after), flush=True)
    saved = sorted(os.listdir(training_args.output_dir)) if trainer.accelerator.is_main_process else []
    trainer.accelerator.print(f"Model saved to {os.path.abspath(training_args.output_dir)} ({', '.join(saved)}).")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if hasattr(trainer, "end"):
        trainer.end()
    return trainer


def _report(trainer, script_args, model_id: str, report_ds, before: bool) -> dict | None:
    """Designer metrics and held-out preference accuracy of the current policy (main process only).

    Before training, the reference is the policy itself (implicit-reward accuracy 0.5 by definition, every pair a
    tie); after, it is the trainer's reference: the adapter-disabled model under PEFT, the ``ref_model``, or the
    starting model reloaded from ``model_name_or_path``.
    """
    from trl_upo.evaluation import evaluate_policy

    if not trainer.accelerator.is_main_process:
        return None
    model = trainer.accelerator.unwrap_model(trainer.model)
    from trl_upo.scoring import ensure_prompt

    n = min(script_args.report_num_prompts, len(report_ds))
    rows = ensure_prompt(report_ds.select(range(n)))  # an implicit prompt is extracted as DPOTrainer does
    if before:
        ref = model
    elif getattr(model, "peft_config", None):
        ref = None  # evaluate_policy disables the adapter
    elif trainer.ref_model is not None:
        ref = trainer.accelerator.unwrap_model(trainer.ref_model)
    else:
        ref = model_id
    was_training = model.training
    model.eval()
    try:
        result = evaluate_policy(
            model,
            trainer.processing_class,
            prompts=rows["prompt"],
            heads=report_heads(trainer.args, announce=before),
            pairs=rows,
            ref_model=ref,
            beta=trainer.args.beta,
            max_new_tokens=script_args.report_max_new_tokens,
            num_samples=script_args.report_num_samples,
            seed=trainer.args.seed,
        )
    finally:
        model.train(was_training)
    return result


def report_heads(training_args, announce: bool = False) -> list[dict]:
    """The reward heads the before/after report can apply to generated text: every head except those that read
    dataset columns (``column``), which have no value for a freshly generated answer.

    Args:
        training_args: The parsed :class:`~trl_upo.UPOConfig`.
        announce: Print which heads are left out of the report, and why (training still uses them).

    Returns:
        The spec dicts of the heads the report uses.
    """
    from trl_upo.heads import build_head

    keep, left_out = [], []
    for spec in training_args.head_specs:
        head = build_head(spec)
        reads = head.required_columns() or ([] if head.needs_text else ["no response text"])
        (left_out if reads else keep).append((spec, reads))
    if announce and left_out:
        names = ", ".join(f"{s.name} (reads {', '.join(c)})" for s, c in left_out)
        print(f"report_before_after: heads that read dataset columns cannot score generated answers and are left "
              f"out of the report (training uses them): {names}.", flush=True)
    return [spec.to_dict() for spec, _ in keep]


def format_report(before: dict, after: dict) -> str:
    """The before/after table: each head's mean score on generated answers, and the held-out preference accuracy
    (implicit reward against the reference, ties count half; and policy log-prob accuracy)."""
    heads = list(after["designer"])
    cols = [f"{h} (mean)" for h in heads] + ["pref. accuracy", "log-prob accuracy"]
    width = max(14, *(len(c) for c in cols))
    gen = after["generation"]
    lines = [
        "",
        f"Designer metrics on {gen['num_prompts']} held-out prompts x {gen['num_samples']} sampled answers "
        f"(head scores, higher is better); preference accuracy on {after['preference'].get('n', 0)} held-out pairs:",
        f"{'':<8}" + "".join(f"{c:>{width + 2}}" for c in cols),
    ]
    for name, r in (("before", before), ("after", after)):
        values = [r["designer"][h]["mean"] for h in heads]
        pref = r["preference"]
        values += [pref.get("accuracy", float("nan")), pref.get("policy_logp_accuracy", float("nan"))]
        lines.append(f"{name:<8}" + "".join(f"{v:>{width + 2}.3f}" for v in values))
    for name, r in (("before", before), ("after", after)):
        if r.get("samples"):
            sample = r["samples"][0]
            lines.append(f"{name:<8}sample: {sample['prompt']!r} -> {sample['response'].strip()!r}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python -m trl_upo.cli.train"))
