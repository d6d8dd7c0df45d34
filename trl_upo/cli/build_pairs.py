"""``trl-upo build-pairs``: build a preference dataset from prompts, by reward ranking or by self-critique.

    trl-upo build-pairs rank --dataset prompts.jsonl --model MODEL --num_candidates 4 \\
        --reward_model RM --output pairs.jsonl
    trl-upo build-pairs critique --dataset prompts.jsonl --model MODEL --output pairs.parquet
    trl-upo build-pairs --config build.yaml          # the YAML names the method: `method: rank`

A YAML config (``--config``) takes the same keys as the flags (without the dashes); flags given on the command line
override it, and an unknown key is an error with a did-you-mean suggestion. Values starting with ``upo://`` name the
package's assets, as in ``trl-upo train`` recipes.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import Any

METHODS = ("rank", "critique")
_GENERATION_KEYS = (
    "backend", "max_new_tokens", "do_sample", "temperature", "top_p", "dtype", "device", "model_revision", "stop"
)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file whose keys are this command's options (flags override it)")
    io = p.add_argument_group("input and output")
    io.add_argument("--dataset", help="prompts: a .jsonl/.json/.parquet/.csv file, a save_to_disk directory, or a Hub id")
    io.add_argument("--split", default="train", help="split of a Hub dataset or DatasetDict directory")
    io.add_argument("--limit", type=int, help="use only the first N rows")
    io.add_argument("--remove_columns", nargs="+", metavar="COLUMN",
                    help="input columns to leave out (e.g. the chosen/rejected of a preference dataset)")
    io.add_argument("--prompt_column", default="prompt", help="column holding the prompts (strings or message lists)")
    io.add_argument("--output", help="output: a .jsonl or .parquet file, or a directory (save_to_disk)")
    io.add_argument("--format", choices=["jsonl", "parquet", "disk"], help="output format (default: from --output)")
    io.add_argument("--shard_dir", help="where finished batches are kept until the end (default: <output>.shards)")
    io.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                    help="replace an existing output and discard shards of a run with other settings")
    io.add_argument("--keep_shards", action=argparse.BooleanOptionalAction, default=False,
                    help="keep the shard directory after writing the output")
    io.add_argument("--push_to_hub", metavar="REPO_ID", help="also push the dataset to this Hub dataset repo")
    io.add_argument("--hub_private", action=argparse.BooleanOptionalAction, default=False,
                    help="create the Hub repo as private")
    io.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    io.add_argument("--seed", type=int, default=0, help="run seed (each batch samples with a seed derived from it)")
    io.add_argument("--batch_size", type=int, default=8, help="prompts per batch and per shard")
    gen = p.add_argument_group("generation")
    gen.add_argument("--model", help="causal LM that generates (local directory or Hub id)")
    gen.add_argument("--backend", choices=["transformers", "vllm"], help="generation backend (default transformers)")
    gen.add_argument("--max_new_tokens", type=int, help="maximum new tokens per response (default 256)")
    gen.add_argument("--do_sample", action=argparse.BooleanOptionalAction, default=None,
                     help="sample (default) or decode greedily")
    gen.add_argument("--temperature", type=float, help="sampling temperature (default 1.0)")
    gen.add_argument("--top_p", type=float, help="nucleus sampling mass (default 1.0)")
    gen.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], help="model dtype")
    gen.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: a GPU if there is one)")
    gen.add_argument("--model_revision", help="Hub revision of --model")
    gen.add_argument("--stop", nargs="+", metavar="TEXT", help="strings that end a response (cut before them)")


def build_parser(prog: str) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The command's parser and its two method sub-parsers."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Build preference pairs from prompts: rank N candidates with reward heads (rank), or let a model "
        "critique and revise its answers (critique). Output: TRL preference data that UPOTrainer trains on directly.",
    )
    subs = parser.add_subparsers(dest="method", metavar="{rank,critique}")
    rank = subs.add_parser("rank", help="score N candidates per prompt, pair best vs worst (or all above a margin)")
    _common(rank)
    r = rank.add_argument_group("ranking")
    r.add_argument("--reward_heads", help="reward head specs as JSON, like UPOConfig.reward_heads")
    r.add_argument("--reward_model", metavar="PATH_OR_ID",
                   help="shorthand for a reward_model head named 'reward_model' (weight 1)")
    r.add_argument("--candidates_column", help="column with a list of N candidates per row")
    r.add_argument("--candidate_columns", nargs="+", help="N columns with one candidate each")
    r.add_argument("--num_candidates", type=int, help="N candidates to generate per prompt (>= 2)")
    r.add_argument("--pairing", choices=["best_vs_worst", "all_above_margin"], default="best_vs_worst")
    r.add_argument("--margin", type=float, default=0.0, help="ranking-score gap a pair must exceed")
    r.add_argument("--normalization", choices=["none", "zscore", "rank"], default="none",
                   help="per-prompt scale of each head before the weighted sum (heads without their own 'normalize')")
    r.add_argument("--tokenizer", help="tokenizer for heads that count tokens (default: --model's)")
    r.add_argument("--keep_candidates", action=argparse.BooleanOptionalAction, default=False,
                   help="also store every candidate and its ranking score")
    crit = subs.add_parser("critique", help="answer, critique under a principle, revise; chosen = revision")
    _common(crit)
    c = crit.add_argument_group("critique")
    c.add_argument("--response_column", help="critique these existing answers instead of generating them")
    c.add_argument("--principles", help="JSON list of {name, critique_request, revision_request}")
    c.add_argument("--principle_selection", choices=["random", "all"], default="random")
    c.add_argument("--num_revisions", type=int, default=1, help="critique-and-revise rounds (each revises the last)")
    c.add_argument("--critique_template", help="placeholders {prompt} {response} {critique_request}")
    c.add_argument("--revision_template",
                   help="placeholders {prompt} {response} {critique} {revision_request} [{critique_request}]")
    return parser, {"rank": rank, "critique": crit}


def _dests(parser: argparse.ArgumentParser) -> list[str]:
    return [a.dest for a in parser._actions if a.dest not in ("help", "config")]


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ValueError(f"Cannot read the config file {path!r}: {e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"The config file {path!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"The config file {path!r} must hold a mapping of option names to values.")
    return data


def _check_keys(data: dict[str, Any], valid: list[str], where: str, method: str) -> None:
    unknown = [k for k in data if k not in valid]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"{where} has unknown key(s) for `build-pairs {method}`: {', '.join(hints)}. Valid keys: {sorted(valid)}."
        )


def parse_args(argv: list[str], prog: str) -> argparse.Namespace:
    """Parse the command line (and the ``--config`` YAML it names) into one namespace; ValueError on bad keys."""
    parser, subs = build_parser(prog)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    data = _load_yaml(known.config) if known.config else {}
    method = argv[0] if argv and argv[0] in METHODS else None
    if "method" in data:
        yaml_method = data.pop("method")
        if yaml_method not in METHODS:
            raise ValueError(f"{known.config}: method must be one of {list(METHODS)}, got {yaml_method!r}.")
        if method is not None and method != yaml_method:
            raise ValueError(f"The command line says {method!r} but {known.config} says method: {yaml_method}.")
        if method is None:
            argv = [yaml_method, *argv]
            method = yaml_method
    if method is None:
        if argv and not argv[0].startswith("-"):
            close = difflib.get_close_matches(argv[0], METHODS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"Unknown method {argv[0]!r}.{hint} Use `{prog} rank ...` or `{prog} critique ...`.")
        if argv and argv[0] in ("-h", "--help"):
            parser.print_help()
            raise SystemExit(0)
        raise ValueError(
            f"Name the method: `{prog} rank ...` or `{prog} critique ...` (or `method: rank` in the --config YAML)."
        )
    sub = subs[method]
    if data:
        _check_keys(data, _dests(sub), known.config, method)
        sub.set_defaults(**data)
    args = parser.parse_args(argv)
    _resolve_resources(args)
    for key in ("dataset", "output"):
        if getattr(args, key) is None:
            raise ValueError(f"--{key} is required (on the command line or as `{key}:` in the --config YAML).")
    return args


def _resolve_resources(args: argparse.Namespace) -> None:
    """``upo://<path>`` values name packaged assets, as in ``trl-upo train`` recipes (``upo://tiny-llama``,
    ``upo://quickstart-data/train.jsonl``)."""
    from trl_upo.cli.train import resolve_resource

    for key, value in vars(args).items():
        if key in ("output", "shard_dir", "push_to_hub"):
            continue
        if key == "reward_heads" and isinstance(value, str) and "upo://" in value:
            import json

            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                continue  # reported as invalid JSON when the heads are parsed
        try:
            setattr(args, key, resolve_resource(value))
        except FileNotFoundError as e:
            raise ValueError(str(e)) from None


def _generation(args: argparse.Namespace, required: bool) -> Any:
    from trl_upo.data import GenerationSettings

    given = {k: getattr(args, k) for k in _GENERATION_KEYS if getattr(args, k) is not None}
    if args.model is None:
        if required:
            raise ValueError("--model is required: the model that answers, critiques and revises.")
        if given:
            raise ValueError(
                f"Generation options {sorted(given)} were given without --model; they only apply to generated "
                f"candidates. Add --model, or drop them."
            )
        return None
    kwargs = {("revision" if k == "model_revision" else k): v for k, v in given.items()}
    return GenerationSettings(model=args.model, **kwargs)


def _rank_config(args: argparse.Namespace) -> Any:
    import json

    from trl_upo.data import RankConfig

    heads = args.reward_heads
    if isinstance(heads, str):
        try:
            heads = json.loads(heads) if heads.strip() else []
        except json.JSONDecodeError as e:
            raise ValueError(
                f"--reward_heads must be JSON, e.g. '[{{\"name\": \"length\"}}]'; could not parse {heads!r}: {e}"
            ) from None
    heads = list(heads or []) if isinstance(heads, (list, tuple)) else ([heads] if heads else [])
    if args.reward_model:
        heads.append({"name": "reward_model", "type": "reward_model", "params": {"model": args.reward_model}})
    return RankConfig(
        reward_heads=heads,
        prompt_column=args.prompt_column,
        candidates_column=args.candidates_column,
        candidate_columns=args.candidate_columns,
        generation=_generation(args, required=False),
        num_candidates=args.num_candidates,
        pairing=args.pairing,
        margin=args.margin,
        normalization=args.normalization,
        batch_size=args.batch_size,
        seed=args.seed,
        keep_candidates=args.keep_candidates,
        tokenizer=args.tokenizer,
    )


def _critique_config(args: argparse.Namespace) -> Any:
    from trl_upo.data import CritiqueConfig

    kwargs = {
        k: getattr(args, k) for k in ("critique_template", "revision_template") if getattr(args, k) is not None
    }
    return CritiqueConfig(
        generation=_generation(args, required=True),
        prompt_column=args.prompt_column,
        response_column=args.response_column,
        principles=args.principles,
        principle_selection=args.principle_selection,
        num_revisions=args.num_revisions,
        batch_size=args.batch_size,
        seed=args.seed,
        **kwargs,
    )


def main(argv: list[str], prog: str = "trl-upo build-pairs") -> int:
    """Run ``trl-upo build-pairs``; returns the exit code (2 for bad input, reported before any generation)."""
    try:
        try:
            args = parse_args(list(argv), prog)
        except SystemExit as e:  # --help, or argparse's own usage error (already printed)
            return int(e.code or 0)
        from trl_upo.data import OutputSettings, build_critique_pairs, build_rank_pairs, load_prompt_dataset

        config = _rank_config(args) if args.method == "rank" else _critique_config(args)
        output = OutputSettings(
            path=args.output,
            format=args.format,
            shard_dir=args.shard_dir,
            overwrite=args.overwrite,
            keep_shards=args.keep_shards,
            push_to_hub=args.push_to_hub,
            hub_private=args.hub_private,
            progress=args.progress,
        )
        output.check_writable()
        dataset = load_prompt_dataset(
            args.dataset, split=args.split, limit=args.limit, remove_columns=args.remove_columns
        )
        build = build_rank_pairs if args.method == "rank" else build_critique_pairs
        result = build(dataset, config, output)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
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
    print(f"Wrote {len(result)} pairs from {len(dataset)} prompts to {output.path} ({output.format}).")
    if output.push_to_hub:
        print(f"Pushed to the Hub dataset {output.push_to_hub}.")
    if args.method == "rank":
        import yaml

        print("Train on the stored scores without scoring again (UPOConfig / recipe):")
        print(yaml.safe_dump({"reward_heads": config.column_head_specs()}, sort_keys=False).rstrip())
    return 0
