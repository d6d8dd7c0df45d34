"""``trl-upo eval``: evaluate a trained policy on designer objectives and held-out preferences.

    trl-upo eval --model_name_or_path outputs/upo --ref_model outputs/sft --dataset_name data/test.jsonl \\
        --reward_heads '[{"name": "length", "params": {"direction": "shorter"}}]' --output_dir outputs/eval
    trl-upo eval --model_name_or_path outputs/upo-lora --dataset_name org/dataset --dataset_test_split test \\
        --config recipe.yaml --reward_model org/reward-model --output_dir outputs/eval

The options that ``trl-upo train`` also has take its names (``--model_name_or_path``, ``--dataset_name``,
``--dataset_config``, ``--dataset_test_split``, ``--dataset_streaming``, ``--reward_heads``); the older ``--model``,
``--dataset``, ``--split`` and ``--heads`` still work (:data:`ALIASES`), but not together with the new name of the
same option.

What it measures, on the first ``--num_prompts`` rows of the split (``trl_upo.evaluation``; with
``--dataset_streaming true`` the split is read as a stream and only those rows are read: :mod:`.eval_inputs`):

- **designer**: the raw scores of every reward head on responses sampled from the policy (and from the reference,
  when there is one), mean and standard deviation;
- **preference** (when the dataset has ``chosen`` and ``rejected``): DPO's implicit-reward accuracy and margins
  against the reference; with no reference, the policy log-prob accuracy, named as such;
- **unpaired** (when the dataset has ``completion`` and a boolean ``label`` instead: KTO's unpaired rows): the same
  implicit reward per row (:func:`trl_upo.evaluation.unpaired_metrics`): the share of rows whose reward has the
  label's sign, the share of (desirable, undesirable) combinations ranked right, and the mean reward of each kind;
  responses are generated for the distinct prompts of those rows;
- **win rate** (``--reward_model``): the share of prompts (x samples) where the reward model scores the policy's
  response above the reference's response to the same prompt, ties counting half.

The reference is ``--ref_model``; else, for a PEFT adapter, the base model with the adapter disabled; else none.
``--model_name_or_path`` / ``--ref_model`` take a model directory, a PEFT adapter directory (its base is loaded from
the adapter config) or a Hub id. ``--dataset_name`` takes a .json/.jsonl/.parquet/.csv file, a directory written by
``Dataset.save_to_disk``, or a name for ``datasets.load_dataset``. Heads come from ``--reward_heads`` (JSON) or the
``reward_heads`` of a YAML ``--config`` (a ``trl-upo train`` recipe works: its ``beta`` is used too, its other keys
are listed and not used).

Writes ``eval.json`` (everything), ``report.md`` and the plots ``designer.png`` and ``margins.png`` to
``--output_dir``, and prints a table of the reference next to the policy (plots need matplotlib: ``pip install
'trl-upo[eval]'``; without it they are skipped with a warning; ``--no_plots`` skips them). Every path option takes
``upo://<asset>`` too. A dataset with neither pairs (``chosen``/``rejected``) nor unpaired rows
(``completion``/``label``) gets designer metrics only, and the command says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

from trl_upo.cli.common import (
    HelpFormatter,
    UsageError,
    option,
    parse_strict,
    run_command,
)
from trl_upo.cli.eval_inputs import CONFIG_KEYS, load_rows, prompts_and_pairs, read_heads
from trl_upo.cli.eval_report import PREFERENCE_SKIPPED

#: Options that name a file, directory or model, where ``upo://<asset>`` names a packaged asset.
PATH_OPTIONS = ("model_name_or_path", "ref_model", "tokenizer", "config", "reward_model", "dataset_name")
#: The options named as in ``trl-upo train`` -> their older ``trl-upo eval`` names, still accepted.
ALIASES = {"model_name_or_path": "model", "dataset_name": "dataset", "dataset_test_split": "split",
           "reward_heads": "heads"}


@dataclass
class EvalArguments:
    """Options of ``trl-upo eval``: each field's ``help`` is its ``--help`` line (``--foo_bar`` and ``--foo-bar``
    both work). ``config`` is a YAML file with ``reward_heads`` (and ``beta``), e.g. a ``trl-upo train`` recipe whose
    other keys are listed and not used."""

    model_name_or_path: str = option("policy: model dir, PEFT adapter dir or Hub id (old name: --model)",
                                     aliases=["--model"])
    dataset_name: str = option("file (.json/.jsonl/.parquet/.csv), saved dataset dir, hub name or upo://... (old "
                               "name: --dataset)", aliases=["--dataset"])
    output_dir: str = option("where eval.json, report.md and the plots go")
    ref_model: str | None = option("reference model (default: adapter disabled, for an adapter)", None)
    tokenizer: str | None = option("tokenizer path (default: the policy's, or its base model's)", None)
    dataset_config: str | None = option("configuration name for datasets.load_dataset", None)
    dataset_test_split: str = option("split to evaluate on (old name: --split)", "test", aliases=["--split"])
    dataset_streaming: bool = option("read the split as a stream: only its first --num_prompts rows are read", False)
    reward_heads: str | None = option("reward heads as JSON, e.g. '[{\"name\": \"length\"}]' (old name: --heads)", None,
                                      aliases=["--heads"])
    config: str | None = option("YAML with reward_heads (e.g. a trl-upo train recipe)", None)
    reward_model: str | None = option("reward model (dir or Hub id) for the win rate vs reference", None)
    num_prompts: int = option("rows of the split to use", 64)
    num_samples: int = option("sampled responses per prompt", 1)
    max_new_tokens: int = option("length limit of the responses", 64)
    temperature: float = option("sampling temperature", 1.0)
    top_p: float = option("nucleus sampling mass", 1.0)
    greedy: bool = option("greedy decoding instead of sampling", False)
    batch_size: int = option("prompts (and pairs or rows) per batch", 16)
    beta: float | None = option("DPO/KTO beta for the implicit reward (default 0.1)", None)
    seed: int = option("sampling seed", 0)
    no_plots: bool = option("do not draw the PNG plots (no matplotlib needed)", False)

    # The older names, for code that reads them (the command line takes both: see ALIASES).
    model = property(lambda self: self.model_name_or_path, doc="``model_name_or_path`` (its old name).")
    dataset = property(lambda self: self.dataset_name, doc="``dataset_name`` (its old name).")
    split = property(lambda self: self.dataset_test_split, doc="``dataset_test_split`` (its old name).")
    heads = property(lambda self: self.reward_heads, doc="``reward_heads`` (its old name).")


def make_parser(prog: str) -> argparse.ArgumentParser:
    """The argument parser of ``trl-upo eval``: a ``transformers.HfArgumentParser`` over :class:`EvalArguments`.

    Args:
        prog: Program name for usage and errors.

    Returns:
        The parser.
    """
    from transformers import HfArgumentParser

    return HfArgumentParser(EvalArguments, prog=prog, description=__doc__, formatter_class=HelpFormatter,
                            allow_abbrev=False)


def parse_args(argv: list[str], prog: str) -> EvalArguments:
    """Parse and check the options (unknown keys, counts below 1); ``upo://`` names in :data:`PATH_OPTIONS` resolved.

    Args:
        argv: Command-line arguments after ``eval``.
        prog: Program name for usage and errors.

    Returns:
        The options.

    Raises:
        UsageError: an unknown key (naming the closest one), a stray value, an option given under both its names,
            or a count below 1.
    """
    from trl_upo.resources import check_output_path, resolve_resource

    check_aliases(argv)
    (args,) = parse_strict(make_parser(prog), argv, prog)
    for name in ("num_prompts", "num_samples", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    from trl_upo.cli.checks import expand_home

    for name in PATH_OPTIONS:
        setattr(args, name, expand_home(resolve_resource(getattr(args, name))))
    check_output_path("output_dir", args.output_dir)  # never a upo:// asset or a path inside the package
    args.output_dir = expand_home(args.output_dir)  # `--key=~/x` and YAML leave `~` as it is
    return args


def check_aliases(argv: list[str]) -> None:
    """Refuse an option given under both its names (``--dataset_name`` and ``--dataset``): argparse would keep the
    last one silently.

    Raises:
        UsageError: naming both spellings of every such option.
    """
    keys = {tok.split("=", 1)[0] for tok in argv if tok.startswith("--")}
    problems = []
    for new, old in ALIASES.items():
        given_new = sorted(keys & {f"--{new}", f"--{new.replace('_', '-')}"})
        if given_new and f"--{old}" in keys:
            problems.append(f"{given_new[0]} and --{old} are the same option (--{old} is its old name): give it once")
    if problems:
        raise UsageError("; ".join(problems) + ".")


# ----------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------


def win_rate(reward_model: str, prompts: list[Any], policy: list[list[str]], reference: list[list[str]],
             batch_size: int = 8) -> dict:
    """A reward model's win rate of policy responses over reference responses to the same prompts (ties: half).

    Args:
        reward_model: The reward model (directory or Hub id).
        prompts: The prompts.
        policy: The policy's responses, a list per prompt.
        reference: The reference's responses, aligned with ``policy``.
        batch_size: Responses per reward-model batch.

    Returns:
        ``win_rate``, ``n``, the two mean rewards and the reward model.

    Raises:
        ValueError: the reward model failed or gave a non-finite score (:func:`trl_upo.scoring.call_head`).
    """
    from trl_upo.formats import as_completion, is_conversational
    from trl_upo.heads.reward_model import RewardModelHead
    from trl_upo.scoring import call_head, check_finite

    head = RewardModelHead(model=reward_model, batch_size=batch_size)

    def scores(responses: list[list[str]], whose: str) -> list[float]:
        pairs = [(p, r) for p, rs in zip(prompts, responses, strict=True) for r in rs]
        values = call_head(head, "reward_model", [p for p, _ in pairs],
                           [as_completion(r, is_conversational(p)) for p, r in pairs], what=f"{whose} responses")
        check_finite(values, "reward_model", f"the {whose} responses")
        return [float(v) for v in values]

    try:
        a, b = scores(policy, "policy"), scores(reference, "reference")
    finally:
        head.release()
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True))
    return {
        "win_rate": wins / len(a),
        "n": len(a),
        "policy_reward_mean": sum(a) / len(a),
        "reference_reward_mean": sum(b) / len(b),
        "reward_model": reward_model,
    }


def run(args: EvalArguments, heads: list[dict], beta: float, log=print) -> dict:
    """Load the models and the data, generate, score and measure.

    Args:
        args: The options.
        heads: The head spec dicts.
        beta: DPO beta of the implicit reward.
        log: Where progress messages go.

    Returns:
        The full result (what ``eval.json`` holds).
    """
    from contextlib import nullcontext

    from trl_upo.evaluation import generate_responses, load_model, load_tokenizer

    data = load_rows(args.dataset_name, args.dataset_test_split, config_name=args.dataset_config,
                     num_prompts=args.num_prompts, streaming=args.dataset_streaming, log=log)
    prompts, pairs, unpaired = prompts_and_pairs(data)
    model = load_model(args.model_name_or_path)
    tokenizer = load_tokenizer(args.model_name_or_path, args.tokenizer)
    ref = load_model(args.ref_model) if args.ref_model else None
    peft = bool(getattr(model, "peft_config", None)) and hasattr(model, "disable_adapter")
    ref_kind = "ref_model" if ref is not None else "adapter_disabled" if peft else "none"
    if args.reward_model and ref_kind == "none":
        raise UsageError(
            "--reward_model computes a win rate against the reference's responses, but there is no reference: give "
            "--ref_model (or evaluate a PEFT adapter, whose reference is the adapter-disabled base)."
        )
    gen = dict(max_new_tokens=args.max_new_tokens, num_samples=args.num_samples, batch_size=args.batch_size,
               do_sample=not args.greedy, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    log(f"Generating {len(prompts)} x {args.num_samples} responses with the policy...")
    responses = generate_responses(model, tokenizer, prompts, **gen)
    ref_responses = None
    if ref_kind != "none":
        log("Generating the reference's responses...")
        ctx = model.disable_adapter() if ref_kind == "adapter_disabled" else nullcontext()
        with ctx:
            ref_responses = generate_responses(ref if ref is not None else model, tokenizer, prompts, **gen)
    result: dict[str, Any] = {
        "model": args.model_name_or_path,
        "reference": {"kind": ref_kind, "path": args.ref_model},
        "dataset": {"name": args.dataset_name, "split": args.dataset_test_split, "rows": len(data),
                    **({"streaming": True} if args.dataset_streaming else {})},
        "heads": heads,
        "generation": {**gen, "num_prompts": len(prompts)},
        "designer": {},
        "designer_reference": {},
        "preference": {},
        "unpaired": {},
        "win_rate": None,
    }
    _measure(result, model, tokenizer, ref, prompts, (responses, ref_responses), heads,
             pairs, unpaired, beta, args.batch_size, log)
    if args.reward_model:
        log("Reward-model win rate against the reference...")
        result["win_rate"] = win_rate(args.reward_model, prompts, responses, ref_responses)
    result["samples"] = [
        {"prompt": p, "response": r[0], **({"reference": rr[0]} if ref_responses else {})}
        for p, r, rr in list(zip(prompts, responses, ref_responses or responses, strict=True))[:5]
    ]
    return result


def _measure(result: dict, model, tokenizer, ref, prompts: list[Any], responses: tuple, heads: list[dict], pairs,
             unpaired: list[dict] | None, beta: float, batch_size: int, log) -> None:
    """Fill ``result`` with the designer metrics of the policy's (and the reference's) responses and the preference
    metrics of the held-out pairs or unpaired rows."""
    from trl_upo.evaluation import designer_metrics, preference_metrics, unpaired_metrics

    policy_responses, ref_responses = responses
    if heads:
        log("Scoring the responses with the reward heads...")
        result["designer"] = designer_metrics(prompts, policy_responses, heads, tokenizer=tokenizer)
        if ref_responses is not None:
            result["designer_reference"] = designer_metrics(prompts, ref_responses, heads, tokenizer=tokenizer)
    if pairs is not None:
        log(f"Preference metrics on {len(pairs)} held-out pairs...")
        result["preference"] = preference_metrics(
            model, tokenizer, pairs, ref_model=ref, beta=beta, batch_size=batch_size, return_margins=True
        )
    if unpaired is not None:
        n_good = sum(r["label"] for r in unpaired)
        log(f"Unpaired metrics on {len(unpaired)} held-out rows ({n_good} desirable, {len(unpaired) - n_good} "
            f"undesirable)...")
        if n_good in (0, len(unpaired)):
            log(f"warning: every row is {'desirable' if n_good else 'undesirable'}: the ranking accuracy needs both "
                f"kinds and is left empty (null).")
        metrics = unpaired_metrics(model, tokenizer, unpaired, ref_model=ref, beta=beta, batch_size=batch_size)
        result["unpaired"] = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()}


def main(argv: list[str] | None = None, prog: str | None = "trl-upo eval") -> int:
    """Run ``trl-upo eval``.

    Args:
        argv: Command-line arguments after ``eval``.
        prog: Program name for usage and error messages.

    Returns:
        0 on success, 2 on a usage error (bad flag, head, file or split), reported before any model is loaded when
        it can be.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or "trl-upo eval"
    return run_command(prog, lambda: _run(argv, prog))


def _run(argv: list[str], prog: str) -> int:
    from trl_upo.evaluation import text_head_specs
    from trl_upo.resources import resolve_resource

    args = parse_args(argv, prog)
    heads, used, unused = read_heads(args.reward_heads, args.config)
    heads = resolve_resource(heads)  # upo://<asset> in a head's params (a packaged model or word list)
    try:
        text_head_specs(heads)  # an unknown head or key fails here, with a suggestion
    except ValueError as e:  # the head spec's own message; a usage error, not a bug
        raise UsageError(str(e)) from e
    if not heads and not args.reward_model:
        print(f"{prog}: no reward heads (--reward_heads or --config): only preference metrics.", file=sys.stderr)
    if unused:
        keys = [k for k in CONFIG_KEYS if k in used or k == "reward_heads"]
        reads = " and ".join([", ".join(keys[:-1]), keys[-1]] if len(keys) > 1 else keys)
        more = f" and {len(unused) - 4} more training settings" if len(unused) > 4 else ""
        print(f"{prog}: --config: eval reads {reads} from it; not used by eval: {', '.join(unused[:4])}{more}.",
              file=sys.stderr)
    beta = args.beta if args.beta is not None else float(used.get("beta", 0.1))
    plt = None if args.no_plots else _matplotlib(prog)
    from trl_upo.cli.checks import check_model_path, check_output_dir

    check_output_dir(args.output_dir)
    for key in ("model_name_or_path", "ref_model", "reward_model"):
        check_model_path(getattr(args, key), key)
    os.environ.setdefault("TQDM_DISABLE", "1")
    result = run(args, heads, beta, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if not result["preference"] and not result["unpaired"]:
        print(f"{prog}: preference metrics skipped: {PREFERENCE_SKIPPED}", file=sys.stderr)
    _write(result, args, plt)
    return 0


def _matplotlib(prog: str):
    """``matplotlib.pyplot``, or None with a warning (the plots are skipped, the rest is written)."""
    from trl_upo.evaluation import require_matplotlib

    try:
        return require_matplotlib()
    except ImportError as e:
        print(f"{prog}: warning: {e} The plots are skipped (--no_plots silences this).", file=sys.stderr)
        return None


def _write(result: dict, args: EvalArguments, plt) -> None:
    """Write ``eval.json``, ``report.md`` and the plots, and print the summary table."""
    from trl_upo.cli.eval_report import console_table, draw_plots, markdown_report

    os.makedirs(args.output_dir, exist_ok=True)
    plots = [] if plt is None else draw_plots(result, args.output_dir, plt)
    with open(os.path.join(args.output_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.output_dir, "report.md"), "w") as f:
        f.write(markdown_report(result, plots))
    table = console_table(result)
    if table:
        print(table)
    print(f"Wrote eval.json, report.md{''.join(', ' + p for p in plots)} to {os.path.abspath(args.output_dir)}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python -m trl_upo.cli.eval"))
