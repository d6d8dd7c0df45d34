"""``trl-upo train``: train with UPO from a YAML recipe, like ``trl dpo``.

    trl-upo train --config recipe.yaml [--any_field value ...]
    trl-upo train [--any_field value ...]            # no --config: the CPU quickstart recipe, with the flags applied
    accelerate launch [launch options] -m trl_upo.cli.train --config recipe.yaml

One parser over four dataclasses, as in ``trl dpo``: :class:`UPOScriptArguments` (data and reporting),
:class:`~trl_upo.UPOConfig` (every ``DPOConfig`` field plus the UPO fields), ``trl.ModelConfig`` (model, LoRA and
4-bit options) and ``trl.DatasetMixtureConfig`` (dataset mixtures). The YAML sets defaults, flags override them, an
``env:`` block is exported before anything else runs. ``trl-upo score`` reads the same recipes with this parser.

Keys that no dataclass takes are ``accelerate launch`` options (``num_processes``, ``accelerate_config``,
``num_machines``, ``machine_rank``, ``main_process_ip``, ...): the command then re-launches itself through
``accelerate launch`` (:mod:`trl_upo.cli.launch`). Any other key is an error that names the closest valid key,
raised before anything loads. ``trainer: kto`` trains with ``trl_upo.kto.UPOKTOTrainer`` (like ``trl kto``), and the
recipe is then parsed against ``UPOKTOConfig``. Other stacks' recipes: the alignment handbook's ``dataset_mixture``
(:mod:`trl_upo.cli.mixture`), TRL's ``reward_funcs``/``reward_weights`` (:mod:`trl_upo.cli.rewards`), and renamed
keys (``trl_upo.cli.common.RENAMED_KEYS``).

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
    RENAMED_KEYS,
    UsageError,
    end_distributed,
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
from trl_upo.cli.launch import die_with_launcher, launch_keys, launch_options, relaunch, under_launcher
from trl_upo.cli.trainers import TRAINERS, trainer_classes
from trl_upo.resources import RESOURCE_PREFIX, resolve_flags, resolve_inputs, resolve_resource

#: The recipe ``trl-upo train`` runs when it is given no ``--config``.
QUICKSTART_RECIPE = RESOURCE_PREFIX + "quickstart.yaml"
#: Flags that make a command line a run of its own (no quickstart recipe under it).
OWN_RUN_KEYS = ("model_name_or_path", "dataset_name", "datasets", "dataset_mixture")


@dataclass
class UPOScriptArguments(ScriptArguments):
    """Script arguments of ``trl-upo train``: TRL's ``ScriptArguments`` plus the trainer, other stacks' recipe keys,
    the console output and a before/after report.

    Args:
        trainer: ``dpo`` (``UPOTrainer``, the default) or ``kto`` (``trl_upo.kto.UPOKTOTrainer``, unpaired data with
            ``prompt``, ``completion`` and a boolean ``label``).
        console: ``compact`` (a progress bar and a table of the logged steps) or ``full`` (transformers' metric
            dicts at every logging step). Every metric goes to ``report_to`` and ``output_dir/log_history.json``
            either way.
        reward_funcs: TRL's reward functions as ``function`` heads (see :mod:`trl_upo.cli.rewards`).
        reward_weights: One weight per ``reward_funcs`` entry.
        dataset_mixture: The alignment handbook's dataset mixture (see :mod:`trl_upo.cli.mixture`).
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
    trainer: str = field(
        default="dpo",
        metadata={"help": "dpo (UPOTrainer) or kto (trl_upo.kto.UPOKTOTrainer).", "choices": list(TRAINERS)},
    )
    console: str = field(
        default="compact",
        metadata={"help": "compact: a progress bar and a table of the logged steps; full: transformers' metric dicts.",
                  "choices": ["compact", "full"]},
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={"help": "TRL reward functions as function heads: trl.rewards names, dotted paths, or factory calls "
                  "like 'get_soft_overlong_punishment(max_completion_len=512, soft_punish_cache=64)'."},
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward_funcs entry (default 1.0 each)."}
    )
    dataset_mixture: str | None = field(
        default=None,
        metadata={"help": "The alignment handbook's mixture: {datasets: [{id, config, split, columns, weight}], seed, "
                  "test_split_size} (JSON on the command line)."},
    )


class UPOParser(TrlParser):
    """``trl.TrlParser`` that resolves ``upo://`` asset names in the recipe's input values and in input flags
    (outputs such as ``output_dir`` never take one: :mod:`trl_upo.resources`), and gives renamed keys
    (``trl_upo.cli.common.RENAMED_KEYS``) the name the installed dataclasses take."""

    def set_defaults_with_config(self, **kwargs):
        """Set the recipe's values as defaults, ``upo://`` inputs resolved (see ``trl.TrlParser``)."""
        kwargs = rename_keys(kwargs, option_names(self), "in the recipe")
        return super().set_defaults_with_config(**resolve_inputs(kwargs))

    def parse_args_into_dataclasses(self, args=None, *a, **kw):
        """Parse flags into the dataclasses, ``upo://`` inputs resolved (see ``transformers.HfArgumentParser``)."""
        if args is not None:
            args = resolve_flags(rename_flags(list(args), self))
        return super().parse_args_into_dataclasses(args, *a, **kw)


def make_parser(subparsers=None, prog: str | None = None, extra_dataclasses: tuple[type, ...] = (),
                trainer: str = "dpo"):
    """The ``trl.TrlParser`` of ``trl-upo train``, over (UPOScriptArguments, the trainer's config class, ModelConfig,
    DatasetMixtureConfig), with abbreviated flags disabled (``--learning_rat`` is an error, not a prefix match) and a
    ``--help`` that lists trl-upo's own options first.

    Args:
        subparsers: An ``argparse`` subparsers action to register a ``upo`` subcommand on (as ``trl``'s scripts
            accept); ``None`` returns a standalone parser.
        prog: Program name shown in usage and errors.
        extra_dataclasses: More argument dataclasses, after the four (a calling command's own options).
        trainer: The ``trainer:`` value whose config class the parser takes (:data:`TRAINERS`).

    Returns:
        The parser.
    """
    from trl import DatasetMixtureConfig, ModelConfig

    config_class, _ = trainer_classes(trainer)
    dataclass_types = (UPOScriptArguments, config_class, ModelConfig, DatasetMixtureConfig, *extra_dataclasses)
    if subparsers is not None:
        return subparsers.add_parser("upo", help="Run UPO training", dataclass_types=dataclass_types)
    from trl_upo.cli.help import HELP_INTRO, RecipeHelpFormatter, order_recipe_help

    parser = UPOParser(dataclass_types, prog=prog, allow_abbrev=False, formatter_class=RecipeHelpFormatter,
                       usage=f"{prog or 'trl-upo train'} [--config RECIPE.yaml] [--key value ...]",
                       description=HELP_INTRO)
    order_recipe_help(parser, UPOScriptArguments, config_class, extra_dataclasses)
    _default_under_new_name(parser, config_class)
    return parser


def _default_under_new_name(parser, config_class: type) -> None:
    """Where the installed transformers has both ``activation_checkpointing`` and its deprecated alias
    ``gradient_checkpointing`` (5.23+), give the new name the config's default of the old one (TRL's ``DPOConfig``
    sets ``gradient_checkpointing=True``): otherwise a recipe that sets neither gets transformers' FutureWarning about
    a key it never wrote. The value is the same; only the name changes."""
    fields = config_class.__dataclass_fields__
    for new, old, _ in RENAMED_KEYS:
        if new in fields and old in fields and fields[new].default is None and fields[old].default is not None:
            parser.set_defaults(**{new: fields[old].default})


def _trainer_kind(config: dict[str, Any] | None, rest: list[str]) -> str:
    """The ``trainer`` a command line or recipe selects (the flag wins), before the parser is built."""
    for i, tok in enumerate(rest):
        if tok.startswith("--trainer="):
            return tok.split("=", 1)[1]
        if tok == "--trainer" and i + 1 < len(rest):
            return rest[i + 1]
    return str((config or {}).get("trainer") or "dpo")


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
    ``reward_funcs``/``reward_weights`` become ``function`` heads appended to ``reward_heads``, and
    ``dataset_mixture`` is checked.

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
    import dataclasses

    from trl_upo.cli.mixture import check_mixture
    from trl_upo.cli.rewards import reward_func_heads

    path, rest = pop_config(argv)
    config = read_yaml(path, "recipe", allow_empty=False) if path else None
    parser = make_parser(prog=prog, extra_dataclasses=extra_dataclasses, trainer=_trainer_kind(config, rest))
    config = rename_keys(config, option_names(parser), f"in the recipe {path}") if config is not None else None
    rest = rename_flags(rest, parser)
    _check_keys(path, config, rest, parser, prog, extra_dataclasses)
    try:
        script_args, training_args, *others, config_remaining, cli_remaining = parser.parse_args_and_config(
            (["--config", path] if path else []) + rest, return_remaining_strings=True, separate_remaining_strings=True
        )
        script_args.dataset_mixture = check_mixture(script_args.dataset_mixture)
        heads = reward_func_heads(script_args.reward_funcs, script_args.reward_weights,
                                  [s.name for s in training_args.head_specs])
        resolved = resolve_resource([*training_args.reward_heads, *heads])  # upo:// in a --reward_heads JSON flag
        if resolved != training_args.reward_heads:
            training_args = dataclasses.replace(training_args, reward_heads=resolved)
    except (ValueError, TypeError) as e:
        hint = " On a machine without a GPU, set `bf16: false` and `use_cpu: true` (--bf16 false --use_cpu true)."
        raise UsageError(str(e) + (hint if "bf16" in str(e) and "gpu" in str(e).lower() else "")) from e
    return (script_args, training_args, *others, launch_options(config_remaining, cli_remaining))


def main(argv: list[str] | None = None, prog: str | None = "trl-upo train") -> int:
    """Run ``trl-upo train`` with ``argv``; without ``--config``, the packaged CPU quickstart recipe with the flags
    applied (unless the flags name their own model or dataset).

    Args:
        argv: Command-line arguments after ``train``.
        prog: Program name for usage and error messages.

    Returns:
        The exit code: 0 on success, 2 on a usage error, the launcher's code when re-launched.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    die_with_launcher()  # a rank of `trl-upo train --num_processes N` ends with its launcher
    if any(a in ("-h", "--help") for a in argv):
        return run_command(prog, lambda: _print_help(argv, prog))
    full = with_quickstart(argv)
    if full != argv and not under_launcher():
        flags = f" with {' '.join(argv)}" if argv else ""
        print(f"{prog}: no --config: running the CPU quickstart recipe ({QUICKSTART_RECIPE}){flags}; give --config "
              f"RECIPE.yaml to run your own.", flush=True)
    return run_command(prog, lambda: _run(full, prog))


def _print_help(argv: list[str], prog: str | None) -> None:
    """``--help`` for the trainer the command line or its recipe selects (``trainer: kto``: UPOKTOConfig's options)."""
    path, rest = pop_config([a for a in argv if a not in ("-h", "--help")])
    config = read_yaml(path, "recipe") if path else None
    make_parser(prog=prog, trainer=_trainer_kind(config, rest)).print_help()


def with_quickstart(argv: list[str]) -> list[str]:
    """``argv`` with ``--config upo://quickstart.yaml`` in front when it has no ``--config`` and names no model or
    data of its own (:data:`OWN_RUN_KEYS`): the flags then apply to the quickstart recipe."""
    has_config = any(a == "--config" or a.startswith("--config=") for a in argv)
    own_run = any(a.lstrip("-").split("=")[0].replace("-", "_") in OWN_RUN_KEYS for a in argv if a.startswith("--"))
    return argv if has_config or own_run else ["--config", QUICKSTART_RECIPE, *argv]


def _run(argv: list[str], prog: str | None) -> int:
    script_args, training_args, model_args, dataset_args, launch = parse(argv, prog)
    if launch and not under_launcher():
        from trl_upo.cli.checks import preflight

        preflight(script_args, training_args, model_args)  # a usage error: one message and exit 2, not N tracebacks
        return relaunch(argv, launch, use_cpu=bool(training_args.use_cpu), prog=prog)
    if launch:
        keys = ", ".join(k for k, _ in launch)
        print(f"{prog}: already running under a launcher; launch options ({keys}) are the launcher's business.",
              file=sys.stderr)
    completed = False
    try:
        train(script_args, training_args, model_args, dataset_args)
        completed = True
    finally:
        end_distributed(completed)  # the trainer is released by now: no rank waits in the group's destructor
    return 0


def recipe_datasets(script_args, dataset_args):
    """The ``DatasetDict`` of a recipe: the handbook's ``dataset_mixture`` (:mod:`trl_upo.cli.mixture`), TRL's
    ``datasets:`` mixture (``trl.get_dataset``, as ``trl dpo`` loads it), or ``dataset_name`` read by
    :func:`trl_upo.data.loading.load_splits` (a single file becomes the train split).

    Args:
        script_args: The parsed :class:`UPOScriptArguments`.
        dataset_args: The parsed ``trl.DatasetMixtureConfig``.

    Returns:
        The splits.

    Raises:
        UsageError: no dataset given, or two of the three ways given.
        DatasetLoadError: a dataset that cannot be loaded (see :mod:`trl_upo.data.loading`).
    """
    from trl import get_dataset

    from trl_upo.cli.mixture import load_mixture
    from trl_upo.data.loading import load_splits

    given = [k for k, v in (("dataset_mixture", script_args.dataset_mixture), ("datasets", dataset_args.datasets),
                            ("dataset_name", script_args.dataset_name)) if v]
    if len(given) > 1:
        raise UsageError(f"the recipe gives {' and '.join(given)}: give one way of naming the data.")
    if script_args.dataset_mixture:
        return load_mixture(script_args.dataset_mixture, script_args.dataset_train_split,
                            script_args.dataset_test_split)
    if dataset_args.datasets:
        return get_dataset(dataset_args)
    if not script_args.dataset_name:
        raise UsageError(
            "no dataset: give `dataset_name` (hub name, local path or upo://...), `dataset_mixture` or `datasets:`."
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


def quiet_progress(training_args, console: str = "full") -> None:
    """With ``disable_tqdm``, silence the progress bars of datasets and of weight loading (and with them the
    scoring bars). Every console mode keeps them otherwise: scoring, tokenizing and loading are long phases on real
    data (see ``trl_upo.cli.console``)."""
    if training_args.disable_tqdm:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


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


def _build_trainer(trainer_class, model_id: str, training_args, model_args, train_ds, eval_ds):
    """The trainer, with the quantization config where its constructor takes one (else in ``model_init_kwargs``)."""
    import inspect

    from trl import get_peft_config, get_quantization_config

    kwargs = dict(model=model_id, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                  peft_config=get_peft_config(model_args))
    quantization = get_quantization_config(model_args)
    if "quantization_config" in inspect.signature(trainer_class.__init__).parameters:
        kwargs["quantization_config"] = quantization
    elif quantization is not None:
        training_args.model_init_kwargs["quantization_config"] = quantization
    return trainer_class(**kwargs)


def train(script_args, training_args, model_args, dataset_args):
    """Train with the parsed recipe, save the model (and ``upo_state.json``) to ``output_dir``; return the
    trainer.

    Args:
        script_args: The parsed :class:`UPOScriptArguments`.
        training_args: The parsed config (:class:`~trl_upo.UPOConfig`, or ``UPOKTOConfig`` with ``trainer: kto``).
        model_args: The parsed ``trl.ModelConfig`` (model, LoRA and 4-bit options).
        dataset_args: The parsed ``trl.DatasetMixtureConfig``.

    Returns:
        The trainer.
    """
    from trl_upo.atomic import atomic_write
    from trl_upo.checkpoints import save_final
    from trl_upo.cli.checks import preflight
    from trl_upo.cli.console import silence_upstream_deprecations, use_compact_console
    from trl_upo.cli.report import REPORT_FILE, format_report, policy_report
    from trl_upo.card import save_card

    _, trainer_class = trainer_classes(script_args.trainer)
    silence_upstream_deprecations()
    quiet_progress(training_args, script_args.console)
    preflight(script_args, training_args, model_args)
    if script_args.torch_num_threads:
        import torch

        torch.set_num_threads(script_args.torch_num_threads)
    model_id = model_args.model_name_or_path
    training_args.model_init_kwargs = _model_init_kwargs(training_args, model_args)

    ds = recipe_datasets(script_args, dataset_args)
    train_ds = _split(ds, script_args.dataset_train_split, "train")
    eval_ds = _split(ds, script_args.dataset_test_split, "test") if training_args.eval_strategy != "no" else None
    report_ds = _split(ds, script_args.dataset_test_split, "test") if script_args.report_before_after else None

    trainer = _build_trainer(trainer_class, model_id, training_args, model_args, train_ds, eval_ds)
    if script_args.console == "compact":
        use_compact_console(trainer)
    if script_args.ignore_bias_buffers:
        import torch

        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]
    before = policy_report(trainer, script_args, model_id, report_ds, before=True) if report_ds is not None else None
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    save_final(trainer, training_args.output_dir)  # marked complete (upo_complete.json); card and push come below
    report = None
    if report_ds is not None:
        after = policy_report(trainer, script_args, model_id, report_ds, before=False)
        if trainer.accelerator.is_main_process:
            report = {"before": before, "after": after}
            with atomic_write(os.path.join(training_args.output_dir, REPORT_FILE)) as f:
                json.dump(report, f, indent=2, default=str)
            print(format_report(before, after), flush=True)
    # The model card (README.md): TRL's, with the UPO section (heads, alpha, the before/after numbers); also with
    # save_strategy: no, where TRL writes none.
    save_card(trainer, training_args.output_dir, report, script_args.dataset_name)
    saved = sorted(os.listdir(training_args.output_dir)) if trainer.accelerator.is_main_process else []
    trainer.accelerator.print(f"Model saved to {os.path.abspath(training_args.output_dir)} ({', '.join(saved)}).")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    for tracker in getattr(trainer.accelerator, "trackers", []):
        tracker.finish()  # what trainer.end() does, without destroying the group under the live DDP model
    return trainer


if __name__ == "__main__":
    from trl_upo.cli import pop_debug

    sys.exit(main(pop_debug(sys.argv[1:]), prog="python -m trl_upo.cli.train"))
