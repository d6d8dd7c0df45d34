"""Preference metrics: DPO's implicit reward ``beta * (log pi(y|x) - log pi_ref(y|x))`` on held-out pairs, its
accuracy (ties counting half) and its margins."""

from __future__ import annotations

from typing import Any

from .implicit import (
    METRIC_NAMES,
    common_prefix,
    completion_logps,
    implicit_rewards,
    prompt_and_sequence,
    tie_half_accuracy,
)

__all__ = ["METRIC_NAMES", "completion_logps", "preference_metrics"]


def _pair_rows(pairs: Any) -> list[dict]:
    """Pairs as a list of dicts with prompt/chosen/rejected (an implicit prompt is extracted as DPOTrainer does)."""
    if hasattr(pairs, "column_names"):
        cols = set(pairs.column_names)
        rows = pairs.to_list() if hasattr(pairs, "to_list") else list(pairs)
    else:
        rows = [dict(r) for r in pairs]
        cols = set(rows[0]) if rows else set()
    if not rows:
        raise ValueError("preference_metrics: no pairs given.")
    missing = [c for c in ("chosen", "rejected") if c not in cols]
    if missing:
        raise ValueError(
            f"preference_metrics needs pairs with 'chosen' and 'rejected' (and 'prompt', or a prompt shared by both); "
            f"missing {missing}. Columns: {sorted(cols)}."
        )
    if "prompt" not in cols:
        from trl.data_utils import extract_prompt

        rows = [extract_prompt(r) for r in rows]
    return rows


def _tokenize_pair(tokenizer: Any, row: dict) -> list[tuple[list[int], int]]:
    """prompt+chosen and prompt+rejected ids, each with the index where the completions start (the prompt's tokens
    both share)."""
    if isinstance(row["chosen"], str) != isinstance(row["rejected"], str):
        raise ValueError(
            "A pair mixes string and conversational fields; give prompt, chosen and rejected all as strings or all as "
            "message lists."
        )
    prompt, chosen = prompt_and_sequence(tokenizer, row["prompt"], row["chosen"])
    _, rejected = prompt_and_sequence(tokenizer, row["prompt"], row["rejected"])
    start = min(common_prefix(prompt, chosen), common_prefix(prompt, rejected))
    return [(chosen, start), (rejected, start)]


def preference_metrics(model: Any, tokenizer: Any, pairs: Any, *, ref_model: Any = None, beta: float = 0.1,
                       batch_size: int = 16, return_margins: bool = False) -> dict:
    """Implicit-reward accuracy and margins of a policy on held-out preference pairs.

    The implicit reward of DPO is ``r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))`` (completion tokens summed,
    EOS included for string data, tokenised as ``DPOTrainer`` does). Accuracy is the share of pairs with
    ``r(x, y_w) > r(x, y_l)``, ties counting half (so a policy equal to its reference scores 0.5, not 0).

    The reference is ``ref_model`` when given; else, for a PEFT model, the same model with its adapter disabled (as
    in training); else there is none, and the metric is the policy log-prob accuracy
    (``log pi(y_w|x) > log pi(y_l|x)``), which the result names in ``"metric"`` and a warning repeats.

    Args:
        model: the policy (loaded, or a path, see :func:`trl_upo.models.load_model`).
        tokenizer: its tokenizer (None: loaded from where the model came from).
        pairs: a ``datasets.Dataset`` or a list of dicts with ``prompt``, ``chosen``, ``rejected`` (strings, or
            message lists for conversational data; without ``prompt``, the shared prefix is the prompt).
        ref_model: the reference model (loaded or a path), or None.
        beta: DPO's beta (scales rewards and margins, not the accuracy).
        batch_size: sequences per forward pass.
        return_margins: also return every pair's margin ``r(x, y_w) - r(x, y_l)`` under ``"margins"``.

    Returns:
        ``{"accuracy", "margin_mean", "margin_std", "n", "ties", "chosen_reward_mean", "rejected_reward_mean",
        "policy_logp_accuracy", "reference", "metric", "beta"}``; ``reference`` is ``"ref_model"``,
        ``"adapter_disabled"`` or ``"none"``.
    """
    rows = _pair_rows(pairs)
    kind, policy, rewards = implicit_rewards(model, tokenizer, ref_model, rows, _tokenize_pair, beta=beta,
                                             batch_size=batch_size, caller="preference_metrics")
    chosen, rejected = rewards[0::2], rewards[1::2]
    margins = chosen - rejected
    result = {
        "accuracy": tie_half_accuracy(margins),
        "margin_mean": float(margins.mean()),
        "margin_std": float(margins.std(unbiased=False)),
        "n": len(rows),
        "ties": int((margins == 0).sum()),
        "chosen_reward_mean": float(chosen.mean()),
        "rejected_reward_mean": float(rejected.mean()),
        "policy_logp_accuracy": tie_half_accuracy(policy[0::2] - policy[1::2]),
        "reference": kind,
        "metric": METRIC_NAMES[kind],
        "beta": beta,
    }
    if return_margins:
        result["margins"] = margins.tolist()
    return result
