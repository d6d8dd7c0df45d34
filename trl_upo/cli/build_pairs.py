"""``trl-upo build-pairs``: build a preference dataset from prompts, by reward ranking or by self-critique.

    trl-upo build-pairs rank --dataset prompts.jsonl --model MODEL --num_candidates 4 \\
        --reward_model RM --output pairs.jsonl
    trl-upo build-pairs critique --dataset prompts.jsonl --model MODEL --output pairs.parquet
    trl-upo build-pairs --config build.yaml          # the YAML names the method: `method: rank`
    trl-upo build-pairs rank ... --unpaired          # unpaired rows for KTO: best answer desirable, worst not

The options are the fields of argument dataclasses (:class:`PairsIOArguments`, :class:`PairsGenerationArguments`,
and :class:`RankArguments` or :class:`CritiqueArguments`), parsed by ``transformers.HfArgumentParser``. Their
defaults are those of the library settings they fill (``RankConfig``, ``CritiqueConfig``, ``OutputSettings``); a
generation option left unset keeps ``GenerationSettings``' default. A YAML config (``--config``) takes the same keys
as the flags (without the dashes); flags given on the command line override it, and an unknown key is an error with
a did-you-mean suggestion. Values starting with ``upo://`` name the package's assets, as in ``trl-upo train``
recipes. The input is read by :func:`trl_upo.data.loading.load_split`. ``--unpaired`` (``OutputSettings.unpaired``)
writes each pair as two unpaired rows (``prompt``, ``completion``, boolean ``label``: the chosen answer desirable,
the rejected one undesirable; :func:`trl_upo.data.io.unpair_rows`), the data ``trainer: kto`` trains on.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from typing import Any

from trl_upo.cli.common import (
    HelpFormatter,
    UsageError,
    add_negative_flags,
    closest,
    did_you_mean,
    option,
    option_names,
    parse_strict,
    pop_config,
    read_yaml,
    run_command,
)
from trl_upo.data.critique import SELECTIONS, CritiqueConfig
from trl_upo.data.generation import BACKENDS, DTYPES, GenerationSettings
from trl_upo.data.io import FORMATS, OutputSettings
from trl_upo.data.rank import PAIRINGS, RANK_NORMALIZATIONS, RankConfig

#: The methods, each with its one-line help.
METHODS = {
    "rank": "score N candidates per prompt, pair best vs worst (or all above a margin)",
    "critique": "answer, critique under a principle, revise; chosen = revision",
}
#: Options whose value is a place to write to, never a packaged ``upo://`` asset.
_OUTPUT_KEYS = ("output", "shard_dir", "push_to_hub")


def _default(name: str, *settings: type) -> Any:
    """The default of field ``name`` in the library settings the option fills (None where they disagree: each then
    keeps its own, since unset options are not passed on)."""
    values = [s.__dataclass_fields__[name].default for s in settings]
    return values[0] if all(v == values[0] for v in values) else None


def _gen_help(text: str, name: str) -> str:
    return f"{text} (default {_default(name, GenerationSettings)})"


@dataclass
class PairsIOArguments:
    """Input, output and run options of both methods (``OutputSettings`` and the settings both configs share)."""

    _argument_group_name = "input and output"

    config: str | None = option("YAML file whose keys are this command's options (flags override it)", None)
    dataset: str | None = option(
        "prompts: a .jsonl/.json/.parquet/.csv file, a save_to_disk directory, a Hub id or upo://...", None
    )
    split: str = option("split of a Hub dataset or DatasetDict directory", "train")
    limit: int | None = option("use only the first N rows", None)
    remove_columns: list[str] | None = option(
        "input columns to leave out (e.g. the chosen/rejected of a preference dataset)", None, metavar="COLUMN"
    )
    prompt_column: str = option(
        "column holding the prompts (strings or message lists)", _default("prompt_column", RankConfig, CritiqueConfig)
    )
    output: str | None = option("output: a .jsonl or .parquet file, or a directory (save_to_disk)", None)
    format: str | None = option("output format (default: from --output)", None, choices=FORMATS)
    shard_dir: str | None = option("where finished batches are kept until the end (default: <output>.shards)", None)
    overwrite: bool = option("replace an existing output and discard shards of a run with other settings",
                             _default("overwrite", OutputSettings))
    keep_shards: bool = option("keep the shard directory after writing the output", _default("keep_shards",
                                                                                              OutputSettings))
    push_to_hub: str | None = option("also push the dataset to this Hub dataset repo", None, metavar="REPO_ID")
    hub_private: bool = option("create the Hub repo as private", _default("hub_private", OutputSettings))
    progress: bool = option("progress bars", _default("progress", OutputSettings))
    unpaired: bool = option(
        "write unpaired rows for KTO (prompt, completion, label): best answer desirable, worst undesirable",
        _default("unpaired", OutputSettings),
    )
    seed: int = option("run seed (each batch samples with a seed derived from it)",
                       _default("seed", RankConfig, CritiqueConfig))
    batch_size: int = option("prompts per batch and per shard", _default("batch_size", RankConfig, CritiqueConfig))


@dataclass
class PairsGenerationArguments:
    """Generation options (``GenerationSettings``; ``model_revision`` is its ``revision``). Unset: its default."""

    _argument_group_name = "generation"

    model: str | None = option("causal LM that generates (local directory, Hub id or upo://...)", None)
    backend: str | None = option(_gen_help("generation backend", "backend"), None, choices=BACKENDS)
    max_new_tokens: int | None = option(_gen_help("maximum new tokens per response", "max_new_tokens"), None)
    do_sample: bool | None = option("sample (default) or decode greedily", None, nargs="?", const=True)
    temperature: float | None = option(_gen_help("sampling temperature", "temperature"), None)
    top_p: float | None = option(_gen_help("nucleus sampling mass", "top_p"), None)
    dtype: str | None = option("model dtype", None, choices=DTYPES)
    device: str | None = option("cpu, cuda, cuda:1, ... (default: a GPU if there is one)", None)
    model_revision: str | None = option("Hub revision of --model", None)
    stop: list[str] | None = option("strings that end a response (cut before them)", None, metavar="TEXT")


@dataclass
class RankArguments:
    """Options of ``build-pairs rank`` (``RankConfig``)."""

    _argument_group_name = "ranking"

    reward_heads: str | None = option("reward head specs as JSON, like UPOConfig.reward_heads", None)
    reward_model: str | None = option(
        "shorthand for a reward_model head named 'reward_model' (weight 1)", None, metavar="PATH_OR_ID"
    )
    candidates_column: str | None = option("column with a list of N candidates per row", None)
    candidate_columns: list[str] | None = option("N columns with one candidate each", None)
    num_candidates: int | None = option("N candidates to generate per prompt (>= 2)", None)
    pairing: str = option("how candidates are paired", _default("pairing", RankConfig), choices=PAIRINGS)
    margin: float = option("ranking-score gap a pair must exceed", _default("margin", RankConfig))
    normalization: str = option(
        "per-prompt scale of each head before the weighted sum (heads without their own 'normalize')",
        _default("normalization", RankConfig), choices=RANK_NORMALIZATIONS,
    )
    tokenizer: str | None = option("tokenizer for heads that count tokens (default: --model's)", None)
    keep_candidates: bool = option("also store every candidate and its ranking score",
                                   _default("keep_candidates", RankConfig))


@dataclass
class CritiqueArguments:
    """Options of ``build-pairs critique`` (``CritiqueConfig``; an unset template keeps its default)."""

    _argument_group_name = "critique"

    response_column: str | None = option("critique these existing answers instead of generating them", None)
    principles: str | None = option("JSON list of {name, critique_request, revision_request}", None)
    principle_selection: str = option(
        "one principle per prompt (random) or a pair per principle (all)",
        _default("principle_selection", CritiqueConfig), choices=SELECTIONS,
    )
    num_revisions: int = option("critique-and-revise rounds (each revises the last)",
                                _default("num_revisions", CritiqueConfig))
    critique_template: str | None = option("placeholders {prompt} {response} {critique_request}", None)
    revision_template: str | None = option(
        "placeholders {prompt} {response} {critique} {revision_request} [{critique_request}]", None
    )


_METHOD_ARGUMENTS = {"rank": RankArguments, "critique": CritiqueArguments}
_GENERATION_KEYS = [f.name for f in dataclasses.fields(PairsGenerationArguments) if f.name != "model"]


def make_parser(method: str, prog: str) -> Any:
    """The ``transformers.HfArgumentParser`` of one method.

    Args:
        method: ``"rank"`` or ``"critique"``.
        prog: The command's program name.

    Returns:
        The parser.
    """
    from transformers import HfArgumentParser

    dtypes = (PairsIOArguments, PairsGenerationArguments, _METHOD_ARGUMENTS[method])
    parser = HfArgumentParser(dtypes, prog=f"{prog} {method}", description=METHODS[method],
                              formatter_class=HelpFormatter, allow_abbrev=False)
    add_negative_flags(parser, *dtypes)
    return parser


def _usage(prog: str) -> str:
    lines = [
        f"usage: {prog} {{rank,critique}} [--config FILE] [options]",
        "",
        "Build preference pairs from prompts: rank N candidates with reward heads (rank), or let a model critique and "
        "revise its answers (critique). Output: TRL preference data that UPOTrainer trains on directly.",
        "",
        "methods:",
        *(f"  {name:<10} {text}" for name, text in METHODS.items()),
        "",
        f"`{prog} <method> --help` lists a method's options; a --config YAML may name it as `method: rank`.",
    ]
    return "\n".join(lines)


def _method(argv: list[str], data: dict[str, Any], config: str | None, prog: str) -> str:
    """The method: the first argument, or ``method:`` in the YAML (which is removed from ``data``)."""
    method = argv[0] if argv and argv[0] in METHODS else None
    if "method" in data:
        yaml_method = data.pop("method")
        if yaml_method not in METHODS:
            raise UsageError(f"{config}: method must be one of {list(METHODS)}, got {yaml_method!r}.")
        if method is not None and method != yaml_method:
            raise UsageError(f"The command line says {method!r} but {config} says method: {yaml_method}.")
        return yaml_method
    if method is not None:
        return method
    if argv and not argv[0].startswith("-"):
        match = closest(argv[0], METHODS)
        hint = f" Did you mean {match!r}?" if match else ""
        raise UsageError(f"Unknown method {argv[0]!r}.{hint} Use `{prog} rank ...` or `{prog} critique ...`.")
    if argv and argv[0] in ("-h", "--help"):
        print(_usage(prog))
        raise SystemExit(0)
    raise UsageError(
        f"Name the method: `{prog} rank ...` or `{prog} critique ...` (or `method: rank` in the --config YAML)."
    )


def parse_args(argv: list[str], prog: str) -> argparse.Namespace:
    """Parse the command line (and the ``--config`` YAML it names) into one namespace.

    Args:
        argv: Command-line arguments after ``build-pairs``.
        prog: Program name for usage and errors.

    Returns:
        Every option, plus ``method`` and ``config``; ``upo://`` names resolved.

    Raises:
        UsageError: no or an unknown method, an unknown key (with a did-you-mean), or no dataset or output.
        SystemExit: ``--help``, or a value ``argparse`` rejects (it prints why).
    """
    config, argv = pop_config(argv)
    data = read_yaml(config, "config file") if config else {}
    method = _method(argv, data, config, prog)
    if argv and argv[0] == method:
        argv = argv[1:]
    parser = make_parser(method, prog)
    valid = [k for k in option_names(parser) if k != "config"]
    unknown = [repr(k) + did_you_mean(str(k), valid, quote="'") for k in data if k not in valid]
    if unknown:
        raise UsageError(
            f"{config} has unknown key(s) for `build-pairs {method}`: {', '.join(unknown)}. Valid keys: "
            f"{sorted(valid)}."
        )
    parser.set_defaults(**data)
    parsed = parse_strict(parser, argv, f"{prog} {method}")
    args = argparse.Namespace(**{k: v for obj in parsed for k, v in vars(obj).items()}, method=method)
    args.config = config
    _resolve_resources(args)
    for key in ("dataset", "output"):
        if getattr(args, key) is None:
            raise UsageError(f"--{key} is required (on the command line or as `{key}:` in the --config YAML).")
    return args


def _resolve_resources(args: argparse.Namespace) -> None:
    """``upo://<path>`` values name packaged assets, as in ``trl-upo train`` recipes (``upo://tiny-llama``,
    ``upo://quickstart-data/train.jsonl``), also inside a ``reward_heads`` JSON string."""
    import json

    from trl_upo.resources import RESOURCE_PREFIX, check_output_path, resolve_resource

    from trl_upo.cli.checks import expand_home

    for key in ("output", "shard_dir", "model"):  # `--key=~/x` and YAML leave `~` as it is
        if hasattr(args, key):
            setattr(args, key, expand_home(getattr(args, key)))
    for key, value in vars(args).items():
        if key in _OUTPUT_KEYS:
            check_output_path(key, value)  # never a upo:// asset or a path inside the installed package
            continue
        if key == "reward_heads" and isinstance(value, str) and RESOURCE_PREFIX in value:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                continue  # reported as invalid JSON when the heads are parsed
        setattr(args, key, resolve_resource(value))


def _settings(settings: type, args: argparse.Namespace, **computed: Any) -> Any:
    """Build library settings from the options of the same name that are set (unset ones keep the default)."""
    names = {f.name for f in dataclasses.fields(settings) if f.init}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return settings(**{**given, **computed})


def _generation(args: argparse.Namespace, required: bool) -> GenerationSettings | None:
    given = {k: getattr(args, k) for k in _GENERATION_KEYS if getattr(args, k) is not None}
    if args.model is None:
        if required:
            raise UsageError("--model is required: the model that answers, critiques and revises.")
        if given:
            raise UsageError(
                f"Generation options {sorted(given)} were given without --model; they only apply to generated "
                f"candidates. Add --model, or drop them."
            )
        return None
    kwargs = {("revision" if k == "model_revision" else k): v for k, v in given.items()}
    return GenerationSettings(model=args.model, **kwargs)


def _rank_config(args: argparse.Namespace) -> RankConfig:
    import json

    heads = args.reward_heads
    if isinstance(heads, str):
        try:
            heads = json.loads(heads) if heads.strip() else []
        except json.JSONDecodeError as e:
            raise UsageError(
                f"--reward_heads must be JSON, e.g. '[{{\"name\": \"length\"}}]'; could not parse {heads!r}: {e}"
            ) from None
    heads = list(heads or []) if isinstance(heads, (list, tuple)) else ([heads] if heads else [])
    if args.reward_model:
        heads.append({"name": "reward_model", "type": "reward_model", "params": {"model": args.reward_model}})
    return _settings(RankConfig, args, reward_heads=heads, generation=_generation(args, required=False))


def _critique_config(args: argparse.Namespace) -> CritiqueConfig:
    return _settings(CritiqueConfig, args, generation=_generation(args, required=True))


def main(argv: list[str], prog: str = "trl-upo build-pairs") -> int:
    """Run ``trl-upo build-pairs``.

    Args:
        argv: Command-line arguments after ``build-pairs``.
        prog: Program name for usage and error messages.

    Returns:
        The exit code: 0 on success, 2 for bad input (reported before any generation), 130 after Ctrl-C.
    """
    return run_command(prog, lambda: _run(list(argv), prog))


def _run(argv: list[str], prog: str) -> int:
    from trl_upo.data import build_critique_pairs, build_rank_pairs
    from trl_upo.data.loading import load_split

    args = parse_args(argv, prog)
    try:  # the settings classes check their values with ValueError: here that is the user's input
        config = _rank_config(args) if args.method == "rank" else _critique_config(args)
        output = _settings(OutputSettings, args, path=args.output)
        output.check_writable()
    except ValueError as e:
        raise UsageError(str(e)) from e
    dataset = load_split(args.dataset, args.split, limit=args.limit, remove_columns=args.remove_columns,
                         fix="pass --split")
    _check_input(dataset, config, output)
    build = build_rank_pairs if args.method == "rank" else build_critique_pairs
    try:
        result = build(dataset, config, output)
    except KeyboardInterrupt:
        import glob
        import os

        done = len(glob.glob(os.path.join(output.shard_dir, "shard-*.jsonl")))
        print(
            f"\nInterrupted. {done} finished batch(es) are saved in {output.shard_dir}; run the same command again "
            f"to resume from there.",
            file=sys.stderr,
        )
        return 130
    _report(result, dataset, config if args.method == "rank" else None, output)
    return 0


def _check_input(dataset: Any, config: RankConfig | CritiqueConfig, output: OutputSettings) -> None:
    """Run the builders' own input checks (prompt column, candidate or response columns, columns the output would
    overwrite) before building, so that their ``ValueError`` is reported as the user's data problem (exit 2)."""
    from trl_upo.data.builder import check_column, check_output
    from trl_upo.data.critique import OUTPUT_COLUMNS
    from trl_upo.formats import DataError, check_prompt_column

    try:
        check_prompt_column(dataset, config.prompt_column)
        if isinstance(config, RankConfig):
            columns = [config.candidates_column] if config.candidates_column else list(config.candidate_columns or [])
            for column in columns:
                check_column(dataset, column, "candidate")
            check_output(dataset, output, consumed={config.prompt_column, *columns},
                         produced=config.output_columns(), hint=", or rank them as candidate_columns")
        else:
            if config.response_column is not None:
                check_column(dataset, config.response_column, "response")
            check_output(dataset, output, consumed={config.prompt_column, config.response_column},
                         produced=OUTPUT_COLUMNS, hint="; existing answers go in response_column")
    except ValueError as e:
        raise DataError(str(e)) from e


def _report(result: Any, dataset: Any, rank: RankConfig | None, output: OutputSettings) -> None:
    """Print what was written and, after a rank run, the ``column`` heads that read its stored scores (of the
    completion, for unpaired rows)."""
    import yaml

    if output.unpaired:
        good = sum(bool(v) for v in result["label"])
        print(f"Wrote {len(result)} unpaired rows ({good} desirable, {len(result) - good} undesirable) from "
              f"{len(dataset)} prompts to {output.path} ({output.format}).")
    else:
        print(f"Wrote {len(result)} pairs from {len(dataset)} prompts to {output.path} ({output.format}).")
    if output.push_to_hub:
        print(f"Pushed to the Hub dataset {output.push_to_hub}.")
    if rank is None:
        return
    heads = rank.column_head_specs()
    if output.unpaired:
        for head in heads:
            chosen = head["params"]["chosen"]
            head["params"] = {"completion": chosen[: -len("_chosen")] + "_completion"}
        print("Train on the stored scores without scoring again (a recipe with `trainer: kto`, or UPOKTOConfig):")
    else:
        print("Train on the stored scores without scoring again (UPOConfig / recipe):")
    print(yaml.safe_dump({"reward_heads": heads}, sort_keys=False).rstrip())
