"""The UPO section of the model card: what the model was tuned for.

TRL writes the card (``README.md`` in the output directory) through the trainer's ``create_model_card``; this module
extends that card, it does not replace it. :func:`upo_section` renders the section from what the run recorded:

- the objective: ``L = L_pref + upo_alpha * L_aux``, the combine mode, the normalisation and the other ``upo_*``
  settings (``upo_state.json``'s ``settings``);
- each reward head with its type, parameters, weight, direction and normalisation statistics, and its score summary
  on the train split (:func:`train_score_summary`: the mean, and the agreement with the labels: the share of pairs
  where the head prefers the chosen response, or for unpaired rows the correlation of the score with the label);
- the before/after table of ``trl-upo train``'s ``report_before_after``, when the command measured one;
- the citation.

:func:`add_upo_section` puts the section into an existing card, before TRL's "Citations" section, between markers,
so writing it again (at every checkpoint, at the end, on ``push_to_hub``) replaces it instead of adding another.
:func:`save_card` does it all for a trainer: TRL's card, then the UPO section.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: The markers around the UPO section in ``README.md``.
BEGIN, END = "<!-- trl-upo:section:begin -->", "<!-- trl-upo:section:end -->"
#: The card's file name (TRL's).
CARD_FILE = "README.md"
#: How the combine modes are described on the card.
COMBINE = {
    "awr": "advantage-weighted log-likelihood (UPO): each response's log-likelihood weighted by exp(A / tau) of its "
    "designer reward's advantage",
    "margin": "margin (MODPO-style): the designer reward inside the sigmoid DPO logit",
}
#: The settings listed under the objective, with their labels.
SETTINGS = (
    ("upo_temperature", "temperature tau"),
    ("upo_weight_cap", "weight cap"),
    ("upo_normalize_weights", "weights normalised to mean 1"),
    ("upo_baseline", "advantage baseline"),
    ("upo_applies_to", "applies to"),
    ("upo_loglik", "log-likelihood"),
)
UPO_CITATION = """@article{badrinath2025unified,
    title        = {{Unified Preference Optimization: Language Model Alignment Beyond the Preference Frontier}},
    author       = {Anirudhan Badrinath and Prabhat Agarwal and Jiajing Xu},
    year         = 2025,
    journal      = {Transactions on Machine Learning Research},
    eprint       = {2405.17956},
    archivePrefix= {arXiv},
}"""


def train_score_summary(dataset: Any, heads: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each head's scores on a scored train split: how they sit and how they relate to the labels.

    Args:
        dataset: The train split as the trainer holds it, with the score columns (``trl_upo.scoring.score_column``).
        heads: The heads, as in ``upo_state.json`` (``name``, ``higher_is_better``).

    Returns:
        Per head name: ``mean`` (raw scores, all responses), ``n`` (rows); on pairs ``agree`` (the share of pairs,
        among those the head does not tie, where it prefers the chosen response, its direction taken into account)
        and ``ties``; on unpaired rows with a ``label`` column, ``label_corr`` (the correlation of the signed score
        with the label). A head whose columns the dataset lacks is left out.
    """
    from trl_upo.scoring import score_column

    columns = set(getattr(dataset, "column_names", None) or [])
    out: dict[str, dict[str, float]] = {}
    for head in heads:
        name, sign = head["name"], 1.0 if head.get("higher_is_better", True) else -1.0
        paired = {score_column(name, "chosen"), score_column(name, "rejected")} <= columns
        if paired:
            chosen = np.asarray(dataset[score_column(name, "chosen")], dtype=np.float64)
            rejected = np.asarray(dataset[score_column(name, "rejected")], dtype=np.float64)
            diff = (chosen - rejected) * sign
            decided = diff != 0
            out[name] = {"mean": float(np.concatenate([chosen, rejected]).mean()), "n": int(len(chosen)),
                         "agree": float((diff[decided] > 0).mean()) if decided.any() else float("nan"),
                         "ties": float((~decided).mean())}
        elif score_column(name, "completion") in columns:
            scores = np.asarray(dataset[score_column(name, "completion")], dtype=np.float64)
            s = {"mean": float(scores.mean()), "n": int(len(scores))}
            if "label" in columns:
                labels = np.asarray(dataset["label"], dtype=np.float64)
                ok = scores.std() > 0 and labels.std() > 0
                s["label_corr"] = float(np.corrcoef(scores * sign, labels)[0, 1]) if ok else float("nan")
            out[name] = s
    return out


def _num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    return f"{value:.4g}"


def _cell(text: Any) -> str:
    """Text safe in a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _params(params: dict[str, Any] | None) -> str:
    if not params:
        return "(defaults)"
    return ", ".join(f"`{k}={_cell(v if isinstance(v, str) else repr(v))}`" for k, v in params.items())


def _summary_cells(summary: dict[str, float] | None) -> tuple[str, str]:
    if not summary:
        return "not measured", "not measured"
    if "agree" in summary:
        agree = (f"{summary['agree']:.3f} of untied pairs prefer chosen "
                 f"({summary['n']} pairs, {summary['ties']:.3f} tied)")
    elif "label_corr" in summary:
        agree = f"correlation with the label {summary['label_corr']:.3f} ({summary['n']} rows)"
    else:
        agree = "no labels"
    return _num(summary["mean"]), agree


def _objective(settings: dict[str, Any]) -> list[str]:
    alpha, combine = settings.get("upo_alpha"), settings.get("upo_combine") or "awr"
    lines = [
        "### Objective",
        "",
        f"`L = L_pref + upo_alpha * L_aux` with **`upo_alpha = {_num(alpha)}`**: TRL's preference loss plus a term "
        "that moves the policy toward the designer objectives (the reward heads below).",
        "",
        f"- combine mode: `{combine}`, {COMBINE.get(combine, combine)}",
        f"- normalisation: `{settings.get('upo_normalization')}` per head (unless the head sets its own), fitted on "
        "the train split",
    ]
    lines += [f"- {label}: `{_num(settings[key])}`" for key, label in SETTINGS if settings.get(key) is not None]
    return lines


def _heads_table(state: dict[str, Any], summary: dict[str, dict[str, float]] | None) -> list[str]:
    default_mode = (state.get("settings") or {}).get("upo_normalization")
    lines = [
        "### Reward heads",
        "",
        "| head | type | parameters | weight | direction | normalisation | train mean | agreement with the labels |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    stats = state.get("statistics") or [{}] * len(state["heads"])
    for head, st in zip(state["heads"], stats, strict=True):
        mode = (st or {}).get("mode") or head.get("normalize") or default_mode
        fitted = f" (mean {_num(st['mean'])}, std {_num(st['std'])})" if st and "mean" in st and "std" in st else ""
        direction = "higher is better" if head.get("higher_is_better", True) else "lower is better"
        mean, agree = _summary_cells((summary or {}).get(head["name"]))
        cells = [f"`{head['name']}`", f"`{head.get('type') or head['name']}`", _params(head.get("params")),
                 _num(head.get("weight", 1.0)), direction, f"{mode}{fitted}", mean, agree]
        lines.append("| " + " | ".join(_cell(c) if i not in (0, 1, 2) else c for i, c in enumerate(cells)) + " |")
    lines += [
        "",
        "Agreement: on pairs, the share of train pairs (among those the head does not tie) where the head prefers the "
        "chosen response; 0.5 means the objective is independent of the preference labels, below 0.5 it conflicts "
        "with them. On unpaired rows, the correlation of the head's score with the desirable label.",
    ]
    return lines


def _report_table(report: dict[str, Any]) -> list[str]:
    before, after = report["before"], report["after"]
    gen = after.get("generation") or {}
    lines = [
        "### Before and after training",
        "",
        f"Measured by `trl-upo train` (`report_before_after`) on {gen.get('num_prompts', '?')} held-out prompts x "
        f"{gen.get('num_samples', '?')} sampled answers: each head's mean score (its own scale), and the held-out "
        "preference accuracy when the data has pairs.",
        "",
        "| metric | before | after | change |",
        "| --- | --- | --- | --- |",
    ]
    rows = [(f"`{h}` (mean)", before["designer"].get(h, {}).get("mean"), r["mean"])
            for h, r in after["designer"].items()]
    if after.get("preference"):
        for key, label in (("accuracy", "preference accuracy"), ("policy_logp_accuracy", "log-prob accuracy")):
            rows.append((label, (before.get("preference") or {}).get(key), after["preference"].get(key)))
    for label, b, a in rows:
        change = _num(a - b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else "n/a"
        if change not in ("n/a",) and not change.startswith("-"):
            change = "+" + change
        lines.append(f"| {label} | {_num(b)} | {_num(a)} | {change} |")
    return lines


def upo_section(state: dict[str, Any], summary: dict[str, dict[str, float]] | None = None,
                report: dict[str, Any] | None = None, *, cite: bool = True) -> str:
    """The UPO section of the model card, as Markdown (between :data:`BEGIN` and :data:`END`).

    Args:
        state: The run's UPO state (``trainer.upo_state()``, or ``upo_state.json`` read back).
        summary: The heads' score summary on the train split (:func:`train_score_summary`); None: not shown.
        report: The before/after report (``report.json`` of ``trl-upo train``: ``{"before": ..., "after": ...}``).
        cite: Include UPO's citation (off when the card already holds it).

    Returns:
        The section's Markdown.
    """
    settings = state.get("settings") or {}
    version = state.get("trl_upo_version")
    lines = [
        BEGIN,
        "## UPO: what this model was tuned for",
        "",
        f"Trained with [trl-upo](https://github.com/trl-upo/trl-upo){f' {version}' if version else ''}: Unified "
        "Preference Optimization, preference learning from the data's labels plus the designer objectives below.",
        "",
        *_objective(settings),
        "",
        *_heads_table(state, summary),
    ]
    if report and report.get("before") and report.get("after"):
        lines += ["", *_report_table(report)]
    lines += ["", "### Citation", ""]
    if cite:
        lines += ["Cite UPO as:", "", "```bibtex", UPO_CITATION, "```"]
    else:
        lines += ["Cite UPO as given under Citations below."]
    return "\n".join([*lines, END, ""])


#: What TRL's card template says of a model trained from a local directory (it links the Hub page of "None").
_NONE_BASE = "a fine-tuned version of [None](https://huggingface.co/None)"


def add_upo_section(directory: str | os.PathLike, state: dict[str, Any],
                    summary: dict[str, dict[str, float]] | None = None, report: dict[str, Any] | None = None,
                    base_model: str | None = None) -> str:
    """Put the UPO section into ``directory/README.md`` (the card TRL wrote), replacing an earlier UPO section.

    The section goes before TRL's ``## Citations`` section (at the end when there is none). With no card there, a
    card holding only the section is written.

    Args:
        directory: The output directory (or checkpoint) holding the card.
        state: As in :func:`upo_section`.
        summary: As in :func:`upo_section`.
        report: As in :func:`upo_section`.
        base_model: The model trained from (``config._name_or_path``). TRL's card links no base model for a local
            directory and says "a fine-tuned version of [None](...)": that phrase then names the directory instead.

    Returns:
        The card's path.
    """
    path = Path(directory) / CARD_FILE
    text = path.read_text(encoding="utf-8") if path.exists() else "# Model card\n"
    if base_model and _NONE_BASE in text:
        text = text.replace(_NONE_BASE, f"a fine-tuned version of the local model `{Path(base_model).name}`")
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + text[text.index(END) + len(END):].lstrip("\n")
    cite = "badrinath2025unified" not in text
    section = upo_section(state, summary, report, cite=cite)
    at = text.find("\n## Citations")
    text = text.rstrip("\n") + "\n\n" + section if at < 0 else text[: at + 1] + section + "\n" + text[at + 1:]
    os.makedirs(directory, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def write_upo_section(trainer: Any, directory: str | os.PathLike | None = None) -> str | None:
    """Add the UPO section of ``trainer`` to the card in ``directory`` (default ``trainer.args.output_dir``): its
    state, its heads' score summary on its train split, and the before/after report kept in
    ``trainer.upo_report`` (set by :func:`save_card`), if any. What a trainer's ``create_model_card`` calls after
    TRL's; nothing for a trainer without reward heads or on other processes.

    Returns:
        The card's path, or None when nothing was written.
    """
    if not trainer.is_world_process_zero():
        return None
    state = trainer.upo_state()
    if not state.get("heads"):
        return None
    from datasets import Dataset

    dataset = getattr(trainer, "train_dataset", None)
    # A stream is not read again for a summary: its card has none. A map-style split's summary is computed once per
    # split and heads (every checkpoint writes the card), keyed on the dataset's fingerprint.
    summary = None
    if isinstance(dataset, Dataset):
        key = (dataset._fingerprint, tuple((h["name"], h.get("higher_is_better", True)) for h in state["heads"]))
        cached = getattr(trainer, "_upo_card_summary", None)
        if cached is None or cached[0] != key:
            cached = (key, train_score_summary(dataset, state["heads"]))
            trainer._upo_card_summary = cached
        summary = cached[1]
    base = getattr(getattr(getattr(trainer, "model", None), "config", None), "_name_or_path", None)
    return add_upo_section(directory or trainer.args.output_dir, state, summary, getattr(trainer, "upo_report", None),
                           base_model=base)


def save_card(trainer: Any, output_dir: str | None = None, report: dict[str, Any] | None = None,
              dataset_name: str | None = None) -> str | None:
    """Write the model card of a UPO trainer: TRL's card (``trainer.create_model_card``), then the UPO section
    (:func:`write_upo_section`; written again if the trainer's ``create_model_card`` already did, not twice).

    TRL writes its card to ``args.output_dir``; for another ``output_dir`` the card is copied there. Only the main
    process writes.

    Args:
        trainer: A ``UPOTrainer`` or ``UPOKTOTrainer`` (anything with ``create_model_card`` and ``upo_state``).
        output_dir: Where the card goes (default ``trainer.args.output_dir``).
        report: The before/after report, when the command measured one; kept as ``trainer.upo_report`` so that a
            later ``push_to_hub`` (which writes the card again) keeps it.
        dataset_name: The Hub dataset the card links to (a local path or ``upo://`` name is not linked).

    Returns:
        The card's path, or None on other processes.
    """
    if report is not None:
        trainer.upo_report = report
    if not trainer.is_world_process_zero():
        return None
    args = trainer.args
    target = output_dir or args.output_dir
    name = (args.hub_model_id or "").split("/")[-1] or Path(target).resolve().name
    linked = dataset_name and "://" not in dataset_name and not os.path.exists(dataset_name)
    trainer.create_model_card(model_name=name, dataset_name=dataset_name if linked else None)
    write_upo_section(trainer, args.output_dir)
    written = Path(args.output_dir) / CARD_FILE
    if Path(target).resolve() != Path(args.output_dir).resolve() and written.exists():
        os.makedirs(target, exist_ok=True)
        shutil.copyfile(written, Path(target) / CARD_FILE)
    return str(Path(target) / CARD_FILE)
