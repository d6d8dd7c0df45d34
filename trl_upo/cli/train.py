"""``trl-upo train``: train with UPO from a YAML recipe, like ``trl dpo``.

    trl-upo train --config recipe.yaml [--any_field value ...]
    trl-upo train                                    # no arguments: the CPU quickstart recipe
    accelerate launch [launch options] -m trl_upo.cli.train --config recipe.yaml

One parser over four dataclasses, as in ``trl dpo``: :class:`UPOScriptArguments` (data and reporting),
:class:`~trl_upo.UPOConfig` (every ``DPOConfig`` field plus the UPO fields), ``trl.ModelConfig`` (model, LoRA and
4-bit options) and ``trl.DatasetMixtureConfig`` (dataset mixtures). The YAML sets defaults, flags override them, an
``env:`` block is exported before anything else runs.

Keys that no dataclass takes are ``accelerate launch`` options (``num_processes``, ``accelerate_config``,
``num_machines``, ``machine_rank``, ``main_process_ip``, ...): the command then re-launches itself through
``accelerate launch``. Any other key is an error that names the closest valid key, raised before anything loads.

Packaged assets: a string value that starts with ``upo://`` names a file or directory under the package's
``trl_upo/resources/`` (``upo://tiny-llama``, ``upo://quickstart-data``, ``upo://quickstart.yaml``), so a recipe
can point at the embedded model and data wherever the package is installed. Hub names and local paths are used as
given.
"""

from __future__ import annotations

import difflib
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import ScriptArguments

#: Prefix of packaged assets in recipes: ``upo://<path>`` is ``trl_upo/resources/<path>``.
RESOURCE_PREFIX = "upo://"
RESOURCES_DIR = Path(__file__).resolve().parents[1] / "resources"
#: The recipe ``trl-upo train`` runs when it is given no arguments.
QUICKSTART_RECIPE = RESOURCE_PREFIX + "quickstart.yaml"
#: Where ``report_before_after`` writes its numbers, in ``output_dir``.
REPORT_FILE = "report.json"
#: Set in the environment of processes this command launches, so that they train instead of launching again.
LAUNCHED_ENV = "TRL_UPO_LAUNCHED"
# Set by `accelerate launch` (every launcher: simple, multi-GPU, DeepSpeed, FSDP) or by torchrun in its workers.
_LAUNCHER_ENV = ("ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_MIXED_PRECISION", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")
# `accelerate launch` options that would break the re-launch of this same entry point.
_NOT_LAUNCH_KEYS = {"help", "training_script", "training_script_args", "module", "no_python", "env"}


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


def make_parser(subparsers=None, prog: str | None = None):
    """The ``trl.TrlParser`` of ``trl-upo train``, over (UPOScriptArguments, UPOConfig, ModelConfig,
    DatasetMixtureConfig), with abbreviated flags disabled (``--learning_rat`` is an error, not a prefix match).

    Args:
        subparsers: An ``argparse`` subparsers action to register a ``upo`` subcommand on (as ``trl``'s scripts
            accept); ``None`` returns a standalone parser.
        prog: Program name shown in usage and errors.
    """
    from trl import DatasetMixtureConfig, ModelConfig, TrlParser

    from trl_upo import UPOConfig

    class UPOParser(TrlParser):
        """TrlParser that resolves ``upo://`` asset names in the recipe's values and in flag values."""

        def set_defaults_with_config(self, **kwargs):
            return super().set_defaults_with_config(**resolve_resource(kwargs))

        def parse_args_into_dataclasses(self, args=None, *a, **kw):
            if args is not None:
                args = [_resolve_token(t) for t in args]
            return super().parse_args_into_dataclasses(args, *a, **kw)

    dataclass_types = (UPOScriptArguments, UPOConfig, ModelConfig, DatasetMixtureConfig)
    if subparsers is not None:
        return subparsers.add_parser("upo", help="Run UPO training", dataclass_types=dataclass_types)
    return UPOParser(dataclass_types, prog=prog, allow_abbrev=False)


def _resolve_token(tok: str) -> str:
    if tok.startswith("--") and "=" in tok:
        key, value = tok.split("=", 1)
        return f"{key}={resolve_resource(value)}"
    return resolve_resource(tok)


# ----------------------------------------------------------------------------------------------------------------
# Packaged assets
# ----------------------------------------------------------------------------------------------------------------


def resolve_resource(value: Any) -> Any:
    """Replace ``upo://<path>`` by the path of ``<path>`` under the packaged ``trl_upo/resources/`` directory,
    recursively in lists and mappings; any other value is returned unchanged.

    Raises:
        FileNotFoundError: the named asset is not in the package.
    """
    if isinstance(value, str) and value.startswith(RESOURCE_PREFIX):
        rel = value[len(RESOURCE_PREFIX) :].strip("/")
        path = RESOURCES_DIR / rel
        if not path.exists():
            available = sorted(p.name for p in RESOURCES_DIR.iterdir() if not p.name.startswith(("_", ".")))
            raise FileNotFoundError(
                f"{value!r} names {path}, which is not in the installed trl_upo package. Packaged assets: "
                f"{[RESOURCE_PREFIX + a for a in available]}."
            )
        return str(path)
    if isinstance(value, list):
        return [resolve_resource(v) for v in value]
    if isinstance(value, dict):
        return {k: resolve_resource(v) for k, v in value.items()}
    return value


def _resolve_config_arg(argv: list[str]) -> list[str]:
    argv = list(argv)
    for i, tok in enumerate(argv):
        if tok == "--config" and i + 1 < len(argv):
            argv[i + 1] = resolve_resource(argv[i + 1])
        elif tok.startswith("--config="):
            argv[i] = "--config=" + resolve_resource(tok.split("=", 1)[1])
    # TrlParser only understands `--config PATH`.
    out: list[str] = []
    for tok in argv:
        out += ["--config", tok.split("=", 1)[1]] if tok.startswith("--config=") else [tok]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Launch options
# ----------------------------------------------------------------------------------------------------------------


def launch_keys() -> dict[str, bool]:
    """``accelerate launch`` options a recipe or flag may give, as ``{key: takes_a_value}``; plus
    ``accelerate_config`` (a file, or the name of a config in ``recipes/accelerate/`` or in TRL's
    ``accelerate_configs``)."""
    from accelerate.commands.launch import launch_command_parser

    keys: dict[str, bool] = {"accelerate_config": True}
    for action in launch_command_parser()._actions:
        if action.dest in _NOT_LAUNCH_KEYS or not action.option_strings:
            continue
        for opt in action.option_strings:
            if opt.startswith("--"):
                keys[opt[2:].replace("-", "_")] = action.nargs != 0
    return keys


def _dataclass_keys(parser) -> list[str]:
    return sorted({a.dest for a in parser._actions if a.option_strings and a.dest != "help"} | {"env"})


def _split_remaining(
    tokens: list[str], launch: dict[str, bool], from_yaml: bool
) -> tuple[list[tuple[str, Any]], list[str], list[str]]:
    """Read ``--key [value]`` tokens left over by the dataclass parser: (launch options, unknown keys, stray
    tokens)."""
    found: list[tuple[str, Any]] = []
    unknown: list[str] = []
    stray: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            stray.append(tok)
            i += 1
            continue
        key, _, inline = tok[2:].partition("=")
        key = key.replace("-", "_")
        takes_value = launch.get(key)
        has_next = i + 1 < len(tokens) and not tokens[i + 1].startswith("--")
        if takes_value is None:
            unknown.append(key)
            i += 2 if (has_next and not inline) else 1
            continue
        if inline:
            value: Any = inline
            i += 1
        elif takes_value or (from_yaml and has_next) or (has_next and tokens[i + 1].lower() in ("true", "false")):
            if not has_next:
                raise _UsageError(f"`{key}` needs a value (accelerate launch option --{key}).")
            value = tokens[i + 1]
            i += 2
        else:
            value = True
            i += 1
        found.append((key, value))
    return found, unknown, stray


def resolve_accelerate_config(name: str) -> str:
    """Path of an accelerate config given as a file, or as the name of one in ``recipes/accelerate/`` (of the
    current directory or of the source tree this package runs from) or in TRL's ``accelerate_configs``.

    Args:
        name: A file path, or a config name with or without ``.yaml``.

    Raises:
        _UsageError: neither a file nor a known name (the message lists the known names).
    """
    import importlib.resources as resources

    if Path(name).is_file():
        return str(Path(name).resolve())
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    searched = []
    for base in (Path.cwd() / "recipes" / "accelerate", RESOURCES_DIR.parents[1] / "recipes" / "accelerate"):
        candidate = base / f"{stem}.yaml"
        searched.append(str(base))
        if candidate.is_file():
            return str(candidate)
    trl_dir = resources.files("trl.accelerate_configs")
    candidate = trl_dir.joinpath(f"{stem}.yaml")
    if candidate.is_file():
        return str(candidate)
    names = sorted({p.stem for b in searched if Path(b).is_dir() for p in Path(b).glob("*.yaml")}
                   | {p.name[:-5] for p in trl_dir.iterdir() if p.name.endswith(".yaml")})
    close = difflib.get_close_matches(stem, names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise _UsageError(
        f"accelerate_config {name!r} is neither a file nor a known config.{hint} Known names: {names} (from "
        f"{', '.join(searched)} and TRL's accelerate_configs)."
    )


def under_launcher() -> bool:
    """Whether this process was started by ``accelerate launch`` / torchrun (or re-launched by this command)."""
    return any(k in os.environ for k in (LAUNCHED_ENV, *_LAUNCHER_ENV))


def build_launch_args(options: list[tuple[str, Any]], use_cpu: bool) -> list[str]:
    """``accelerate launch`` arguments for the launch options of a recipe and its flags (flags last, so they win).

    On CPU (``use_cpu: true``, or no CUDA device), several processes need the multi-GPU launcher (torchrun), with
    the training processes on CPU: ``accelerate launch --cpu --num_processes 2`` starts ONE process. So with
    ``num_processes > 1`` and no distributed mode given, ``--multi_gpu`` is added and ``--cpu`` dropped.

    Args:
        options: ``(key, value)`` launch options in order (recipe first, then flags); boolean options take a
            boolean or a ``"true"``/``"false"`` string.
        use_cpu: The run's ``use_cpu`` setting.

    Returns:
        The arguments of ``accelerate launch`` before the training module.
    """
    import torch

    merged: dict[str, Any] = {}
    for key, value in options:
        merged[key] = value
    args: list[str] = []
    if "accelerate_config" in merged:
        args += ["--config_file", resolve_accelerate_config(str(merged.pop("accelerate_config")))]
    num_processes = int(merged.get("num_processes", 1) or 1)
    on_cpu = use_cpu or _truthy(merged.get("cpu", False)) or not torch.cuda.is_available()
    distributed = any(_truthy(merged.get(k, False)) for k in ("multi_gpu", "use_deepspeed", "use_fsdp", "tpu"))
    if num_processes > 1 and on_cpu and not distributed and "--config_file" not in args:
        merged.pop("cpu", None)
        merged["multi_gpu"] = True
        if int(merged.get("num_machines", 1) or 1) == 1:
            merged.setdefault("num_machines", 1)
        merged.setdefault("mixed_precision", "no")
        merged.setdefault("dynamo_backend", "no")
    takes_value = launch_keys()
    for key, value in merged.items():
        if takes_value.get(key, True):
            args += [f"--{key}", str(value)]
        elif _truthy(value):
            args.append(f"--{key}")
    return args


def _truthy(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


class _UsageError(ValueError):
    """A problem with the command line or the recipe (exit code 2, no traceback)."""


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------


def _check_keys(argv: list[str], parser, extra_keys: tuple[str, ...] = ()) -> None:
    """Find unknown keys in the recipe and on the command line before any dataclass is built; return nothing, or
    raise a :class:`_UsageError` listing every unknown key with the closest valid one."""
    import yaml
    from trl.scripts.utils import DatasetConfig

    launch = launch_keys()
    dests = _dataclass_keys(parser)
    valid = dests + sorted(launch) + list(extra_keys)
    problems: list[str] = []

    def unknown(key: str, where: str, choices: list[str]) -> None:
        close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        problems.append(f"unknown key `{key}` in the {where}{hint}")

    rest = list(argv)
    if "--config" in rest:
        i = rest.index("--config")
        if i + 1 >= len(rest):
            raise _UsageError("`--config` needs the path of a YAML recipe.")
        path = rest[i + 1]
        del rest[i : i + 2]
        try:
            with open(path) as f:
                config = yaml.safe_load(f)
        except OSError as e:
            raise _UsageError(f"cannot read the recipe {path!r}: {e.strerror}.") from None
        except yaml.YAMLError as e:
            raise _UsageError(f"the recipe {path!r} is not valid YAML: {e}") from None
        if not isinstance(config, dict):
            raise _UsageError(
                f"the recipe {path!r} must be a YAML mapping of `key: value`, got {type(config).__name__}."
            )
        if "env" in config and not isinstance(config["env"], dict):
            raise _UsageError(f"`env` in {path!r} must be a mapping of environment variables to values.")
        for key in config:
            if key not in dests and key not in launch:
                unknown(str(key), f"recipe {path}", valid)
        fields = list(DatasetConfig.__dataclass_fields__)
        for j, entry in enumerate(config.get("datasets") or []):
            if not isinstance(entry, dict):
                problems.append(f"datasets[{j}] must be a mapping with `path` and optional {fields[1:]}")
                continue
            for key in entry:
                if key not in fields:
                    unknown(str(key), f"recipe {path} (datasets[{j}])", fields)
    _, remaining = parser.parse_known_args(rest)
    _, cli_unknown, stray = _split_remaining(remaining, launch, from_yaml=False)
    for key in cli_unknown:
        unknown(key, "command line", valid)
    for tok in stray:
        problems.append(f"unexpected argument {tok!r} on the command line (options are `--key value`)")
    if problems:
        raise _UsageError(
            "\n  ".join(["invalid recipe or options:", *problems]) + "\nValid keys are the fields of "
            "UPOScriptArguments, UPOConfig, trl.ModelConfig and trl.DatasetMixtureConfig, and `accelerate launch` "
            "options; `trl-upo train --help` lists them."
        )


def parse(argv: list[str], prog: str | None = None, extra_keys: tuple[str, ...] = ()):
    """Parse ``argv`` strictly: returns ``(script_args, training_args, model_args, dataset_args, launch_options)``.

    Unknown keys are checked first, before any dataclass is built or anything is loaded. The recipe's ``env:``
    block is exported to ``os.environ``.

    Raises:
        _UsageError: a key that no dataclass and no ``accelerate launch`` option takes (naming the closest valid
            key), a stray value, or a value a dataclass rejects. ``extra_keys`` (a calling command's own flags,
            already removed from ``argv``) count as valid in the suggestions.
    """
    argv = _resolve_config_arg(argv)
    parser = make_parser(prog=prog)
    _check_keys(argv, parser, extra_keys)
    try:
        *dataclasses, config_remaining, cli_remaining = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except (ValueError, TypeError) as e:
        raise _UsageError(str(e)) from e
    launch = launch_keys()
    yaml_launch = _split_remaining(config_remaining, launch, from_yaml=True)[0]
    cli_launch = _split_remaining(cli_remaining, launch, from_yaml=False)[0]
    return (*dataclasses, yaml_launch + cli_launch)


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
    try:
        script_args, training_args, model_args, dataset_args, launch_options = parse(argv, prog)
    except (_UsageError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if launch_options and not under_launcher():
        try:
            return relaunch(argv, launch_options, use_cpu=bool(training_args.use_cpu), prog=prog)
        except _UsageError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
    if launch_options:
        keys = ", ".join(k for k, _ in launch_options)
        print(f"{prog}: already running under a launcher; launch options ({keys}) are the launcher's business.",
              file=sys.stderr)
    try:
        train(script_args, training_args, model_args, dataset_args)
    except (_UsageError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


def _strip_launch_args(argv: list[str], launch_options: list[tuple[str, Any]]) -> list[str]:
    keys = {k for k, _ in launch_options}
    takes_value = launch_keys()
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        key = tok[2:].partition("=")[0].replace("-", "_") if tok.startswith("--") else None
        if key in keys:
            has_next = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            boolean_value = has_next and argv[i + 1].lower() in ("true", "false")
            consumes = "=" not in tok and has_next and (takes_value.get(key, True) or boolean_value)
            i += 2 if consumes else 1
            continue
        out.append(tok)
        i += 1
    return out


def relaunch(argv: list[str], launch_options: list[tuple[str, Any]], use_cpu: bool, prog: str | None = None) -> int:
    """Start this same entry point under ``accelerate launch`` with the recipe's launch options; return its exit
    code. The launched processes see ``TRL_UPO_LAUNCHED=1`` and train.

    Args:
        argv: This command's arguments; the launch options are removed from them, the rest is passed on.
        launch_options: The launch options found by :func:`parse`.
        use_cpu: The run's ``use_cpu`` setting (see :func:`build_launch_args`).
        prog: Program name for the printed command.
    """
    launch_args = build_launch_args(launch_options, use_cpu)
    script_args = _strip_launch_args(argv, launch_options)
    from accelerate.commands.launch import launch_command_parser

    # Fail on a bad launch value here, with accelerate's own message, rather than in a subprocess.
    launch_command_parser().parse_args([*launch_args, "-m", "trl_upo.cli.train", *script_args])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "-m", "trl_upo.cli.train", *script_args]
    print(f"{prog}: launching: accelerate launch {shlex.join(cmd[3:])}", flush=True)
    env = {**os.environ, LAUNCHED_ENV: "1"}
    return subprocess.call(cmd, env=env)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def load_datasets(script_args, dataset_args):
    """The ``DatasetDict`` of a recipe: a mixture (``datasets:``) or ``dataset_name`` (a hub name, a local
    directory or file, or ``upo://...``), as ``trl dpo`` loads them.

    Args:
        script_args: The parsed :class:`UPOScriptArguments`.
        dataset_args: The parsed ``trl.DatasetMixtureConfig``.

    Raises:
        _UsageError: no dataset given, or a file of an unknown type.
    """
    from datasets import DatasetDict, load_dataset
    from trl import get_dataset

    if dataset_args.datasets:
        if script_args.dataset_name:
            print("Both `datasets` and `dataset_name` are given: the `datasets` mixture is used.", file=sys.stderr)
        return get_dataset(dataset_args)
    if not script_args.dataset_name:
        raise _UsageError(
            "no dataset: give `dataset_name` (hub name, local path or upo://...) or a `datasets:` mixture."
        )
    name = script_args.dataset_name
    path = Path(name)
    if path.is_file():
        suffix = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix)
        if suffix is None:
            raise _UsageError(f"dataset_name {name!r} is a file of unknown type; use .jsonl, .json, .csv or .parquet.")
        ds = load_dataset(suffix, data_files={script_args.dataset_train_split: str(path)})
    else:
        ds = load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)
    return ds if isinstance(ds, DatasetDict) or hasattr(ds, "keys") else DatasetDict({"train": ds})


def _split(ds, name: str, what: str):
    if name not in ds:
        raise _UsageError(
            f"the dataset has no {what} split {name!r} (splits: {list(ds.keys())}); set dataset_{what}_split, or "
            f"test_split_size for a mixture."
        )
    return ds[name]


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


def train(script_args, training_args, model_args, dataset_args):
    """Train with the parsed recipe, save the model (and ``upo_state.json``) to ``output_dir``; return the
    trainer.

    Args:
        script_args: The parsed :class:`UPOScriptArguments`.
        training_args: The parsed :class:`~trl_upo.UPOConfig`.
        model_args: The parsed ``trl.ModelConfig`` (model, LoRA and 4-bit options).
        dataset_args: The parsed ``trl.DatasetMixtureConfig``.
    """
    from trl import get_peft_config, get_quantization_config

    from trl_upo import UPOTrainer

    quiet_progress(training_args)
    if script_args.report_before_after and _sharded_parameters(training_args):
        raise _UsageError(
            "report_before_after generates on the main process only, which sharded parameters (FSDP, DeepSpeed "
            "ZeRO-3) do not allow. Set report_before_after: false and evaluate the saved model with `trl-upo eval`."
        )
    if script_args.report_before_after and (model_args.load_in_4bit or model_args.load_in_8bit):
        import torch

        if not torch.cuda.is_available():
            raise _UsageError(
                "report_before_after with a bitsandbytes-quantized model on CPU: the 'before' report runs the model "
                "in inference mode, after which bitsandbytes' CPU kernel keeps its inference layout and some LoRA "
                "gradients are silently lost (measured with bitsandbytes 0.50). Set report_before_after: false and "
                "evaluate the saved adapter with `trl-upo eval`."
            )
    if script_args.torch_num_threads:
        import torch

        torch.set_num_threads(script_args.torch_num_threads)
    model_id = model_args.model_name_or_path
    if not model_id:
        raise _UsageError("no model: give `model_name_or_path` (hub name, local path or upo://...).")
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs

    ds = load_datasets(script_args, dataset_args)
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
    """
    from trl_upo.heads.base import build_head

    keep, left_out = [], []
    for spec in training_args.head_specs:
        columns = getattr(build_head(spec), "required_columns", lambda: [])()
        (left_out if columns else keep).append((spec, columns))
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
