"""What ``trl-upo eval`` writes and prints: the Markdown report, the console table (reference next to policy) and
the plots (``designer.png``, ``margins.png``), sized and labelled for a report.
"""

from __future__ import annotations

import math
import os
from typing import Any

#: Why there are no preference metrics, when the dataset has neither pairs nor unpaired rows.
PREFERENCE_SKIPPED = (
    "the dataset has neither `chosen` and `rejected` columns (preference pairs) nor `completion` and `label` columns "
    "(unpaired rows), so there is no held-out preference data to measure accuracy on. Give a preference dataset "
    "(prompt, chosen, rejected) or unpaired rows (prompt, completion, boolean label) for them."
)
#: Plot resolution (dots per inch) and the colours of the reference and the policy.
DPI = 150
#: The width of one head's panel in ``designer.png``, in inches.
PANEL_WIDTH = 4.2
COLORS = {"reference": "#8c8c8c", "policy": "#d62728"}


def model_label(path: Any, fallback: str) -> str:
    """A short name for a model in tables and plots: the last part of its path or Hub id."""
    if not path or not isinstance(path, str):
        return fallback
    return os.path.basename(os.path.normpath(path)) or path


def reference_label(result: dict) -> str:
    """The reference's name: its path, ``<policy> (adapter off)``, or None when there is none."""
    ref = result["reference"]
    if ref["kind"] == "adapter_disabled":
        return f"{model_label(result['model'], 'policy')} (adapter off)"
    return model_label(ref.get("path"), "reference")


def _spec(result: dict, name: str) -> dict:
    return next((h for h in result.get("heads") or [] if h.get("name") == name), {})


def interval(metric: dict) -> list[float] | None:
    """A head's 95% confidence interval of the mean: ``ci95`` as ``designer_metrics`` wrote it, or (an ``eval.json``
    from before it did) Student's t from the population ``std`` and ``n``, not clipped."""
    from trl_upo.evaluation.designer import mean_interval

    if "ci95" in metric:
        return metric["ci95"]
    n = metric.get("n") or 0
    sd = metric["std"] * math.sqrt(n / (n - 1)) if n > 1 else 0.0
    return mean_interval(metric["mean"], sd, n)


def display(result: dict, name: str, metric: dict) -> tuple[float, list[float] | None, str, bool]:
    """How one head's scores are shown: ``(mean, 95% confidence interval of the mean, axis label with unit, higher
    is better)``.

    A ``length`` head scores ``-length`` (``direction: shorter``) or ``-|length - target|``; it is shown as the
    length itself (or the distance to the target), in its unit, so that no bar shows a negative number of words.
    """
    spec = _spec(result, name)
    params = spec.get("params") or {}
    kind = metric.get("type") or spec.get("type")
    mean, ci, higher = metric["mean"], interval(metric), metric.get("higher_is_better", True)
    flipped = None if ci is None else [-ci[1], -ci[0]]
    if kind == "length":
        unit = params.get("unit", "words")
        if params.get("target") is not None:
            return -mean, flipped, f"distance to {params['target']:g} {unit}", False
        if params.get("direction", "shorter") == "shorter":
            return -mean, flipped, f"length ({unit})", not higher
        return mean, ci, f"length ({unit})", higher
    return mean, ci, f"{kind} head score" if kind else "head score", higher


def markdown_report(result: dict, plots: list[str]) -> str:
    """The Markdown report of one evaluation.

    Args:
        result: What :func:`run` returned.
        plots: The plot files written next to the report.

    Returns:
        The report.
    """
    from trl_upo.formats import prompt_text

    g = result["generation"]
    sampling = f"temperature {g['temperature']}, top-p {g['top_p']}" if g["do_sample"] else "greedy"
    lines = [
        f"# Evaluation of `{result['model']}`",
        "",
        f"Dataset `{result['dataset']['name']}`, split `{result['dataset']['split']}`, {result['dataset']['rows']} "
        f"rows{' (the first ones of the stream)' if result['dataset'].get('streaming') else ''}; reference: {result['reference']['kind']}"
        + (f" (`{result['reference']['path']}`)" if result["reference"]["path"] else "")
        + f". Generation: {g['num_prompts']} prompts x {g['num_samples']} samples, max {g['max_new_tokens']} new "
        f"tokens, {sampling}, seed {g['seed']}.",
        "",
    ]
    if result["designer"]:
        lines += ["## Designer metrics (raw head scores of generated responses)", ""]
        ref = result["designer_reference"]
        head = "| head | better | policy mean ± std [95% CI] |" + (
            " reference mean ± std [95% CI] | change |" if ref else "")
        lines += [head, "|---|---|---|" + ("---|---|" if ref else "")]
        for name, m in result["designer"].items():
            row = f"| {name} | {'higher' if m['higher_is_better'] else 'lower'} | {_summary(m)} |"
            if ref:
                r = ref[name]
                row += f" {_summary(r)} | {m['mean'] - r['mean']:+.4f} |"
            lines.append(row)
        lines += ["", "(95% CI: the confidence interval of the mean, Student's t, clipped to the head's range where it "
                  "is known.)", ""]
    pref = result["preference"]
    if pref:
        lines += [
            "## Preferences (held-out pairs)",
            "",
            f"- {pref['metric']}: **{pref['accuracy']:.4f}** on {pref['n']} pairs "
            f"(ties count half; {pref['ties']} ties)",
            f"- margin (beta {pref['beta']}): mean {pref['margin_mean']:.4f}, std {pref['margin_std']:.4f}",
            f"- policy log-prob accuracy: {pref['policy_logp_accuracy']:.4f}",
            "",
        ]
    elif result.get("unpaired"):
        lines += unpaired_section(result["unpaired"])
    else:
        lines += ["## Preferences", "", f"Skipped: {PREFERENCE_SKIPPED}", ""]
    if result["win_rate"]:
        w = result["win_rate"]
        lines += [
            "## Reward-model win rate against the reference",
            "",
            f"`{w['reward_model']}`: policy wins **{w['win_rate']:.4f}** of {w['n']} comparisons (ties count half); "
            f"mean reward {w['policy_reward_mean']:.4f} (policy) vs {w['reference_reward_mean']:.4f} (reference).",
            "",
        ]
    if plots:
        lines += ["## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots] + [""]
    lines += ["## Samples", "", "| prompt | policy | reference |", "|---|---|---|"]
    for s in result["samples"]:
        cells = [prompt_text(s["prompt"]), s["response"], s.get("reference", "")]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ")[:200] for c in cells) + " |")
    return "\n".join(lines) + "\n"


def unpaired_section(u: dict) -> list[str]:
    """The report's section on held-out unpaired rows (:func:`trl_upo.evaluation.unpaired_metrics`' result, NaN
    stored as None)."""
    return [
        "## Preferences (held-out unpaired rows)",
        "",
        f"{u['n_desirable']} desirable and {u['n_undesirable']} undesirable rows; {u['metric']}, beta {u['beta']}.",
        "",
        f"- accuracy (reward above 0 on desirable rows, below 0 on undesirable rows; ties count half): "
        f"**{_num(u['accuracy'])}**" + (" (needs a reference: without one every reward is negative)"
                                          if u["accuracy"] is None else ""),
        f"- ranking accuracy (desirable reward above undesirable reward, over all {u['n_desirable']} x "
        f"{u['n_undesirable']} combinations; ties count half): **{_num(u['ranking_accuracy'])}**",
        f"- mean reward: {_num(u['desirable_reward_mean'])} (desirable), {_num(u['undesirable_reward_mean'])} "
        f"(undesirable)",
        "",
    ]


def console_table(result: dict) -> str:
    """The console summary: each head's mean (reference, policy, change), preference accuracy and win rate."""
    ref_name = reference_label(result) if result["reference"]["kind"] != "none" else None
    pol_name = model_label(result["model"], "policy")
    rows: list[tuple[str, Any, Any, str]] = []
    for name, m in result["designer"].items():
        mean, _, label, higher = display(result, name, m)
        r = result["designer_reference"].get(name)
        rmean = display(result, name, r)[0] if r else None
        rows.append((f"{name}: {label}", rmean, mean, "higher is better" if higher else "lower is better"))
    pref = result["preference"]
    if pref:
        what = "pref. accuracy (implicit reward)" if pref.get("reference") != "none" else "pref. accuracy (log-prob)"
        rows.append((what, None, pref["accuracy"], f"{pref['n']} held-out pairs, ties count half"))
    u = result.get("unpaired")
    if u:
        kind = "implicit reward" if u["reference"] != "none" else "log-prob"
        rows.append((f"unpaired accuracy ({kind})", None, u["accuracy"],
                     f"{u['n_desirable']} desirable + {u['n_undesirable']} undesirable rows, ties count half"
                     if u["accuracy"] is not None else "needs a reference (--ref_model, or a PEFT adapter)"))
        rows.append((f"unpaired ranking accuracy ({kind})", None, u["ranking_accuracy"],
                     "desirable above undesirable, all combinations"))
    if result["win_rate"]:
        w = result["win_rate"]
        rows.append(("reward model", w["reference_reward_mean"], w["policy_reward_mean"],
                     f"policy wins {w['win_rate']:.3f} of {w['n']}"))
    if not rows:
        return ""
    width = max(len(r[0]) for r in rows) + 2
    cols = [ref_name or "reference", pol_name, "change"]
    cw = max(12, *(len(c) for c in cols)) + 2
    lines = [" " * width + "".join(f"{c:>{cw}}" for c in cols)]
    for label, ref, pol, note in rows:
        change = pol - ref if isinstance(ref, (int, float)) and isinstance(pol, (int, float)) else None
        cells = [_num(ref), _num(pol), _num(change, signed=True)]
        lines.append(f"{label:<{width}}" + "".join(f"{c:>{cw}}" for c in cells) + f"   {note}")
    return "\n".join(lines)


def _summary(metric: dict) -> str:
    ci = interval(metric)
    return f"{metric['mean']:.4f} ± {metric['std']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")


def _num(value: Any, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _bar_panel(ax, result: dict, name: str, metric: dict, ref_metric: dict | None) -> None:
    """One head: reference and policy bars, the 95% confidence interval of each mean as error bars, the value on
    each bar (inside it when it is tall enough, else beyond the error bar in dark text)."""
    from trl_upo.evaluation.plotting import label_bars, wrap_text

    mean, ci, label, higher = display(result, name, metric)
    bars = [(f"{model_label(result['model'], 'policy')}\n(policy)", mean, ci, COLORS["policy"])]
    if ref_metric is not None:
        rmean, rci, _, _ = display(result, name, ref_metric)
        bars.insert(0, (f"{reference_label(result)}\n(reference)", rmean, rci, COLORS["reference"]))
    xs = list(range(len(bars)))
    errors = [[b[1] - b[2][0] if b[2] else 0.0 for b in bars], [b[2][1] - b[1] if b[2] else 0.0 for b in bars]]
    ax.bar(xs, [b[1] for b in bars], yerr=errors, color=[b[3] for b in bars], capsize=6, width=0.6,
           error_kw={"elinewidth": 1.2})
    ax.axhline(0.0, color="black", lw=0.6)
    label_bars(ax, xs, [b[1] for b in bars], [b[2] for b in bars])
    ax.set_xticks(xs, [wrap_text(b[0], PANEL_WIDTH / len(bars), 9) for b in bars], fontsize=9)
    ax.set_ylabel(label, fontsize=10)
    ax.set_title(wrap_text(f"{name}\n({'↑ higher' if higher else '↓ lower'} is better)", PANEL_WIDTH, 11),
                 fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.set_xlim(-0.6, len(bars) - 0.4)


def draw_plots(result: dict, out_dir: str, plt: Any) -> list[str]:
    """Draw ``designer.png`` (a panel per head: reference and policy means with their 95% confidence intervals)
    and ``margins.png`` (the histogram of the preference margins on held-out pairs), at :data:`DPI` dots per inch.

    Args:
        result: What ``trl_upo.cli.eval.run`` returned.
        out_dir: The directory to write to.
        plt: ``matplotlib.pyplot`` (see :func:`trl_upo.evaluation.require_matplotlib`).

    Returns:
        The file names written.
    """
    from trl_upo.evaluation.plotting import wrap_text

    written = []
    panels = [(n, m, result["designer_reference"].get(n)) for n, m in result["designer"].items()]
    if panels:
        n = result["generation"]["num_prompts"] * result["generation"]["num_samples"]
        width = PANEL_WIDTH * len(panels) + 0.6
        fig, axes = plt.subplots(1, len(panels), figsize=(width, 4.6), dpi=DPI, squeeze=False, layout="constrained")
        for ax, (name, m, r) in zip(axes[0], panels, strict=True):
            _bar_panel(ax, result, name, m, r)
        title = (f"Designer metrics on {n} sampled responses\nerror bars: 95% confidence interval of the mean "
                 f"(Student's t), within the head's range")
        fig.suptitle(wrap_text(title, width - 0.2, 10), fontsize=10)
        fig.savefig(os.path.join(out_dir, "designer.png"))
        plt.close(fig)
        written.append("designer.png")
    if result["preference"].get("margins"):
        _margins_plot(result, out_dir, plt)
        written.append("margins.png")
    return written


def _margins_plot(result: dict, out_dir: str, plt: Any) -> None:
    """``margins.png``: the histogram of the preference margins on held-out pairs, with a title wrapped to fit."""
    from trl_upo.evaluation.plotting import wrap_text

    pref = result["preference"]
    implicit = pref.get("reference") != "none"
    width = 6.4
    fig, ax = plt.subplots(figsize=(width, 4.2), dpi=DPI, layout="constrained")
    ax.hist(pref["margins"], bins=min(30, max(5, len(pref["margins"]) // 2)), color="#1f77b4", alpha=0.85)
    ax.axvline(0.0, color="black", lw=1.0)
    ax.set_xlabel(wrap_text(
        "implicit-reward margin  β·[log-ratio(chosen) − log-ratio(rejected)]  (nats)" if implicit
        else "log π(chosen) − log π(rejected)  (nats; no reference)", width - 0.4, 10), fontsize=10)
    ax.set_ylabel("held-out pairs", fontsize=10)
    ax.yaxis.get_major_locator().set_params(integer=True)  # counts of pairs: whole numbers
    ax.text(0.98, 0.95, "→ chosen preferred", transform=ax.transAxes, ha="right", va="top", fontsize=9)
    against = f" vs {reference_label(result)}" if result["reference"]["kind"] != "none" else ""
    title = (f"{model_label(result['model'], 'policy')}{against}\npreference accuracy {pref['accuracy']:.3f} on "
             f"{pref['n']} held-out pairs (higher is better)")
    ax.set_title(wrap_text(title, width - 0.4, 10), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(os.path.join(out_dir, "margins.png"))
    plt.close(fig)
