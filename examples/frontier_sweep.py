"""The frontier sweep: DPO, the margin mode and UPO (several coefficients and every open option) trained from the same
start, evaluated on held-out data, and plotted as preference accuracy against each designer metric.

    python examples/frontier_sweep.py --task very --seeds 0 1 2 --output-dir outputs/frontier
    python examples/frontier_sweep.py --task length --seeds 0 1 2 --output-dir outputs/frontier

Everything is local and CPU-sized (the quickstart's tiny Llama, tokenizer and task: ``trl_upo.quickstart_task``); it
needs the installed ``trl_upo`` only and runs from any directory. For each seed:

1. SFT warm-up (TRL's ``SFTTrainer``) on the task's chosen and rejected answers: the common start.
2. One preference run per configuration (``UPOTrainer``; with no heads it is ``DPOTrainer``), same data and seed.
3. ``trl_upo.evaluation.evaluate_policy`` on held-out prompts (sampled answers scored by the evaluation heads) and
   held-out pairs (implicit-reward accuracy, the SFT model as the reference).

Tasks (``--task``):

- ``very``: the quickstart's task. Chosen answers are on-topic, rejected ones off-topic; "very" appears in half of
  all answers independently of the label. Designer objective: avoid "very" (the quickstart's function head).
- ``very-conflict``: the same, but the designer objective conflicts with the labels: 70% of chosen and 30% of
  rejected answers contain "very", so DPO learns to say it.
- ``length``: answers of 2 to 10 words, length independent of the label. Designer objective: be short (the
  ``length`` head). A different kind of objective: continuous, and satisfiable only down to the shortest answers
  the data contains.

Writes ``<output-dir>/<task>/results.jsonl`` (one line per run; finished runs are skipped when the command is run
again), ``table.md`` (mean and standard deviation over seeds) and one ``frontier_<metric>.png`` per designer metric.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from trl_upo import quickstart
from trl_upo.quickstart import CPU_RUN, NOVERY_HEAD
from trl_upo.quickstart_task import DESIGNER_WORD, TOPICS, build_tokenizer, is_on_topic, preference_rows, topic_answer

# ----------------------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------------------


def _pairs(n: int, seed: int, length: Callable[[random.Random], int], p_chosen: float, p_rejected: float) -> list[dict]:
    rng = random.Random(seed)

    def answer(topic: str, p_word: float) -> str:
        n_words = length(rng)  # drawn before the coin for the designer word
        return " " + topic_answer(rng, topic, rng.random() < p_word, n_words)

    rows = []
    for _ in range(n):
        topic = rng.choice(list(TOPICS))
        other = rng.choice([t for t in TOPICS if t != topic])
        rows.append(
            {
                "prompt": f"tell me about {topic} answer",
                "chosen": answer(topic, p_chosen),
                "rejected": answer(other, p_rejected),
            }
        )
    return rows


def conflict_rows(n: int, seed: int) -> list[dict]:
    """"very" in 70% of chosen and 30% of rejected answers: the designer objective conflicts with the labels."""
    return _pairs(n, seed, lambda rng: rng.randint(3, 6), 0.7, 0.3)


def length_rows(n: int, seed: int) -> list[dict]:
    """Answers of 2 to 10 words, length independent of the label; no "very"."""
    return _pairs(n, seed, lambda rng: rng.randint(2, 10), 0.0, 0.0)


def very_rate(prompts, completions, **kwargs) -> list[float]:
    """1.0 when a response contains the designer word (an evaluation head: lower is better)."""
    return [float(DESIGNER_WORD in str(c).split()) for c in completions]


def on_topic(prompts, completions, **kwargs) -> list[float]:
    """1.0 when the prompt's topic has the most topic words in the response (and at least one), as the quickstart
    counts it: the preference objective, seen in generations."""
    out = []
    for p, c in zip(prompts, completions, strict=True):
        topic = next(t for t in TOPICS if f"about {t}" in p)
        out.append(float(is_on_topic(str(c).split(), topic)))
    return out


VERY_RATE = {"name": "very_rate", "type": "function", "higher_is_better": False, "params": {"function": very_rate}}
ON_TOPIC = {"name": "on_topic", "type": "function", "params": {"function": on_topic}}
WORDS = {"name": "words", "type": "length", "higher_is_better": False, "params": {"direction": "longer"}}


@dataclass
class Task:
    """A synthetic task: its data, the designer head UPO trains with, and the evaluation heads."""

    rows: Callable[[int, int], list[dict]]
    train_heads: list[dict]
    eval_heads: list[dict]
    designer: str  # the evaluation head that measures the designer objective
    max_new_tokens: int = 12


TASKS: dict[str, Task] = {
    "very": Task(lambda n, s: preference_rows(n, seed=s), [NOVERY_HEAD], [VERY_RATE, ON_TOPIC], "very_rate"),
    "very-conflict": Task(conflict_rows, [NOVERY_HEAD], [VERY_RATE, ON_TOPIC], "very_rate"),
    "length": Task(
        length_rows,
        [{"name": "short", "type": "length", "params": {"direction": "shorter"}}],
        [WORDS, ON_TOPIC],
        "words",
        max_new_tokens=16,
    ),
}

# ----------------------------------------------------------------------------------------------------------------
# Configurations: UPOConfig overrides. "dpo" trains without heads (UPOTrainer is then DPOTrainer).
# ----------------------------------------------------------------------------------------------------------------

CONFIGS: dict[str, dict[str, Any]] = {
    "dpo": {"heads": False},
    "margin-a1": {"upo_combine": "margin", "upo_alpha": 1.0},
    "margin-a3": {"upo_combine": "margin", "upo_alpha": 3.0},
    "upo-a0.25": {"upo_alpha": 0.25},
    "upo-a0.5": {"upo_alpha": 0.5},
    "upo-a1": {"upo_alpha": 1.0},  # every other option at its default: tau 0.25, batch, chosen, mean
    "upo-a4": {"upo_alpha": 4.0},
    "upo-a1-tau1": {"upo_alpha": 1.0, "upo_temperature": 1.0},
    "upo-a1-pair": {"upo_alpha": 1.0, "upo_baseline": "pair"},
    "upo-a1-nobaseline": {"upo_alpha": 1.0, "upo_baseline": "none"},
    "upo-a1-both": {"upo_alpha": 1.0, "upo_applies_to": "both"},
    "upo-a1-sum": {"upo_alpha": 1.0, "upo_loglik": "sum"},
}


@dataclass
class Settings:
    """Sizes of one sweep (the defaults are the documented run; the tests shrink them)."""

    steps: int = 150
    sft_steps: int = 150
    n_train: int = 400
    n_eval_prompts: int = 64
    n_eval_pairs: int = 128
    num_samples: int = 4
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------------------


def sft_warmup(task: Task, out_dir: str, seed: int, s: Settings) -> str:
    """Warm a fresh tiny Llama up on the task's answers (chosen and rejected) with SFTTrainer, as the quickstart
    does; return its path (``<out_dir>/seed<seed>/sft``)."""
    seed_dir = os.path.join(out_dir, f"seed{seed}")
    path = os.path.join(seed_dir, "sft")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    return quickstart.sft_warmup(seed_dir, seed, s.sft_steps, rows=task.rows(s.n_train, seed + 1000))


def train_run(trainer_cls: Any, config_cls: Any, configs: dict, task: Task, rows: list[dict], base: str,
              out_dir: str, name: str, seed: int, s: Settings) -> str:
    """Train ``base`` on ``rows`` with configuration ``name`` of ``configs`` (its ``heads: False`` trains without
    heads) and the sweep's shared settings; return the saved model's path. Also used by ``examples/kto_sweep.py``."""
    from datasets import Dataset

    overrides = dict(configs[name])
    heads = task.train_heads if overrides.pop("heads", True) else []
    args = config_cls(
        output_dir=os.path.join(out_dir, f"seed{seed}", name), per_device_train_batch_size=16, max_steps=s.steps,
        learning_rate=2e-3, beta=0.1, logging_steps=max(1, s.steps // 5), seed=seed, reward_heads=heads,
        upo_score_cache_dir=os.path.join(out_dir, "score-cache"), **CPU_RUN, **overrides,
    )
    trainer = trainer_cls(model=base, args=args, train_dataset=Dataset.from_list(rows))
    trainer.train()
    trainer.save_model()
    return args.output_dir


def preference_run(task: Task, base: str, out_dir: str, name: str, seed: int, s: Settings) -> str:
    """Train ``base`` on the task's pairs with configuration ``name``; return the saved model's path."""
    from trl_upo import UPOConfig, UPOTrainer

    rows = task.rows(s.n_train, seed + 2000)
    return train_run(UPOTrainer, UPOConfig, CONFIGS, task, rows, base, out_dir, name, seed, s)


def evaluate_run(task: Task, path: str, ref: Any, seed: int, s: Settings) -> dict:
    """Designer metrics of sampled answers to held-out prompts and implicit-reward accuracy on held-out pairs."""
    from trl_upo.evaluation import evaluate_policy

    rng = random.Random(seed + 3000)
    prompts = [f"tell me about {rng.choice(list(TOPICS))} answer" for _ in range(s.n_eval_prompts)]
    return evaluate_policy(
        path, build_tokenizer(), prompts=prompts, heads=task.eval_heads, pairs=task.rows(s.n_eval_pairs, seed + 4000),
        ref_model=ref, beta=0.1, max_new_tokens=task.max_new_tokens, num_samples=s.num_samples, batch_size=64,
        seed=seed, num_examples=3,
    )


def results_so_far(out_dir: str, task_name: str, key: tuple[str, ...]) -> tuple[str, str, dict]:
    """``(task_dir, results_file, done)``: the task's directory (created), its ``results.jsonl`` and the results
    already in it, keyed by the values of ``key`` (a sweep resumes where it stopped)."""
    task_dir = os.path.join(out_dir, task_name)
    os.makedirs(task_dir, exist_ok=True)
    results_file = os.path.join(task_dir, "results.jsonl")
    done = {}
    if os.path.exists(results_file):
        with open(results_file) as f:
            for line in f:
                r = json.loads(line)
                done[tuple(r[k] for k in key)] = r
    return task_dir, results_file, done


def run_sweep(task_name: str, seeds: list[int], configs: list[str], out_dir: str, s: Settings,
              log: Callable[[str], None] = print) -> list[dict]:
    """Train and evaluate every (seed, config) not already in ``results.jsonl``; return all results."""
    from trl_upo.evaluation import load_model

    task = TASKS[task_name]
    task_dir, results_file, done = results_so_far(out_dir, task_name, ("seed", "config"))
    for seed in seeds:
        todo = [c for c in ["start"] + configs if (seed, c) not in done]
        if not todo:
            continue
        t0 = time.time()
        base = sft_warmup(task, task_dir, seed, s)
        ref = load_model(base)
        log(f"[{task_name}] seed {seed}: SFT start ready ({time.time() - t0:.0f} s)")
        for name in todo:
            t1 = time.time()
            path = base if name == "start" else preference_run(task, base, task_dir, name, seed, s)
            ev = evaluate_run(task, path, ref, seed, s)
            row = {"task": task_name, "seed": seed, "config": name, "overrides": _jsonable(CONFIGS.get(name, {})),
                   "seconds": round(time.time() - t1, 1), **ev}
            done[(seed, name)] = row
            with open(results_file, "a") as f:
                f.write(json.dumps(row) + "\n")
            metrics = ", ".join(f"{h} {m['mean']:.3f}" for h, m in ev["designer"].items())
            log(f"[{task_name}] seed {seed} {name:>18}: acc {ev['preference']['accuracy']:.3f}, {metrics} "
                f"({row['seconds']} s)")
    return [done[k] for k in sorted(done, key=lambda k: (k[0], (["start"] + list(CONFIGS)).index(k[1])))
            if k[0] in seeds and k[1] in ["start"] + configs]


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool))}


# ----------------------------------------------------------------------------------------------------------------
# Summary: table and plots
# ----------------------------------------------------------------------------------------------------------------


def summarize(results: list[dict]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """``{config: {metric: (mean, std over seeds, n_seeds)}}``; metrics: ``accuracy`` and each designer head."""
    by_config: dict[str, dict[str, list[float]]] = {}
    for r in results:
        m = by_config.setdefault(r["config"], {})
        m.setdefault("accuracy", []).append(r["preference"]["accuracy"])
        for head, v in r["designer"].items():
            m.setdefault(head, []).append(v["mean"])
    out = {}
    for config, metrics in by_config.items():
        out[config] = {}
        for k, vals in metrics.items():
            t = torch.tensor(vals, dtype=torch.float64)
            out[config][k] = (float(t.mean()), float(t.std(unbiased=False)) if len(vals) > 1 else 0.0, len(vals))
    return out


def paired_differences(results: list[dict], baseline: str = "dpo") -> dict[str, dict[str, tuple[float, float, int]]]:
    """``{config: {metric: (mean, std, n)}}`` of ``config - baseline`` per seed (paired: same start, data, seed)."""
    values: dict[tuple[int, str], dict[str, float]] = {}
    for r in results:
        values[(r["seed"], r["config"])] = {"accuracy": r["preference"]["accuracy"]} | {
            h: v["mean"] for h, v in r["designer"].items()
        }
    out: dict[str, dict[str, list[float]]] = {}
    for (seed, config), metrics in values.items():
        if config in (baseline, "start") or (seed, baseline) not in values:
            continue
        base = values[(seed, baseline)]
        for k, v in metrics.items():
            out.setdefault(config, {}).setdefault(k, []).append(v - base[k])
    return {
        c: {
            k: (float(torch.tensor(v).mean()), float(torch.tensor(v).std(unbiased=False)), len(v))
            for k, v in m.items()
        }
        for c, m in out.items()
    }


def markdown_table(summary: dict, heads: list[dict]) -> str:
    """A Markdown table: one row per configuration, mean ± std over seeds."""
    names = [h["name"] for h in heads]
    arrows = {h["name"]: ("lower" if h.get("higher_is_better", True) is False else "higher") for h in heads}
    header = "| config | seeds | pref. accuracy (higher) | " + " | ".join(f"{n} ({arrows[n]})" for n in names) + " |"
    lines = [header, "|" + "---|" * (3 + len(names))]
    for config, m in summary.items():
        cells = [f"{m[k][0]:.3f} ± {m[k][1]:.3f}" for k in ["accuracy"] + names]
        lines.append(f"| {config} | {m['accuracy'][2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_frontier(summary: dict, heads: list[dict], out_dir: str, title: str) -> list[str]:
    """One PNG per designer metric: preference accuracy (x) against the metric (y), error bars = std over seeds."""
    from trl_upo.evaluation import require_matplotlib

    plt = require_matplotlib()
    paths = []
    for head in heads:
        name = head["name"]
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=80)
        for config, m in summary.items():
            if config == "start":  # its accuracy is 0.5 by construction (it is its own reference)
                continue
            family = config.split("-")[0]
            color = {"dpo": "black", "margin": "tab:blue", "upo": "tab:red", "start": "gray"}.get(family, "tab:green")
            marker = "o" if config in ("dpo", "upo-a1", "start") or family == "margin" else "^"
            ax.errorbar(m["accuracy"][0], m[name][0], xerr=m["accuracy"][1], yerr=m[name][1], fmt=marker,
                        color=color, ms=5, capsize=2, lw=0.8)
            ax.annotate(config, (m["accuracy"][0], m[name][0]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        lower = head.get("higher_is_better", True) is False
        ax.set_xlabel("held-out implicit-reward accuracy (higher is better)")
        ax.set_ylabel(f"{name} of sampled answers ({'lower' if lower else 'higher'} is better)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, f"frontier_{name}.png")
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Run the sweep from the command line; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=list(TASKS), default="very")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    parser.add_argument("--output-dir", default="outputs/frontier")
    parser.add_argument("--steps", type=int, default=150, help="preference-optimisation steps per run")
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--n-train", type=int, default=400, help="training pairs")
    parser.add_argument("--n-eval-prompts", type=int, default=64)
    parser.add_argument("--n-eval-pairs", type=int, default=128)
    parser.add_argument("--num-samples", type=int, default=4, help="sampled answers per held-out prompt")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for the tiny model)")
    a = parser.parse_args(argv)
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        import difflib

        hints = [f"{c!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(c, CONFIGS, n=1)) else "")
                 for c in unknown]
        parser.error(f"unknown config(s) {', '.join(hints)}; choose from {list(CONFIGS)}")
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(a.threads)
    s = Settings(a.steps, a.sft_steps, a.n_train, a.n_eval_prompts, a.n_eval_pairs, a.num_samples)
    t0 = time.time()
    results = run_sweep(a.task, a.seeds, configs, a.output_dir, s)
    summary = summarize(results)
    task = TASKS[a.task]
    table = markdown_table(summary, task.eval_heads)
    if "dpo" in configs and len(configs) > 1:
        table += "\n\nDifference from DPO, paired by seed (mean ± std over seeds):\n\n"
        table += markdown_table(paired_differences(results), task.eval_heads)
    task_dir = os.path.join(a.output_dir, a.task)
    with open(os.path.join(task_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(task_dir, "summary.json"), "w") as f:
        json.dump({"mean_std_n": summary, "difference_from_dpo": paired_differences(results)}, f, indent=2)
    title = f"task {a.task}: {len(a.seeds)} seeds, {a.steps} steps"
    plots = plot_frontier(summary, task.eval_heads, task_dir, title)
    print("\n" + table)
    print(f"\n{time.time() - t0:.0f} s; results in {task_dir}; plots: {', '.join(plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
