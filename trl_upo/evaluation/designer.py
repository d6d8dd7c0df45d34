"""Designer metrics: the raw scores reward heads give a policy's generated responses, with no normalisation, and
the 95% confidence interval of their mean (Student's t, clipped to the head's range when the head has a known one)."""

from __future__ import annotations

import math
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


def t_quantile(level: float, df: int) -> float:
    """The two-sided quantile of Student's t: the ``t`` with ``P(|T| <= t) = level`` for ``df`` degrees of freedom.

    Exact for integer ``df`` (the closed forms of Abramowitz & Stegun 26.7.3-4, solved by bisection); above 1000
    degrees of freedom, the normal quantile with its Cornish-Fisher correction to second order (error below 1e-7).

    Raises:
        ValueError: ``level`` not in (0, 1) or ``df`` below 1.
    """
    if not 0 < level < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0 < level < 1 and df >= 1, got level={level!r}, df={df!r}.")
    if df > 1000:
        from statistics import NormalDist

        z = NormalDist().inv_cdf((1 + level) / 2)
        return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    lo, hi = 0.0, math.pi / 2  # theta = atan(t / sqrt(df)), in which P(|T| <= t) increases
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_central_mass(mid, df) < level else (lo, mid)
    return math.sqrt(df) * math.tan((lo + hi) / 2)


def _t_central_mass(theta: float, df: int) -> float:
    """``P(|T| <= sqrt(df) * tan(theta))`` for Student's t with ``df`` degrees of freedom (A&S 26.7.3-4)."""
    c2 = math.cos(theta) ** 2
    if df % 2 == 0:
        term = total = 1.0
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        return math.sin(theta) * total
    if df == 1:
        return 2 * theta / math.pi
    term = total = math.cos(theta)
    for k in range(1, (df - 1) // 2):
        term *= 2 * k / (2 * k + 1) * c2
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * total)


def mean_interval(mean: float, sd: float, n: int, bounds: Sequence[float | None] | None = None,
                  level: float = 0.95) -> list[float] | None:
    """The ``level`` confidence interval of a mean: ``mean -+ t * sd / sqrt(n)`` with Student's t on ``n - 1``
    degrees of freedom, clipped to ``bounds`` (the head's possible range, ``None`` for an open side).

    Args:
        mean: the sample mean.
        sd: the sample standard deviation (``n - 1`` in the denominator).
        n: the number of scores.
        bounds: ``(low, high)`` the scores cannot leave, or None.
        level: the confidence level.

    Returns:
        ``[low, high]``, or None with fewer than two scores.
    """
    if n < 2 or not math.isfinite(mean):
        return None
    half = t_quantile(level, n - 1) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:
        if bounds[0] is not None:
            low = max(low, bounds[0])
        if bounds[1] is not None:
            high = min(high, bounds[1])
    return [low, high]


def score_range(spec: Any) -> list[float | None] | None:
    """The range a built-in head's raw score cannot leave, from its type and parameters: ``[low, high]`` with None
    for an open side, or None when it is not known (``function``, ``reward_model``, ``readability``, custom heads).

    ``length``: ``-length`` (shorter, or the distance to a target) is at most 0, ``+length`` at least 0;
    ``similarity``: a cosine, in [-1, 1]; ``classifier`` (probabilities): a sum of probabilities of the chosen
    labels, in [0, number of labels]; ``lexicon``: at least 0 without terms to avoid, at most 0 without terms to
    encourage, and with ``mode: presence`` between minus the number of terms to avoid and the number to encourage.
    """
    params = dict(getattr(spec, "params", None) or {})
    kind = getattr(spec, "type", None)
    if kind == "length":
        longer = params.get("target") is None and params.get("direction", "shorter") == "longer"
        return [0.0, None] if longer else [None, 0.0]
    if kind == "similarity":
        return [-1.0, 1.0]
    if kind == "classifier" and params.get("output", "probability") == "probability":
        labels = params.get("labels")
        return [0.0, float(len(labels) if isinstance(labels, (list, tuple)) else 1)]
    if kind == "lexicon":
        avoid, encourage = (_terms(params.get(key)) for key in ("avoid", "encourage"))
        if params.get("mode", "count") == "presence":
            return [-float(len(set(avoid))), float(len(set(encourage)))]
        return [None if avoid else 0.0, None if encourage else 0.0]
    return None


def _terms(value: Any) -> list:
    return [value] if isinstance(value, str) else list(value or [])


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
        ``{head_name: {"mean", "std", "n", "ci95", "range", "higher_is_better", "type"}}``: ``std`` is the population
        standard deviation over all responses; ``ci95`` the 95% confidence interval of the mean (Student's t on
        ``n - 1`` degrees of freedom, clipped to ``range``; None below two responses); ``range`` the range the head's
        score cannot leave (:func:`score_range`; None: not known); ``higher_is_better`` is copied from the spec (a
        cost head says False: its raw score is reported as the head returns it, so lower is better then).

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
        mean = float(t.mean()) if len(scores) else float("nan")
        bounds = score_range(spec)
        entry = {
            "mean": mean,
            "std": float(t.std(unbiased=False)) if len(scores) else float("nan"),
            "n": len(scores),
            "ci95": mean_interval(mean, float(t.std()), len(scores), bounds) if len(scores) > 1 else None,
            "range": bounds,
            "higher_is_better": spec.higher_is_better,
            "type": spec.type,
        }
        if return_scores:
            entry["scores"] = scores.tolist()
        out[spec.name] = entry
    return out
