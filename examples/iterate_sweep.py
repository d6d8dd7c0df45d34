"""Iterative UPO rounds against offline controls at equal training steps, on the frontier sweep's synthetic tasks.

    python examples/iterate_sweep.py --task length --seeds 0 1 --output-dir outputs/iterate-sweep
    python examples/iterate_sweep.py --task very --seeds 0 1 --output-dir outputs/iterate-sweep

The tasks, the SFT warm-up (the common start), the offline configurations and the evaluation are those of
``examples/frontier_sweep.py`` (loaded from next to this file). For each seed, from the same start:

- offline runs (``UPOTrainer``) of ``--first-steps + (rounds - 1) * --round-steps`` steps on the task's pairs:
  DPO, the margin mode, UPO (``upo-a1``) and, on the length task, TRL's ``ld_alpha: 0.5`` and
  ``loss_type: sigmoid_norm``;
- iterative runs (``trl_upo.iterate.run_rounds``), ``--rounds`` rounds: round 1 is the offline UPO run of
  ``--first-steps`` steps (or DPO's, for plain DPO rounds); each later round samples ``--samples`` answers per train
  prompt from the previous policy, has the on-topic judge (``trl_upo.iterate.tasks:on_topic``) label them, and trains
  ``--round-steps`` steps from the previous policy (reference: the previous policy):
  ``rounds-upo-kto`` (unpaired rows, UPO-KTO, the task's head), ``rounds-upo-pairs`` (best/worst pairs, UPO) and
  ``rounds-dpo`` (best/worst pairs, no head: rounds of plain DPO with the same judge).

Every model (each offline run, each round) is evaluated as ``frontier_sweep.evaluate_run`` does: designer metrics of
sampled answers to held-out prompts, implicit-reward accuracy on held-out pairs with the SFT start as the reference.
Compute per run is recorded: training steps and generated tokens (the rounds' samples).

Writes ``<output-dir>/<task>/results.jsonl`` (one line per model; finished ones are skipped when run again),
``table.md`` and ``frontier_rounds.png``; a method whose rounds stop (the judge accepted every sample of a round, so
there are no undesirable rows or no pairs) keeps its completed rounds and is listed in ``stopped.jsonl``.
``--samples 256 --tag=-k256`` runs the methods with 256 samples per prompt under names ending in ``-k256``;
``--reference original`` anchors rounds >= 2 to the SFT start, ``--kto-weights balanced`` sets KTO's class weights from
each round's counts (``IterateConfig.kto_weights``), ``--replay 1.0`` adds the task's original pairs to each round
>= 2 (``IterateConfig.replay``: the share of them; two unpaired rows per pair for KTO), and ``--first-round`` /
``--later-rounds`` take JSON overrides of the rounds' training settings (``'{"reward_heads": []}'`` makes round 1
plain DPO); give each variant its own ``--tag``. Round 1 is trained once per seed for all methods whose round-1
settings are the same.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from typing import Any

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("frontier_sweep", os.path.join(_HERE, "frontier_sweep.py"))
fs = importlib.util.module_from_spec(_spec)
sys.modules["frontier_sweep"] = fs
_spec.loader.exec_module(fs)

OFFLINE = {"dpo": fs.CONFIGS["dpo"], "margin-a1": fs.CONFIGS["margin-a1"], "upo-a1": fs.CONFIGS["upo-a1"],
           "ld-alpha-0.5": {"heads": False, "ld_alpha": 0.5},
           "sigmoid-norm": {"heads": False, "loss_type": "sigmoid_norm"}}
LENGTH_ONLY = ("ld-alpha-0.5", "sigmoid-norm")
#: iterative method -> (form of rounds >= 2, train with the task's heads)
ROUNDS = {"rounds-upo-kto": ("unpaired", True), "rounds-upo-pairs": ("pairs", True), "rounds-dpo": ("pairs", False)}
JUDGE = {"name": "judge_on_topic", "type": "function", "params": {"function": "trl_upo.iterate.tasks:on_topic"},
         "threshold": 0.5}


def write_task_data(task: Any, task_dir: str, seed: int, s: Any) -> str:
    """The task's train pairs (as the offline runs get them) and held-out pairs as a dataset directory."""
    path = os.path.join(task_dir, f"seed{seed}", "data")
    os.makedirs(path, exist_ok=True)
    for split, rows in (("train", task.rows(s.n_train, seed + 2000)), ("test", task.rows(s.n_eval_pairs, seed + 4000))):
        with open(os.path.join(path, f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def rounds_config(task: Any, base: str, data: str, out: str, form: str, heads: bool, seed: int, a: Any) -> dict:
    """The ``IterateConfig`` mapping of one iterative method."""
    training = {**{k: v for k, v in fs.CPU_RUN.items()}, "per_device_train_batch_size": 16, "learning_rate": 2e-3,
                "beta": 0.1, "logging_steps": 25, "reward_heads": task.train_heads if heads else [], "upo_alpha": 1.0}
    return {"model": base, "dataset": data, "output_dir": out, "rounds": a.rounds, "trainer": "dpo", "form": form,
            "reference": a.reference, "kto_weights": a.kto_weights, "replay": a.replay, "seed": seed,
            "training": training,
            "first_round": {"max_steps": a.first_steps, **a.first_round},
            "later_rounds": {"max_steps": a.round_steps, **a.later_rounds},
            "judge": JUDGE, "samples_per_prompt": a.samples,
            "generation": {"max_new_tokens": task.max_new_tokens, "temperature": 1.0},
            "eval_num_prompts": 32, "eval_num_samples": 2, "eval_max_new_tokens": task.max_new_tokens}


def run_seed(task_name: str, seed: int, a: Any, done: dict, results_file: str, log=print) -> None:
    """Every offline run and every iterative method's rounds of one seed that ``done`` does not hold."""
    from trl_upo.evaluation import load_model
    from trl_upo.iterate import IterateConfigError, completed_rounds, run_rounds

    task, task_dir = fs.TASKS[task_name], os.path.join(a.output_dir, task_name)
    total = a.first_steps + (a.rounds - 1) * a.round_steps
    s = fs.Settings(steps=total, sft_steps=a.sft_steps, n_train=a.n_train, n_eval_prompts=a.n_eval_prompts,
                    n_eval_pairs=a.n_eval_pairs, num_samples=a.num_samples)
    base = fs.sft_warmup(task, task_dir, seed, s)
    ref = load_model(base)

    def record(method: str, k: int, path: str, compute: dict) -> None:
        if (seed, method, k) in done:
            return
        t0 = time.time()
        ev = fs.evaluate_run(task, path, ref, seed, s)
        row = {"task": task_name, "seed": seed, "method": method, "round": k, "compute": compute,
               "seconds": round(time.time() - t0, 1), "designer": ev["designer"], "preference": ev["preference"]}
        done[(seed, method, k)] = row
        with open(results_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        metrics = ", ".join(f"{h} {m['mean']:.3f}" for h, m in ev["designer"].items())
        log(f"[{task_name}] seed {seed} {method:>17} r{k}: acc {ev['preference']['accuracy']:.3f}, {metrics}")

    record("start", 0, base, {"train_steps": 0, "generated_tokens": 0})
    configs = {**fs.CONFIGS, **OFFLINE}
    for name in a.offline:
        if (seed, name, 0) not in done:
            path = fs.train_run(_upo_trainer(), _upo_config(), configs, task, task.rows(s.n_train, seed + 2000), base,
                                task_dir, name, seed, s)
            record(name, 0, path, {"train_steps": total, "generated_tokens": 0})
    data = write_task_data(task, task_dir, seed, s)
    for method in a.methods:
        form, heads = ROUNDS[method]
        name = method + a.tag
        out = os.path.join(task_dir, f"seed{seed}", name)
        config = rounds_config(task, base, data, out, form, heads, seed, a)
        _reuse_round_one(task_dir, seed, config, out)
        try:
            reports = run_rounds(config, log=lambda m: None)
        except IterateConfigError as e:  # e.g. the judge accepted every sample of a round: recorded, not hidden
            log(f"[{task_name}] seed {seed} {name}: stopped: {e}")
            with open(os.path.join(task_dir, "stopped.jsonl"), "a") as f:
                f.write(json.dumps({"seed": seed, "method": name, "reason": str(e)}) + "\n")
            reports = [json.load(open(os.path.join(out, f"round-{k}", "report.json"))) for k in completed_rounds(out)]
        for r in reports:
            record(name, r["round"], os.path.join(out, f"round-{r['round']}"),
                   {k: r["compute"][k] for k in ("train_steps", "generated_tokens")})


def _upo_trainer():
    from trl_upo import UPOTrainer

    return UPOTrainer


def _upo_config():
    from trl_upo import UPOConfig

    return UPOConfig


def _reuse_round_one(task_dir: str, seed: int, config: dict, out: str) -> None:
    """Round 1 is the same run for every method whose round-1 settings are the same (the model, data, trainer,
    seed, ``training`` and ``first_round``; the reference of round 1 is the model whatever ``--reference`` says):
    copy the first completed round 1 of such a method instead of training it again."""
    seed_dir = os.path.join(task_dir, f"seed{seed}")
    keys = ("model", "dataset", "trainer", "seed", "training", "first_round")
    want = json.loads(json.dumps({k: config[k] for k in keys}))
    for name in sorted(os.listdir(seed_dir)) if os.path.isdir(seed_dir) and not os.path.exists(out) else []:
        src, snapshot = os.path.join(seed_dir, name, "round-1"), os.path.join(seed_dir, name, "iterate.json")
        if os.path.exists(os.path.join(src, "report.json")) and os.path.exists(snapshot):
            with open(snapshot) as f:
                saved = json.load(f)
            if {k: saved.get(k) for k in keys} == want:
                shutil.copytree(src, os.path.join(out, "round-1"))
                return


def summary_rows(results: list[dict]) -> dict[tuple[str, int], dict[str, tuple[float, float, int]]]:
    """``{(method, round): {metric: (mean, std, n)}}`` over seeds; metrics: accuracy, each designer head, compute."""
    acc: dict[tuple[str, int], dict[str, list[float]]] = {}
    for r in results:
        m = acc.setdefault((r["method"], r["round"]), {})
        m.setdefault("accuracy", []).append(r["preference"]["accuracy"])
        for h, v in r["designer"].items():
            m.setdefault(h, []).append(v["mean"])
        for k, v in r["compute"].items():
            m.setdefault(k, []).append(float(v))
    return {k: {n: (float(torch.tensor(v).mean()), float(torch.tensor(v, dtype=torch.float64).std(unbiased=False)),
                    len(v)) for n, v in m.items()} for k, m in acc.items()}


def markdown_table(summary: dict, heads: list[dict]) -> str:
    """One row per (method, round): mean ± std over seeds, and the compute."""
    names = [h["name"] for h in heads]
    arrows = {h["name"]: ("lower" if h.get("higher_is_better", True) is False else "higher") for h in heads}
    lines = ["| method | round | seeds | train steps | generated tokens | pref. accuracy | "
             + " | ".join(f"{n} ({arrows[n]})" for n in names) + " |", "|" + "---|" * (6 + len(names))]
    for (method, k), m in summary.items():
        cells = [f"{m[n][0]:.3f} ± {m[n][1]:.3f}" for n in ["accuracy", *names]]
        lines.append(f"| {method} | {k if k else '-'} | {m['accuracy'][2]} | {m['train_steps'][0]:.0f} | "
                     f"{m['generated_tokens'][0]:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, heads: list[dict], path: str, title: str) -> str | None:
    """Each designer metric against accuracy: one point per offline run, a line through each method's rounds."""
    from trl_upo.iterate.report import optional_pyplot

    plt = optional_pyplot("iterate_sweep")
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(heads), figsize=(5.4 * len(heads), 4.4), dpi=80, squeeze=False)
    methods = list(dict.fromkeys(m for m, _ in summary))
    for ax, head in zip(axes[0], heads, strict=True):
        for method in methods:
            pts = sorted((k, v) for (m, k), v in summary.items() if m == method)
            xs, ys = [v["accuracy"][0] for _, v in pts], [v[head["name"]][0] for _, v in pts]
            ax.plot(xs, ys, marker="o" if len(pts) > 1 else "s", ms=4, lw=1, label=method)
            for (k, _), x, y in zip(pts, xs, ys, strict=True):
                if len(pts) > 1:
                    ax.annotate(f"r{k}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("held-out implicit-reward accuracy (higher is better)")
        ax.set_ylabel(f"{head['name']} of sampled answers")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """Run the sweep from the command line; returns the exit code."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=list(fs.TASKS), default="length")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--offline", default="dpo,margin-a1,upo-a1,ld-alpha-0.5,sigmoid-norm")
    p.add_argument("--methods", default=",".join(ROUNDS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--first-steps", type=int, default=150, help="round 1 (and the offline SFT-like budget unit)")
    p.add_argument("--round-steps", type=int, default=50, help="steps of each round >= 2")
    p.add_argument("--samples", type=int, default=48, help="answers sampled per train prompt in rounds >= 2")
    p.add_argument("--sft-steps", type=int, default=150)
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--n-eval-prompts", type=int, default=64)
    p.add_argument("--n-eval-pairs", type=int, default=128)
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--output-dir", default="outputs/iterate-sweep")
    p.add_argument("--reference", choices=["previous", "original"], default="previous",
                   help="the reference policy of rounds >= 2")
    p.add_argument("--kto-weights", choices=["balanced", "none"], default="none",
                   help="KTO's class weights in the unpaired rounds (none: TRL's 1 and 1, as the first sweep ran)")
    p.add_argument("--replay", type=float, default=0.0,
                   help="share of the original train pairs added to each round >= 2 (IterateConfig.replay; 0: none)")
    p.add_argument("--first-round", type=json.loads, default={},
                   help='JSON overrides of round 1\'s training settings, e.g. \'{"upo_alpha": 0.3}\'')
    p.add_argument("--later-rounds", type=json.loads, default={},
                   help="JSON overrides of the training settings of rounds >= 2")
    p.add_argument("--tag", default="", help="suffix of the iterative methods' names and directories (another K)")
    a = p.parse_args(argv)
    a.offline = [c for c in a.offline.split(",") if c and (a.task == "length" or c not in LENGTH_ONLY)]
    a.methods = [m for m in a.methods.split(",") if m]
    bad = [c for c in a.offline if c not in OFFLINE] + [m for m in a.methods if m not in ROUNDS]
    if bad:
        p.error(f"unknown offline config or method {bad}; offline: {list(OFFLINE)}, methods: {list(ROUNDS)}")
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(1)
    task_dir, results_file, done = fs.results_so_far(a.output_dir, a.task, ("seed", "method", "round"))
    for seed in a.seeds:
        run_seed(a.task, seed, a, done, results_file)
    results = [r for r in done.values() if r["seed"] in a.seeds]
    summary = summary_rows(results)
    heads = fs.TASKS[a.task].eval_heads
    table = markdown_table(summary, heads)
    with open(os.path.join(task_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    title = (f"task {a.task}: {len(a.seeds)} seeds; rounds {a.first_steps}+{a.round_steps}x{a.rounds - 1} steps, "
             f"offline {a.first_steps + (a.rounds - 1) * a.round_steps} steps")
    path = plot(summary, heads, os.path.join(task_dir, "frontier_rounds.png"), title)
    print("\n" + table + (f"\n\nplot: {path}" if path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
