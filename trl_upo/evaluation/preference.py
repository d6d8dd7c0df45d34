"""Preference metrics: DPO's implicit reward ``beta * (log pi(y|x) - log pi_ref(y|x))`` on held-out pairs, its
accuracy (ties counting half) and its margins."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..models import load_model, load_tokenizer, pad_token_id
from .batching import encode, eval_mode, model_device, pad_batch

logger = logging.getLogger(__name__)

#: How :func:`preference_metrics` computed its accuracy, by reference kind.
METRIC_NAMES = {
    "ref_model": "implicit-reward accuracy (reference: the given ref_model)",
    "adapter_disabled": "implicit-reward accuracy (reference: the policy with its PEFT adapter disabled)",
    "none": "policy log-prob accuracy (no reference: log pi(chosen) > log pi(rejected), not an implicit reward)",
}


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


def _tokenize_pair(tokenizer: Any, row: dict) -> tuple[list[int], list[int], list[int]]:
    """prompt ids, prompt+chosen ids, prompt+rejected ids; EOS appended to string completions (as in training)."""
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if isinstance(prompt, str) != isinstance(chosen, str) or isinstance(chosen, str) != isinstance(rejected, str):
        raise ValueError(
            "A pair mixes string and conversational fields; give prompt, chosen and rejected all as strings or all as "
            "message lists."
        )
    if isinstance(prompt, str):
        eos = tokenizer.eos_token or ""
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        return encode(tokenizer, prompt), encode(tokenizer, prompt + chosen), encode(tokenizer, prompt + rejected)
    prompt, chosen, rejected = list(prompt), list(chosen), list(rejected)
    return (
        encode(tokenizer, prompt, generation_prompt=True),
        encode(tokenizer, prompt + chosen),
        encode(tokenizer, prompt + rejected),
    )


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.no_grad()
def completion_logps(model: Any, sequences: Sequence[list[int]], starts: Sequence[int], pad_id: int,
                     batch_size: int = 16) -> torch.Tensor:
    """Summed log-probability of ``sequences[i][starts[i]:]`` given the tokens before it.

    Args:
        model: a causal LM.
        sequences: token ids of prompt + completion.
        starts: the index of each completion's first token.
        pad_id: the id used for right padding (masked out).
        batch_size: sequences per forward pass.

    Returns:
        ``(len(sequences),)`` float64 tensor.
    """
    device = model_device(model)
    with eval_mode(model):
        out = [_batch_logps(model, sequences[b : b + batch_size], starts[b : b + batch_size], pad_id, device)
               for b in range(0, len(sequences), batch_size)]
    return torch.cat(out)


def _batch_logps(model: Any, seqs: Sequence[list[int]], starts: Sequence[int], pad_id: int,
                 device: torch.device) -> torch.Tensor:
    ids, attn = pad_batch(seqs, pad_id, left=False)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, (s, st) in enumerate(zip(seqs, starts, strict=True)):
        mask[i, st : len(s)] = True
    logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits[:, :-1].float()
    target = ids[:, 1:].to(device)
    token_logps = logits.gather(-1, target[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (token_logps * mask[:, 1:].to(device)).sum(-1).double().cpu()


def _is_peft(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and bool(getattr(model, "peft_config", None))


def _reference_logps(
    model: Any, ref_model: Any, logps: Callable[[Any], torch.Tensor]
) -> tuple[str, torch.Tensor | None]:
    """The reference kind and its log-probabilities (``logps(model)`` computes them for one model)."""
    if ref_model is not None:
        return "ref_model", logps(load_model(ref_model))
    if _is_peft(model):
        with model.disable_adapter():
            return "adapter_disabled", logps(model)
    logger.warning(
        "preference_metrics: no ref_model and the policy is not a PEFT model, so there is no reference: "
        "reporting the policy log-prob accuracy (log pi(chosen) > log pi(rejected)), not DPO's implicit-reward "
        "accuracy. Pass ref_model=... (e.g. the SFT model) for the implicit reward."
    )
    return "none", None


def _accuracy(margins: torch.Tensor) -> float:
    """Share of positive margins, ties counting half."""
    return float(((margins > 0).double() + 0.5 * (margins == 0).double()).mean())


def preference_metrics(
    model: Any,
    tokenizer: Any,
    pairs: Any,
    *,
    ref_model: Any = None,
    beta: float = 0.1,
    batch_size: int = 16,
    return_margins: bool = False,
) -> dict:
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
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}.")
    rows = _pair_rows(pairs)
    model = load_model(model)
    tokenizer = load_tokenizer(model, tokenizer)
    pad_id = pad_token_id(tokenizer)
    seqs, starts = [], []
    for row in rows:
        p, pc, pr = _tokenize_pair(tokenizer, row)
        start = min(_common_prefix(p, pc), _common_prefix(p, pr))
        seqs += [pc, pr]
        starts += [start, start]

    def logps(m: Any) -> torch.Tensor:
        return completion_logps(m, seqs, starts, pad_id, batch_size)

    policy = logps(model)
    kind, ref = _reference_logps(model, ref_model, logps)
    rewards = beta * (policy - (torch.zeros_like(policy) if ref is None else ref))
    chosen, rejected = rewards[0::2], rewards[1::2]
    margins = chosen - rejected
    result = {
        "accuracy": _accuracy(margins),
        "margin_mean": float(margins.mean()),
        "margin_std": float(margins.std(unbiased=False)),
        "n": len(rows),
        "ties": int((margins == 0).sum()),
        "chosen_reward_mean": float(chosen.mean()),
        "rejected_reward_mean": float(rejected.mean()),
        "policy_logp_accuracy": _accuracy(policy[0::2] - policy[1::2]),
        "reference": kind,
        "metric": METRIC_NAMES[kind],
        "beta": beta,
    }
    if return_margins:
        result["margins"] = margins.tolist()
    return result
