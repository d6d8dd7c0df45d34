"""KTO against UPO-KTO on the frontier sweep's synthetic tasks in unpaired form: each preference pair is split into a
desirable row (the chosen answer) and an undesirable row (the rejected one), shuffled.

    python examples/kto_sweep.py --task very --seeds 0 1 2 --output-dir outputs/kto
    python examples/kto_sweep.py --task very-conflict --seeds 0 1 2 --output-dir outputs/kto

The tasks, the SFT warm-up (the common start), the designer heads and the evaluation of sampled answers are those of
``examples/frontier_sweep.py`` (loaded from next to this file); the preference runs are ``UPOKTOTrainer`` (with no
heads it is ``KTOTrainer``). Held out: sampled answers to new prompts (designer metrics, the on-topic rate) and new
rows split from pairs (``trl_upo.evaluation.unpaired_metrics``: sign accuracy and desirable-over-undesirable ranking
accuracy of the implicit reward, the SFT model as the reference).

Writes ``<output-dir>/<task>/results.jsonl`` (finished runs are skipped when run again) and ``table.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import time
from typing import Any

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("frontier_sweep", os.path.join(_HERE, "frontier_sweep.py"))
fs = importlib.util.module_from_spec(_spec)
sys.modules["frontier_sweep"] = fs
_spec.loader.exec_module(fs)

#: UPOKTOConfig overrides. "kto" trains without heads (UPOKTOTrainer is then KTOTrainer).
CONFIGS: dict[str, dict[str, Any]] = {
    "kto": {"heads": False},
    "upo-kto-a0.1": {"upo_alpha": 0.1},
    "upo-kto-a0.25": {"upo_alpha": 0.25},
    "upo-kto-a0.5": {"upo_alpha": 0.5},
    "upo-kto-a1": {"upo_alpha": 1.0},
    "upo-kto-a1-all": {"upo_alpha": 1.0, "upo_applies_to": "all"},
    "upo-kto-a1-tau1": {"upo_alpha": 1.0, "upo_temperature": 1.0},
}


def unpair(rows: list[dict], seed: int) -> list[dict]:
    """Each pair -> a desirable and an undesirable row (``trl_upo.data.unpair_rows``: a row an earlier pair already gave
    is not repeated), shuffled (so every batch mixes both kinds)."""
    from trl_upo.data import unpair_rows

    out = unpair_rows(rows)
    random.Random(seed).shuffle(out)
    return out


def kto_run(task: Any, base: str, out_dir: str, name: str, seed: int, s: Any) -> str:
    """Train ``base`` on the task's unpaired rows with configuration ``name``; return the saved model's path."""
    from trl_upo import UPOKTOConfig, UPOKTOTrainer

    rows = unpair(task.rows(s.n_train, seed + 2000), seed)
    return fs.train_run(UPOKTOTrainer, UPOKTOConfig, CONFIGS, task, rows, base, out_dir, name, seed, s)


def evaluate(task: Any, path: str, ref: Any, seed: int, s: Any) -> dict:
    """Designer metrics of sampled answers, and the unpaired accuracies on held-out rows."""
    from trl_upo.evaluation import unpaired_metrics
    from trl_upo.quickstart_task import build_tokenizer

    ev = fs.evaluate_run(task, path, ref, seed, s)
    rows = unpair(task.rows(s.n_eval_pairs, seed + 4000), seed)
    ev["unpaired"] = unpaired_metrics(path, build_tokenizer(), rows, ref_model=ref, beta=0.1, batch_size=64)
    return ev


def run(task_name: str, seeds: list[int], configs: list[str], out_dir: str, s: Any) -> list[dict]:
    """Train and evaluate every (seed, config) not already in ``results.jsonl``; return all results."""
    from trl_upo.evaluation import load_model

    task = fs.TASKS[task_name]
    task_dir, results_file, done = fs.results_so_far(out_dir, task_name, ("seed", "config"))
    for seed in seeds:
        todo = [c for c in configs if (seed, c) not in done]
        if not todo:
            continue
        base = fs.sft_warmup(task, task_dir, seed, s)
        ref = load_model(base)
        for name in todo:
            t0 = time.time()
            ev = evaluate(task, kto_run(task, base, task_dir, name, seed, s), ref, seed, s)
            row = {"task": task_name, "seed": seed, "config": name, "seconds": round(time.time() - t0, 1), **ev}
            done[(seed, name)] = row
            with open(results_file, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"[{task_name}] seed {seed} {name:>16}: rank acc {ev['unpaired']['ranking_accuracy']:.3f}, sign acc "
                  f"{ev['unpaired']['accuracy']:.3f}, " + ", ".join(f"{h} {m['mean']:.3f}" for h, m in
                                                                     ev["designer"].items()), flush=True)
    return [done[k] for k in sorted(done) if k[0] in seeds and k[1] in configs]


def table(results: list[dict], heads: list[dict]) -> str:
    """Mean ± std over seeds per configuration, and the paired difference from KTO."""
    names = [h["name"] for h in heads]
    metrics = ["ranking_accuracy", "accuracy", *names]

    def values(r: dict) -> dict[str, float]:
        return {"ranking_accuracy": r["unpaired"]["ranking_accuracy"], "accuracy": r["unpaired"]["accuracy"]} | {
            h: r["designer"][h]["mean"] for h in names}

    by = {}
    for r in results:
        by.setdefault(r["config"], []).append(values(r))
    base = {r["seed"]: values(r) for r in results if r["config"] == "kto"}
    lines = ["| config | seeds | " + " | ".join(metrics) + " | " + " | ".join(f"Δ {m} vs KTO" for m in metrics) + " |",
             "|" + "---|" * (2 + 2 * len(metrics))]
    for config, rows in by.items():
        cells = []
        for m in metrics:
            t = torch.tensor([v[m] for v in rows], dtype=torch.float64)
            cells.append(f"{t.mean():.3f} ± {t.std(unbiased=False):.3f}")
        seeds = [r["seed"] for r in results if r["config"] == config]
        for m in metrics:
            d = torch.tensor([values(r)[m] - base[r["seed"]][m] for r in results
                              if r["config"] == config and r["seed"] in base], dtype=torch.float64)
            cells.append(f"{d.mean():+.3f} ± {d.std(unbiased=False):.3f}" if d.numel() else "-")
        lines.append(f"| {config} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the sweep from the command line; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=list(fs.TASKS), default="very")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    parser.add_argument("--output-dir", default="outputs/kto")
    parser.add_argument("--steps", type=int, default=100, help="optimisation steps per run (16 rows each)")
    parser.add_argument("--sft-steps", type=int, default=100)
    parser.add_argument("--n-train", type=int, default=200, help="training pairs (twice as many unpaired rows)")
    parser.add_argument("--n-eval-prompts", type=int, default=48)
    parser.add_argument("--n-eval-pairs", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    a = parser.parse_args(argv)
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(a.threads)
    s = fs.Settings(a.steps, a.sft_steps, a.n_train, a.n_eval_prompts, a.n_eval_pairs, a.num_samples)
    t0 = time.time()
    results = run(a.task, a.seeds, configs, a.output_dir, s)
    text = table(results, fs.TASKS[a.task].eval_heads)
    with open(os.path.join(a.output_dir, a.task, "table.md"), "w") as f:
        f.write(text + "\n")
    print("\n" + text + f"\n\n{time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
