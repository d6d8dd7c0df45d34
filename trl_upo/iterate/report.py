"""The rounds' summary: a console table (one line per round and method) and the frontier plot (each designer metric
against held-out preference accuracy, one point per round and method, a line joining a method's rounds)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

PLOT_FILE = "frontier_rounds.png"
SUMMARY_FILE = "rounds.json"


def round_points(reports: list[dict], include_start: bool = True) -> list[dict[str, Any]]:
    """``[{round, accuracy, <head>: mean, generated_tokens, train_steps}]``: round 0 is the starting policy (round
    1's "before"), then each round's "after". ``accuracy`` is the held-out implicit-reward accuracy (``nan`` without
    held-out pairs)."""
    points = []
    if include_start and reports:
        points.append(_point(0, reports[0]["before"], {"generated_tokens": 0, "train_steps": 0}))
    for r in reports:
        points.append(_point(r["round"], r["after"], r["compute"]))
    return points


def _point(k: int, result: dict, compute: dict) -> dict[str, Any]:
    pref = result.get("preference") or {}
    return {"round": k, "accuracy": pref.get("accuracy", float("nan")),
            **{h: m["mean"] for h, m in result["designer"].items()},
            "generated_tokens": compute["generated_tokens"], "train_steps": compute["train_steps"]}


def console_table(methods: dict[str, list[dict]]) -> str:
    """One line per method and round: preference accuracy, each designer metric, cumulative compute."""
    rows = [(m, p) for m, reports in methods.items() for p in round_points(reports)]
    if not rows:
        return ""
    heads = [k for k in rows[0][1] if k not in ("round", "accuracy", "generated_tokens", "train_steps")]
    width = max(8, *(len(m) for m, _ in rows))
    cols = ["round", "pref. acc", *heads, "gen. tokens", "train steps"]
    lines = [f"{'method':<{width}}" + "".join(f"{c:>14}" for c in cols)]
    for m, p in rows:
        cells = [f"{p['round']:>14d}", f"{p['accuracy']:>14.3f}", *(f"{p.get(h, float('nan')):>14.3f}" for h in heads),
                 f"{p['generated_tokens']:>14d}", f"{p['train_steps']:>14d}"]
        lines.append(f"{m:<{width}}" + "".join(cells))
    return "\n".join(lines)


def plot_rounds(methods: dict[str, list[dict]], path: str, plt: Any, heads: list[str] | None = None,
                title: str = "") -> str:
    """Write one figure (a panel per designer metric) of metric against preference accuracy, one point per round
    and method (labelled r0 = start, r1, r2, ...); return ``path``."""
    points = {m: round_points(r) for m, r in methods.items() if r}
    first = next(iter(points.values()))
    heads = heads or [k for k in first[0] if k not in ("round", "accuracy", "generated_tokens", "train_steps")]
    fig, axes = plt.subplots(1, len(heads), figsize=(5.2 * len(heads), 4.2), dpi=80, squeeze=False)
    for ax, head in zip(axes[0], heads, strict=True):
        for method, pts in points.items():
            xs, ys = [p["accuracy"] for p in pts], [p.get(head, float("nan")) for p in pts]
            ax.plot(xs, ys, marker="o", ms=4, lw=1, label=method)
            for p, x, y in zip(pts, xs, ys, strict=True):
                ax.annotate(f"r{p['round']}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("held-out implicit-reward accuracy")
        ax.set_ylabel(f"{head} (mean on sampled answers)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def optional_pyplot(prog: str = "trl-upo iterate") -> Any:
    """``matplotlib.pyplot``, or None with a warning on stderr (the plot is skipped, everything else is written)."""
    from ..evaluation import require_matplotlib

    try:
        return require_matplotlib()
    except ImportError as e:
        print(f"{prog}: warning: {e} The frontier plot is skipped.", file=sys.stderr)
        return None


def finish_run(output_dir: str, reports: list[dict], log=print) -> None:
    """Write ``rounds.json`` (every round's points), print the console table and write the plot."""
    method = os.path.basename(os.path.normpath(output_dir)) or "iterate"
    with open(os.path.join(output_dir, SUMMARY_FILE), "w") as f:
        json.dump({"method": method, "points": round_points(reports)}, f, indent=2)
    log("\n" + console_table({method: reports}))
    plt = optional_pyplot()
    if plt is not None:
        path = plot_rounds({method: reports}, os.path.join(output_dir, PLOT_FILE), plt)
        log(f"iterate: frontier plot {path}")
