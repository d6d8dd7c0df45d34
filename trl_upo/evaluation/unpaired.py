"""Metrics on held-out unpaired data (KTO's kind: a prompt, a completion and a desirable/undesirable label).

The implicit reward is KTO's (and DPO's) ``r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))``. Two accuracies:

- ``accuracy``: the share of rows whose reward has the label's sign (desirable above 0, undesirable below; ties
  count half), the reading KTO's loss trains towards (its reference point is the KL estimate, near 0);
- ``ranking_accuracy``: the share of (desirable, undesirable) row combinations whose desirable reward is the higher
  (ties half): the unpaired analogue of the preference accuracy, independent of the reference point. On rows split
  from pairs it counts every combination, not only the original pairs.
"""

from __future__ import annotations

from typing import Any

import torch

from .implicit import METRIC_NAMES, common_prefix, implicit_rewards, prompt_and_sequence, tie_half_accuracy


def unpaired_rows(rows: Any) -> list[dict]:
    """Rows with ``prompt``, ``completion`` and a boolean ``label``; preference pairs (``chosen``/``rejected``) are
    split into a desirable and an undesirable row, as ``KTOTrainer`` splits them.

    Raises:
        ValueError: no rows, missing columns, or a label that is not a bool.
    """
    if hasattr(rows, "column_names"):
        rows = rows.to_list()
    rows = [dict(r) for r in rows]
    if not rows:
        raise ValueError("unpaired_metrics: no rows given.")
    if "completion" not in rows[0] and "chosen" in rows[0] and "rejected" in rows[0]:
        from trl.data_utils import extract_prompt

        rows = [r if "prompt" in r else extract_prompt(r) for r in rows]
        rows = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in rows
                for k in ("chosen", "rejected")]
    for i, r in enumerate(rows):
        missing = [c for c in ("prompt", "completion", "label") if c not in r]
        if missing:
            raise ValueError(
                f"unpaired_metrics needs rows with 'prompt', 'completion' and a boolean 'label' (or preference pairs "
                f"with 'chosen' and 'rejected'); row {i} has no {missing}."
            )
        if not isinstance(r["label"], bool):
            raise ValueError(
                f"unpaired_metrics: row {i} has label {r['label']!r}; labels must be True (desirable) or False "
                f"(undesirable)."
            )
    return rows


def _tokenize(tokenizer: Any, row: dict) -> list[tuple[list[int], int]]:
    """prompt+completion ids and the completion's first index; EOS appended to a string completion (as KTOTrainer
    does)."""
    prompt, sequence = prompt_and_sequence(tokenizer, row["prompt"], row["completion"])
    return [(sequence, common_prefix(prompt, sequence))]


def _ranking_accuracy(desirable: torch.Tensor, undesirable: torch.Tensor) -> float:
    """Share of (desirable, undesirable) combinations with the desirable reward higher, ties counting half."""
    if desirable.numel() == 0 or undesirable.numel() == 0:
        return float("nan")
    diff = desirable[:, None] - undesirable[None, :]
    return tie_half_accuracy(diff.reshape(-1))


def unpaired_metrics(model: Any, tokenizer: Any, rows: Any, *, ref_model: Any = None, beta: float = 0.1,
                     batch_size: int = 16) -> dict:
    """Implicit-reward accuracies of a policy on held-out unpaired rows (see the module docstring).

    Args:
        model: the policy (loaded, or a path, see :func:`trl_upo.models.load_model`).
        tokenizer: its tokenizer (None: loaded from where the model came from).
        rows: a ``datasets.Dataset`` or list of dicts with ``prompt``, ``completion`` and boolean ``label``
            (strings or message lists); preference pairs are split (:func:`unpaired_rows`).
        ref_model: the reference (loaded or a path); None: the adapter-disabled policy for a PEFT model, else no
            reference (the log-probabilities alone; named in ``"metric"``).
        beta: KTO's beta (scales the rewards, not the accuracies).
        batch_size: sequences per forward pass.

    Returns:
        ``{"accuracy", "ranking_accuracy", "desirable_reward_mean", "undesirable_reward_mean", "n_desirable",
        "n_undesirable", "reference", "metric", "beta"}``; ``accuracy`` is None without a reference (every reward
        is then negative, so the sign says nothing).
    """
    rows = unpaired_rows(rows)
    kind, _, rewards = implicit_rewards(model, tokenizer, ref_model, rows, _tokenize, beta=beta,
                                        batch_size=batch_size, caller="unpaired_metrics")
    labels = torch.tensor([r["label"] for r in rows])
    signed = torch.where(labels, rewards, -rewards)
    good, bad = rewards[labels], rewards[~labels]
    return {
        # Without a reference every reward is beta * log pi < 0: the sign accuracy would only count the undesirable
        # rows, so it is not reported (None); the ranking accuracy still compares the two kinds.
        "accuracy": tie_half_accuracy(signed) if kind != "none" else None,
        "ranking_accuracy": _ranking_accuracy(good, bad),
        "desirable_reward_mean": float(good.mean()) if good.numel() else float("nan"),
        "undesirable_reward_mean": float(bad.mean()) if bad.numel() else float("nan"),
        "n_desirable": int(labels.sum()),
        "n_undesirable": int((~labels).sum()),
        "reference": kind,
        "metric": METRIC_NAMES[kind].replace("accuracy", "accuracies", 1),
        "beta": beta,
    }
