"""``trl-upo score``: score a preference dataset with the configured reward heads, print a per-head summary, and
optionally write the scored dataset ("score once, train many").

    trl-upo score --config recipe.yaml [--output DIR] [--num_processes N] [--any_field value ...]
    trl-upo score --dataset_name upo://quickstart-data --reward_heads '[{"name": "length"}]'

The recipe format is ``trl-upo train``'s (the same strict parser: a whole training recipe is accepted), but scoring
reads only: ``reward_heads`` (and ``reward_funcs``), the dataset (``dataset_name``, ``dataset_config``,
``dataset_train_split``, ``dataset_test_split``, or a ``datasets:`` mixture), ``trainer`` (``kto``: unpaired rows),
``model_name_or_path`` / ``model_revision`` / ``trust_remote_code`` for the tokenizer (heads that count tokens need
it), ``upo_score_cache_dir`` / ``upo_use_score_cache`` / ``upo_score_batch_size`` / ``dataset_num_proc``,
``use_cpu``, and the ``accelerate launch`` options (``num_processes``, ``accelerate_config``, ...).

With ``num_processes > 1`` the command re-launches itself under ``accelerate launch``; each process scores an even
share of the responses on its own device and the main process prints the summary and writes ``--output``.

``--output DIR`` writes ``<split>.jsonl`` (each row with its scores and the ``upo__scored_by`` column that records
which head wrote them), ``summary.json`` and ``upo_statistics.json`` (the normalisation statistics of the first split,
which a streaming training run with the same heads can adopt: see docs/scoring.md). ``trl-upo train --dataset_name DIR`` with the same heads then loads no
head model at all: the recorded scores are used as they are (see docs/scoring.md).

For each split (train, and test when present) and each head, the summary gives the mean, std, min and max of the
raw scores (chosen and rejected pooled), the chosen and rejected means, and how the head relates to the preference
labels: ``agree`` is the share of pairs, among those the head does not tie, where the head prefers the chosen
response (taking ``higher_is_better`` into account); ``ties`` is the share of tied pairs. An agreement near 0.5
means the designer objective is independent of the labels; below 0.5, it conflicts with them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trl_upo.cli.common import HelpFormatter, UsageError, end_distributed, run_command

#: The module the processes of ``trl-upo score --num_processes N`` run (:func:`trl_upo.cli.launch.relaunch`).
SCORE_MODULE = "trl_upo.cli.score"
#: What ``trl-upo score --help`` lists: the keys scoring reads, as (key, help).
SCORE_KEYS = (
    ("config", "a recipe (trl-upo train's format; keys scoring does not read are accepted and ignored)"),
    ("reward_heads", "the heads, as in a recipe (JSON on the command line)"),
    ("reward_funcs", "TRL reward functions as function heads (with reward_weights)"),
    ("dataset_name", "a file, a directory, a saved dataset, a Hub name or upo://..."),
    ("dataset_config", "the dataset's configuration name"),
    ("dataset_train_split", "the training split (default: train)"),
    ("dataset_test_split", "the test split, scored too when present (default: test)"),
    ("trainer", "dpo (pairs: chosen/rejected) or kto (unpaired rows: completion)"),
    ("model_name_or_path", "the policy whose tokenizer heads that count tokens read (only the tokenizer is loaded)"),
    ("model_revision", "the revision of model_name_or_path"),
    ("upo_score_cache_dir", "the score cache directory (default: trl_upo/scores under the HF cache)"),
    ("upo_use_score_cache", "read and write the score cache (default: true)"),
    ("upo_score_batch_size", "responses per head call; the cache is written after each batch (default: 256)"),
    ("dataset_num_proc", "worker processes for text heads"),
    ("use_cpu", "score on the CPU even when a GPU is there"),
    ("num_processes", "processes to score in (re-launches under accelerate launch); other launch options too"),
    ("output", "directory for <split>.jsonl (rows, scores, upo__scored_by) and summary.json"),
)


@dataclass
class ScoreArguments:
    """The option ``trl-upo score`` adds to the recipe's dataclasses.

    Args:
        output: Directory for ``<split>.jsonl`` (the rows with their scores) and ``summary.json``.
    """

    output: str | None = field(
        default=None, metadata={"help": "directory for <split>.jsonl (scores added) and summary.json"}
    )


def summarize(dataset, specs, roles=("chosen", "rejected")) -> dict[str, dict[str, float]]:
    """Per-head statistics of a scored dataset (see the module docstring); unpaired rows get no ``agree``/``ties``."""
    from trl_upo.scoring import score_column

    out: dict[str, dict[str, float]] = {}
    for spec in specs:
        per_role = {r: np.asarray(dataset[score_column(spec.name, r)], dtype=np.float64) for r in roles}
        pooled = np.concatenate(list(per_role.values()))
        s = {"mean": float(pooled.mean()), "std": float(pooled.std()), "min": float(pooled.min()),
             "max": float(pooled.max()), "n": int(len(dataset))}
        if tuple(roles) == ("chosen", "rejected"):
            chosen, rejected = per_role["chosen"], per_role["rejected"]
            diff = (chosen - rejected) * (1.0 if spec.higher_is_better else -1.0)
            decided = diff != 0
            s.update(chosen_mean=float(chosen.mean()), rejected_mean=float(rejected.mean()),
                     agree=float((diff[decided] > 0).mean()) if decided.any() else float("nan"),
                     ties=float((~decided).mean()))
        out[spec.name] = s
    return out


def format_summary(split: str, summary: dict[str, dict[str, float]], status: dict[str, str]) -> str:
    """The summary of one split as a table."""
    first = next(iter(summary.values()))
    paired = "agree" in first
    cols = ["mean", "std", "min", "max", *(["chosen_mean", "rejected_mean", "agree", "ties"] if paired else [])]
    width = max(12, *(len(n) for n in summary)) + 2
    lines = [f"{split} split ({first['n']} {'pairs' if paired else 'rows'}):",
             f"{'head':<{width}}" + "".join(f"{c:>14}" for c in cols) + "  scores"]
    for name, s in summary.items():
        lines.append(f"{name:<{width}}" + "".join(f"{s[c]:>14.4f}" for c in cols) + f"  {status.get(name, '')}")
    return "\n".join(lines)


def print_help(prog: str | None) -> None:
    """``--help``: the keys scoring reads (not the training options)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter, add_help=False)
    for key, text in SCORE_KEYS:
        parser.add_argument(f"--{key}", help=text, metavar="VALUE")
    parser.print_help()


def main(argv: list[str] | None = None, prog: str | None = "trl-upo score") -> int:
    """Run ``trl-upo score``.

    Args:
        argv: Command-line arguments after ``score``.
        prog: Program name for usage and error messages.

    Returns:
        0 on success, 2 on a usage error, the launcher's exit code when re-launched.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    from trl_upo.cli.launch import die_with_launcher

    die_with_launcher()  # a rank of `trl-upo score --num_processes N` ends with its launcher
    if not argv:
        print(f"usage: {prog} --config recipe.yaml [--output DIR] [--any_field value ...]")
        return 2
    if any(a in ("-h", "--help") for a in argv):
        print_help(prog)
        return 0
    if not any(a == "--bf16" or a.startswith("--bf16=") for a in argv):
        # Mixed precision only concerns training; without this, a GPU recipe (bf16: true) fails to parse on a CPU.
        argv = [*argv, "--bf16", "false"]
    return run_command(prog, lambda: _run(argv, prog))


def _run(argv: list[str], prog: str | None) -> int:
    from trl_upo.cli.launch import relaunch, under_launcher
    from trl_upo.cli.train import parse, quiet_progress, recipe_datasets

    script_args, training_args, model_args, dataset_args, score_args, launch = parse(
        argv, prog, extra_dataclasses=(ScoreArguments,)
    )
    from trl_upo.cli.checks import check_model_path, expand_home

    specs = training_args.head_specs
    if not specs:
        raise UsageError("no reward heads: give `reward_heads` in the recipe or as a JSON flag.")
    model_args.model_name_or_path = expand_home(model_args.model_name_or_path)
    if not model_args.model_name_or_path:
        _check_no_tokenizer_needed(specs)
    check_model_path(model_args.model_name_or_path)
    score_args.output = expand_home(score_args.output)
    _check_output(score_args.output)
    if launch and not under_launcher() and _processes(launch) > 1:
        return relaunch(argv, launch, use_cpu=bool(training_args.use_cpu), prog=prog, module=SCORE_MODULE)
    if launch and not under_launcher():
        print(f"{prog}: scoring runs in one process (num_processes 1); launch options "
              f"({', '.join(k for k, _ in launch)}) are ignored.", file=sys.stderr)
    quiet_progress(training_args)
    ds = recipe_datasets(script_args, dataset_args)
    splits = [s for s in (script_args.dataset_train_split, script_args.dataset_test_split) if s in ds]
    if not splits:
        raise UsageError(
            f"the dataset has neither a {script_args.dataset_train_split!r} nor a {script_args.dataset_test_split!r} "
            f"split (splits: {list(ds.keys())}); set dataset_train_split / dataset_test_split."
        )
    roles = ("completion",) if getattr(script_args, "trainer", "dpo") == "kto" else ("chosen", "rejected")
    distributed = under_launcher()
    if distributed:
        import torch
        from accelerate import PartialState

        PartialState(cpu=bool(training_args.use_cpu) or not torch.cuda.is_available())
    completed = False
    try:
        code = _score(ds, splits, specs, training_args, model_args, score_args.output, roles, distributed)
        completed = True
        return code
    finally:
        end_distributed(completed)


def _processes(launch: list[tuple[str, Any]]) -> int:
    values = [v for k, v in launch if k == "num_processes"]
    return int(values[-1]) if values else 2  # an accelerate config or other launch options: let accelerate decide


def _check_no_tokenizer_needed(specs) -> None:
    """A head that counts tokens needs the policy's tokenizer: say so before any data is loaded."""
    for spec in specs:
        if spec.type == "length" and (spec.params or {}).get("unit") == "tokens":
            raise UsageError(
                f"reward head {spec.name!r} counts tokens (unit: tokens), which needs the policy's tokenizer: give "
                f"`model_name_or_path` (only its tokenizer is loaded), or use unit: words or chars."
            )


def _note_tokenizer_keys(heads, specs) -> None:
    """Without ``model_name_or_path``, a head that may read the policy's tokenizer (a ``function`` head gets
    ``completion_ids`` from it) is scored without one, and its cached scores are keyed so: ``trl-upo train``, which
    always has the policy's tokenizer, cannot reuse them (they may differ). Say so, with the fix."""
    from trl_upo.scoring import reads_tokenizer

    names = [spec.name for head, spec in zip(heads, specs) if reads_tokenizer(head)]
    if names:
        print(f"note: reward head(s) {names} may read the policy's tokenizer (a function head's `completion_ids`) "
              f"and are scored without one (no model_name_or_path): `trl-upo train` scores them again with the "
              f"policy's tokenizer instead of reusing these cached scores. Give the recipe's model_name_or_path "
              f"(only its tokenizer is loaded) to score them as training will.", file=sys.stderr, flush=True)


def _check_output(output: str | None) -> None:
    """An output that cannot be written fails now, before any scoring."""
    if not output:
        return
    from trl_upo.scoring.cache import writable_dir

    problem = writable_dir(output)
    if problem:
        raise UsageError(f"--output {output!r} cannot be written ({problem}): give a directory you can write to.")


def _score(ds, splits, specs, training_args, model_args, output, roles, distributed) -> int:
    from datasets import IterableDataset

    from trl_upo.heads import build_head
    from trl_upo.scoring import score_dataset, statistics_summary, write_statistics_summary
    from trl_upo.scoring.shards import current_world

    tokenizer = None
    if model_args.model_name_or_path:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            model_args.model_name_or_path, revision=model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,
        )
    _STREAMED.clear()
    if distributed and any(isinstance(ds[split], IterableDataset) for split in splits):
        raise UsageError("trl-upo score reads a stream (dataset_streaming: true) in one process: drop "
                         "num_processes, or score a map-style dataset across processes.")
    from trl_upo.data.checks import check_no_nulls

    for split in splits:
        if not isinstance(ds[split], IterableDataset):
            check_no_nulls(ds[split], split)  # a null response names its row before any head runs
    heads = [build_head(s) for s in specs]
    main_process = current_world(distributed).is_main
    if tokenizer is None and main_process:
        _note_tokenizer_keys(heads, specs)
    results: dict[str, Any] = {}
    scored = {}
    try:
        for split in splits:
            if isinstance(ds[split], IterableDataset):
                scored[split], report = _score_stream(ds[split], heads, specs, split, tokenizer, training_args, roles,
                                                      output)
                columns = scored[split]  # the score columns only: the rows went to the output as they were read
            else:
                scored[split], report = score_dataset(
                    ds[split], heads, specs, split=split, tokenizer=tokenizer,
                    batch_size=training_args.upo_score_batch_size, cache_dir=training_args.upo_score_cache_dir,
                    use_cache=training_args.upo_use_score_cache, num_proc=training_args.dataset_num_proc,
                    roles=roles, distributed=distributed, record=bool(output),
                )
                columns = scored[split]
            results[split] = summarize(columns, specs, roles)
            if output and split == splits[0]:  # upo_statistics.json: a streaming run can adopt these statistics
                stats = statistics_summary(scored[split], heads, specs, training_args.upo_normalization, roles=roles,
                                           tokenizer=tokenizer, split=split)
            if main_process:
                print(format_summary(split, results[split], report.status), flush=True)
                print("seconds per head: " + ", ".join(f"{n} {t:.2f}" for n, t in report.seconds.items()), flush=True)
    finally:
        for head in heads:
            head.release()
    if output and main_process:
        _write(output, scored, specs, results)
        write_statistics_summary(output, stats)
    return 0


#: Splits of this command's run that were streamed (their rows are already in the output).
_STREAMED: set[str] = set()


def _score_stream(stream, heads, specs, split, tokenizer, training_args, roles, output):
    """A streamed split (``dataset_streaming: true``): scored batch by batch as it is read; each row goes to
    ``<output>/<split>.jsonl`` (temp file, renamed when the stream ends) and only its scores are kept, for the summary
    and the statistics. Returns ``(scores by column, report)``; one process reads the whole stream."""
    import time

    from datasets import Dataset

    from trl_upo.atomic import atomic_write
    from trl_upo.scoring import ScoreReport, score_column, score_stream

    start = time.perf_counter()
    scored = score_stream(stream, heads, specs, split=split, tokenizer=tokenizer,
                          batch_size=training_args.upo_score_batch_size, roles=roles,
                          cache_dir=training_args.upo_score_cache_dir, use_cache=training_args.upo_use_score_cache,
                          record=bool(output))
    names = [score_column(s.name, r) for s in specs for r in roles]
    kept: dict[str, list[float]] = {c: [] for c in names}

    def rows():
        for row in scored:
            for c in names:
                kept[c].append(row[c])
            yield row

    if output:
        os.makedirs(output, exist_ok=True)
        with atomic_write(os.path.join(output, f"{split}.jsonl")) as f:
            for row in rows():
                f.write(json.dumps(row, default=str) + "\n")
        _STREAMED.add(split)
    else:
        for _ in rows():
            pass
    seconds = time.perf_counter() - start
    n = len(kept[names[0]]) if names else 0
    report = ScoreReport({s.name: "stream" for s in specs}, {s.name: n * len(roles) for s in specs},
                         {s.name: seconds for s in specs})
    return Dataset.from_dict(kept), report


def _write(output: str, scored: dict, specs, results: dict) -> None:
    """Write each split and the summary atomically (temp file + rename: a full disk or a kill leaves the previous
    file or none, never a truncated ``train.jsonl``)."""
    from trl_upo.atomic import atomic_path, atomic_write

    os.makedirs(output, exist_ok=True)
    for split, data in scored.items():
        if split in _STREAMED:
            continue  # written row by row as the stream was read (_score_stream)
        with atomic_path(os.path.join(output, f"{split}.jsonl")) as tmp:
            data.to_json(tmp, lines=True, double_precision=15)
    with atomic_write(os.path.join(output, "summary.json")) as f:
        json.dump({"heads": [s.to_dict() for s in specs], "splits": results}, f, indent=2)
    print(f"Scored dataset and summary written to {os.path.abspath(output)} "
          f"({', '.join(f'{s}.jsonl' for s in scored)}, summary.json).")


if __name__ == "__main__":
    from trl_upo.cli import pop_debug

    sys.exit(main(pop_debug(sys.argv[1:]), prog="python -m trl_upo.cli.score"))
