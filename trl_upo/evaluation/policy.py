"""All three measurements of a policy in one call: generate, score with the designer's heads, measure preferences."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ..models import load_model, load_tokenizer
from .designer import designer_metrics, text_head_specs
from .generation import generate_responses
from .preference import preference_metrics
from .unpaired import unpaired_metrics


def evaluate_policy(
    model: Any,
    tokenizer: Any = None,
    *,
    prompts: Iterable[Any],
    heads: Sequence[dict] | str | None = None,
    pairs: Any = None,
    unpaired: Any = None,
    ref_model: Any = None,
    beta: float = 0.1,
    max_new_tokens: int = 64,
    num_samples: int = 1,
    batch_size: int = 16,
    seed: int = 0,
    num_examples: int = 5,
    return_responses: bool = False,
    **generation_kwargs: Any,
) -> dict:
    """Generate responses to ``prompts``, score them with ``heads`` and measure preferences on ``pairs``.

    Args:
        model: the policy: a loaded model, a model directory / Hub id, or a PEFT adapter directory.
        tokenizer: its tokenizer (None: loaded from the model's directory, or the adapter's base).
        prompts: held-out prompts (strings or message lists).
        heads: reward-head spec dicts (as ``UPOConfig.reward_heads``); None: no designer metrics.
        pairs: held-out preference pairs (Dataset or list of dicts); None: no preference metrics.
        unpaired: held-out unpaired rows (``prompt``, ``completion``, boolean ``label``; KTO's data) for
            :func:`~trl_upo.evaluation.unpaired_metrics`; None: none.
        ref_model: the reference for the implicit reward (see :func:`~trl_upo.evaluation.preference_metrics`).
        beta: DPO's beta for the implicit reward.
        max_new_tokens: see :func:`~trl_upo.evaluation.generate_responses`.
        num_samples: responses per prompt.
        batch_size: prompts per ``generate`` call and sequences per scoring forward.
        seed: the generation seed.
        num_examples: how many (prompt, response) examples to include under ``"samples"``.
        return_responses: include every response under ``"responses"``.
        **generation_kwargs: ``do_sample``, ``temperature``, ``top_p`` and anything ``model.generate`` takes.

    Returns:
        ``{"designer": {...}, "preference": {...}, "generation": {settings}, "samples": [...]}``, and
        ``"unpaired": {...}`` when ``unpaired`` is given.
    """
    text_head_specs(heads)  # a typo in a head, or a head that cannot score text, fails here, before generation
    prompts = list(prompts)
    model = load_model(model)
    tokenizer = load_tokenizer(model, tokenizer)
    settings = {
        "max_new_tokens": max_new_tokens,
        "num_samples": num_samples,
        "batch_size": batch_size,
        "seed": seed,
        "do_sample": generation_kwargs.pop("do_sample", True),
        "temperature": generation_kwargs.pop("temperature", 1.0),
        "top_p": generation_kwargs.pop("top_p", 1.0),
        **generation_kwargs,
        "num_prompts": len(prompts),
    }
    gen_args = {k: v for k, v in settings.items() if k != "num_prompts"}
    responses = generate_responses(model, tokenizer, prompts, **gen_args)
    result: dict[str, Any] = {
        "designer": designer_metrics(prompts, responses, heads, tokenizer=tokenizer) if heads else {},
        "preference": (
            preference_metrics(model, tokenizer, pairs, ref_model=ref_model, beta=beta, batch_size=batch_size)
            if pairs is not None
            else {}
        ),
        "generation": settings,
        "samples": [
            {"prompt": p, "response": rs[0]} for p, rs in list(zip(prompts, responses, strict=True))[:num_examples]
        ],
    }
    if unpaired is not None:
        result["unpaired"] = unpaired_metrics(model, tokenizer, unpaired, ref_model=ref_model, beta=beta,
                                              batch_size=batch_size)
    if return_responses:
        result["responses"] = responses
    return result
