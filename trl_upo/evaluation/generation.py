"""Sampling a policy's responses to held-out prompts: batched, left-padded, seeded."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..models import load_model, load_tokenizer, pad_token_id
from .batching import check_prompts, encode, eval_mode, model_device, pad_batch


def _check_settings(
    prompts: list[Any], max_new_tokens: int, num_samples: int, batch_size: int, do_sample: bool, temperature: float,
    top_p: float,
) -> None:
    if not prompts:
        raise ValueError("generate_responses: no prompts given.")
    for name, value in (("max_new_tokens", max_new_tokens), ("num_samples", num_samples), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"generate_responses: {name} must be an integer >= 1, got {value!r}.")
    if num_samples > 1 and not do_sample:
        raise ValueError(
            f"num_samples={num_samples} with do_sample=False would return {num_samples} identical greedy responses; "
            f"set do_sample=True or num_samples=1."
        )
    if do_sample and not temperature > 0:
        raise ValueError(
            f"temperature must be > 0 when sampling, got {temperature!r} (use do_sample=False for greedy)."
        )
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}.")
    check_prompts(prompts)


@torch.no_grad()
def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    *,
    max_new_tokens: int = 64,
    num_samples: int = 1,
    batch_size: int = 16,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    **generation_kwargs: Any,
) -> list[list[str]]:
    """Generate ``num_samples`` responses to every prompt, in batches with left padding.

    String prompts are tokenised with the tokenizer's special tokens, message lists with the chat template and the
    generation prompt, as ``DPOTrainer`` does in training. The pad token falls back to the EOS token.

    Args:
        model: a causal LM (a loaded model or a path, see :func:`trl_upo.models.load_model`).
        tokenizer: its tokenizer (None: loaded from where the model came from).
        prompts: strings, or message lists for conversational data.
        max_new_tokens: the longest response, in tokens.
        num_samples: responses per prompt (more than 1 needs ``do_sample=True``).
        batch_size: prompts per ``generate`` call.
        do_sample: sample (True) or decode greedily (False).
        temperature: the sampling temperature.
        top_p: nucleus sampling threshold.
        seed: ``torch.manual_seed`` before the first batch, so a run is reproducible.
        **generation_kwargs: passed on to ``model.generate`` (e.g. ``top_k``, ``repetition_penalty``).

    Returns:
        ``responses[i][j]``: the j-th response to ``prompts[i]``, decoded without special tokens; shape
        ``(len(prompts), num_samples)``.

    Raises:
        ValueError: on an empty prompt list, a prompt of the wrong type, or inconsistent settings.
    """
    prompts = list(prompts)
    _check_settings(prompts, max_new_tokens, num_samples, batch_size, do_sample, temperature, top_p)
    model = load_model(model)
    tokenizer = load_tokenizer(model, tokenizer)
    pad_id = pad_token_id(tokenizer)
    device = model_device(model)
    encoded = [encode(tokenizer, p, generation_prompt=True) for p in prompts]
    sampling = dict(temperature=temperature, top_p=top_p) if do_sample else {}
    torch.manual_seed(seed)
    out: list[list[str]] = []
    from tqdm.auto import tqdm

    from ..scoring.shards import progress_enabled

    # A bar over prompts (rate and ETA); off with TQDM_DISABLE or HF's progress-bar switches, as scoring's.
    bar = tqdm(total=len(prompts), desc=f"Generating {num_samples} per prompt", unit="prompts", dynamic_ncols=True,
               disable=not progress_enabled())
    with eval_mode(model), bar:
        for start in range(0, len(encoded), batch_size):
            ids, attn = pad_batch(encoded[start : start + batch_size], pad_id, left=True)
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=attn.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                num_return_sequences=num_samples,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
                **sampling,
                **generation_kwargs,
            )
            texts = tokenizer.batch_decode(gen[:, ids.shape[1] :], skip_special_tokens=True)
            texts = [t.strip() for t in texts]
            out.extend(texts[k : k + num_samples] for k in range(0, len(texts), num_samples))
            bar.update(len(encoded[start : start + batch_size]))
    return out
