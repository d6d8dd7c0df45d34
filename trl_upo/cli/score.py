"""``trl-upo score``: score a preference dataset with the configured reward heads and print a per-head summary.

    trl-upo score --config recipe.yaml [--output DIR] [--any_field value ...]
    trl-upo score --dataset_name upo://quickstart-data --reward_heads '[{"name": "length"}]'

The recipe format is ``trl-upo train``'s (the same strict parser, plus :class:`ScoreArguments`):
``reward_heads``, the dataset (``dataset_name`` or a ``datasets:`` mixture), ``model_name_or_path`` for the
tokenizer (heads that count tokens need it; optional otherwise), ``upo_score_cache_dir`` / ``upo_use_score_cache``
/ ``upo_score_batch_size`` / ``dataset_num_proc``.
Scores go through :func:`trl_upo.scoring.score_dataset` and its cache, so a later ``trl-upo train`` with the same
data and heads does not score again. Launch options in the recipe are ignored (scoring runs in one process).

For each split (train, and test when present) and each head, the summary gives the mean, std, min and max of the
raw scores (chosen and rejected pooled), the chosen and rejected means, and how the head relates to the preference
labels: ``agree`` is the share of pairs, among those the head does not tie, where the head prefers the chosen
response (taking ``higher_is_better`` into account); ``ties`` is the share of tied pairs. An agreement near 0.5
means the designer objective is independent of the labels; below 0.5, it conflicts with them.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trl_upo.cli.common import UsageError, run_command


def summarize(dataset, specs) -> dict[str, dict[str, float]]:
    """Per-head statistics of a scored dataset (see the module docstring)."""
    from trl_upo.scoring import score_column

    out: dict[str, dict[str, float]] = {}
    for spec in specs:
        chosen = np.asarray(dataset[score_column(spec.name, "chosen")], dtype=np.float64)
        rejected = np.asarray(dataset[score_column(spec.name, "rejected")], dtype=np.float64)
        pooled = np.concatenate([chosen, rejected])
        diff = (chosen - rejected) * (1.0 if spec.higher_is_better else -1.0)
        decided = diff != 0
        out[spec.name] = {
            "mean": float(pooled.mean()),
            "std": float(pooled.std()),
            "min": float(pooled.min()),
            "max": float(pooled.max()),
            "chosen_mean": float(chosen.mean()),
            "rejected_mean": float(rejected.mean()),
            "agree": float((diff[decided] > 0).mean()) if decided.any() else float("nan"),
            "ties": float((~decided).mean()),
            "n": int(len(chosen)),
        }
    return out


def format_summary(split: str, summary: dict[str, dict[str, float]], status: dict[str, str]) -> str:
    """The summary of one split as a table."""
    cols = ["mean", "std", "min", "max", "chosen_mean", "rejected_mean", "agree", "ties"]
    width = max(12, *(len(n) for n in summary)) + 2
    lines = [f"{split} split ({next(iter(summary.values()))['n']} pairs):",
             f"{'head':<{width}}" + "".join(f"{c:>14}" for c in cols) + "  scores"]
    for name, s in summary.items():
        lines.append(f"{name:<{width}}" + "".join(f"{s[c]:>14.4f}" for c in cols) + f"  {status.get(name, '')}")
    return "\n".join(lines)


@dataclass
class ScoreArguments:
    """The option ``trl-upo score`` adds to the recipe's dataclasses.

    Args:
        output: Directory for ``<split>.jsonl`` (the rows with their scores) and ``summary.json``.
    """

    output: str | None = field(
        default=None, metadata={"help": "directory for <split>.jsonl (scores added) and summary.json"}
    )


def main(argv: list[str] | None = None, prog: str | None = "trl-upo score") -> int:
    """Run ``trl-upo score``.

    Args:
        argv: Command-line arguments after ``score``.
        prog: Program name for usage and error messages.

    Returns:
        0 on success, 2 on a usage error.
    """
    from trl_upo.cli.train import make_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(f"usage: {prog} --config recipe.yaml [--output DIR] [--any_field value ...]")
        return 2
    if argv[0] in ("-h", "--help"):
        print(__doc__)
        make_parser(prog=prog, extra_dataclasses=(ScoreArguments,)).print_help()
        return 0
    if not any(a == "--bf16" or a.startswith("--bf16=") for a in argv):
        # Mixed precision only concerns training; without this, a GPU recipe (bf16: true) fails to parse on a CPU.
        argv = [*argv, "--bf16", "false"]
    return run_command(prog, lambda: _run(argv, prog))


def _run(argv: list[str], prog: str | None) -> int:
    from trl_upo.cli.train import parse, quiet_progress, recipe_datasets

    script_args, training_args, model_args, dataset_args, score_args, launch = parse(
        argv, prog, extra_dataclasses=(ScoreArguments,)
    )
    specs = training_args.head_specs
    if not specs:
        raise UsageError("no reward heads: give `reward_heads` in the recipe or as a JSON flag.")
    if launch:
        print(f"{prog}: scoring runs in one process; launch options ({', '.join(k for k, _ in launch)}) are "
              "ignored.", file=sys.stderr)
    quiet_progress(training_args)
    ds = recipe_datasets(script_args, dataset_args)
    splits = [s for s in (script_args.dataset_train_split, script_args.dataset_test_split) if s in ds]
    if not splits:
        raise UsageError(
            f"the dataset has neither a {script_args.dataset_train_split!r} nor a {script_args.dataset_test_split!r} "
            f"split (splits: {list(ds.keys())}); set dataset_train_split / dataset_test_split."
        )
    return _score(ds, splits, specs, training_args, model_args, score_args.output)


def _score(ds, splits, specs, training_args, model_args, output: str | None) -> int:
    from trl_upo.heads import build_head
    from trl_upo.scoring import score_dataset

    tokenizer = None
    if model_args.model_name_or_path:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            model_args.model_name_or_path, revision=model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,
        )
    heads = [build_head(s) for s in specs]
    results: dict[str, Any] = {}
    scored = {}
    try:
        for split in splits:
            scored[split], report = score_dataset(
                ds[split], heads, specs, split=split, tokenizer=tokenizer,
                batch_size=training_args.upo_score_batch_size, cache_dir=training_args.upo_score_cache_dir,
                use_cache=training_args.upo_use_score_cache, num_proc=training_args.dataset_num_proc,
            )
            results[split] = summarize(scored[split], specs)
            print(format_summary(split, results[split], report.status), flush=True)
    finally:
        for head in heads:
            head.release()
    if output:
        os.makedirs(output, exist_ok=True)
        for split, data in scored.items():
            data.to_json(os.path.join(output, f"{split}.jsonl"), lines=True)
        with open(os.path.join(output, "summary.json"), "w") as f:
            json.dump({"heads": [s.to_dict() for s in specs], "splits": results}, f, indent=2)
        print(f"Scored dataset and summary written to {os.path.abspath(output)} "
              f"({', '.join(f'{s}.jsonl' for s in scored)}, summary.json).")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python -m trl_upo.cli.score"))
