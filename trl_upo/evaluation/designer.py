"""Designer metrics: the raw scores reward heads give a policy's generated responses, with no normalisation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..formats import as_completion, is_conversational


def text_head_specs(heads: Sequence[dict] | str | None) -> list:
    """Parse head specs and check that every head scores response text, before any model is loaded.

    Args:
        heads: head spec dicts (or a JSON string of a list of them), as ``UPOConfig.reward_heads`` takes them.

    Returns:
        The parsed :class:`~trl_upo.heads.HeadSpec` list.

    Raises:
        ValueError: on an invalid spec (unknown head or key, with a suggestion), or a head that reads dataset columns
            instead of text (``column``): generated responses have no such columns.
    """
    from ..heads import parse_head_specs, resolve_head_class

    specs = parse_head_specs(heads)
    for spec in specs:
        if not resolve_head_class(spec.type).needs_text:
            raise ValueError(
                f"Reward head {spec.name!r} ({spec.type}) reads dataset columns, not response text, so it cannot score "
                f"generated responses. Evaluate with heads that score text (length, lexicon, readability, function, "
                f"classifier, reward_model, similarity)."
            )
    return specs


def designer_metrics(
    prompts: Sequence[Any],
    responses: Sequence[Sequence[str]],
    heads: Sequence[dict] | str | None,
    *,
    tokenizer: Any = None,
    return_scores: bool = False,
) -> dict:
    """Raw reward-head scores of generated responses (no normalisation), per head.

    Args:
        prompts: the prompts, as given to :func:`~trl_upo.evaluation.generate_responses`.
        responses: ``responses[i]`` lists the responses to ``prompts[i]``.
        heads: head spec dicts as ``UPOConfig.reward_heads`` takes them (or a JSON string of a list of them).
        tokenizer: passed to the heads (the ``length`` head with ``unit="tokens"`` and the ``function`` head use it).
        return_scores: also return every score, under ``"scores"`` in each head's entry.

    Returns:
        ``{head_name: {"mean", "std", "n", "higher_is_better", "type"}}``: ``std`` is the population standard
        deviation over all responses; ``higher_is_better`` is copied from the spec (a cost head says False: its raw
        score is reported as the head returns it, so lower is better then).

    Raises:
        ValueError: on mismatched lengths, a head that reads dataset columns instead of text (``column``), or a
            non-finite score (naming the head and the response).
    """
    from ..heads import build_head
    from ..scoring import call_head, check_finite

    specs = text_head_specs(heads)
    if len(prompts) != len(responses):
        raise ValueError(f"designer_metrics: {len(prompts)} prompts but {len(responses)} response lists.")
    flat_prompts = [p for p, rs in zip(prompts, responses, strict=True) for _ in rs]
    flat = [as_completion(r, is_conversational(p)) for p, rs in zip(prompts, responses, strict=True) for r in rs]
    out: dict[str, dict] = {}
    for spec in specs:
        head = build_head(spec)
        try:
            scores = call_head(head, spec.name, flat_prompts, flat, tokenizer=tokenizer, what="generated responses")
        finally:
            head.release()
        check_finite(scores, spec.name, "the generated responses", lambda idx: f"response {flat[idx[0]]!r}")
        t = torch.tensor(scores, dtype=torch.float64)
        entry = {
            "mean": float(t.mean()) if len(scores) else float("nan"),
            "std": float(t.std(unbiased=False)) if len(scores) else float("nan"),
            "n": len(scores),
            "higher_is_better": spec.higher_is_better,
            "type": spec.type,
        }
        if return_scores:
            entry["scores"] = scores.tolist()
        out[spec.name] = entry
    return out
