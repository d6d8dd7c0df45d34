"""The implicit reward ``beta * (log pi(y|x) - log pi_ref(y|x))`` of completions: what the preference metrics
(:mod:`.preference`, pairs) and the unpaired metrics (:mod:`.unpaired`, KTO's rows) both measure, in one place.

- :func:`completion_logps`: the summed log-probability of each completion given its prompt;
- :func:`prompt_and_sequence`: the token ids of prompt + completion and where the completion starts, tokenised as
  TRL's trainers tokenise them (EOS appended to a string completion, the chat template for messages);
- :func:`implicit_rewards`: the policy's log-probabilities, the reference's (``ref_model``, the adapter-disabled
  policy of a PEFT model, or none) and the rewards;
- :func:`tie_half_accuracy`: the share of positive values, ties counting half.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from ..models import load_model, load_tokenizer, pad_token_id
from .batching import encode, eval_mode, model_device, pad_batch

logger = logging.getLogger(__name__)

#: How an accuracy was computed, by reference kind (``"ref_model"``, ``"adapter_disabled"`` or ``"none"``).
METRIC_NAMES = {
    "ref_model": "implicit-reward accuracy (reference: the given ref_model)",
    "adapter_disabled": "implicit-reward accuracy (reference: the policy with its PEFT adapter disabled)",
    "none": "policy log-prob accuracy (no reference: log pi(chosen) > log pi(rejected), not an implicit reward)",
}


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The number of leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def with_eos(tokenizer: Any, text: str) -> str:
    """``text`` ending with the tokenizer's EOS token (appended unless already there), as TRL's trainers end a string
    completion."""
    eos = tokenizer.eos_token or ""
    return text if text.endswith(eos) else text + eos


def prompt_and_sequence(tokenizer: Any, prompt: Any, completion: Any) -> tuple[list[int], list[int]]:
    """The token ids of the prompt and of prompt + completion: strings (EOS appended to the completion) or message
    lists (the chat template; the prompt with the generation prompt).

    Raises:
        ValueError: one is a string and the other a message list.
    """
    if isinstance(prompt, str) != isinstance(completion, str):
        raise ValueError("A row mixes a string and a message list; give the prompt and its completions in one format.")
    if isinstance(prompt, str):
        return encode(tokenizer, prompt), encode(tokenizer, prompt + with_eos(tokenizer, completion))
    return encode(tokenizer, list(prompt), generation_prompt=True), encode(tokenizer, list(prompt) + list(completion))


def tie_half_accuracy(values: torch.Tensor) -> float:
    """The share of positive values, ties (zeros) counting half."""
    return float(((values > 0).double() + 0.5 * (values == 0).double()).mean())


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


def reference_logps(model: Any, ref_model: Any, logps: Callable[[Any], torch.Tensor],
                    caller: str = "preference_metrics") -> tuple[str, torch.Tensor | None]:
    """The reference kind and its log-probabilities (``logps(model)`` computes them for one model): ``ref_model``
    when given, else the adapter-disabled policy of a PEFT model, else none (with a warning naming ``caller``)."""
    if ref_model is not None:
        return "ref_model", logps(load_model(ref_model))
    if hasattr(model, "disable_adapter") and bool(getattr(model, "peft_config", None)):
        with model.disable_adapter():
            return "adapter_disabled", logps(model)
    logger.warning(
        "%s: no ref_model and the policy is not a PEFT model, so there is no reference: reporting the policy "
        "log-prob accuracy (log pi(chosen) > log pi(rejected)), not the implicit-reward accuracy. Pass "
        "ref_model=... (e.g. the SFT model) for the implicit reward.", caller
    )
    return "none", None


class ImplicitRewards(NamedTuple):
    """What :func:`implicit_rewards` measured, one value per sequence."""

    reference: str  #: ``"ref_model"``, ``"adapter_disabled"`` or ``"none"``
    policy_logps: torch.Tensor  #: log pi(y|x), float64
    rewards: torch.Tensor  #: beta * (log pi(y|x) - log pi_ref(y|x)); beta * log pi(y|x) without a reference


def implicit_rewards(model: Any, tokenizer: Any, ref_model: Any, rows: Sequence[Any],
                     tokenize: Callable[[Any, Any], list[tuple[list[int], int]]], *, beta: float, batch_size: int,
                     caller: str) -> ImplicitRewards:
    """The implicit rewards of every completion of ``rows``.

    Args:
        model: the policy (loaded, or a path, see :func:`trl_upo.models.load_model`).
        tokenizer: its tokenizer (None: loaded from where the model came from).
        ref_model: the reference (loaded or a path), or None (see :func:`reference_logps`).
        rows: the data rows.
        tokenize: ``tokenize(tokenizer, row)`` -> ``[(prompt + completion ids, completion start), ...]``, one entry
            per completion of the row (a pair has two, an unpaired row one); the rewards follow this order.
        beta: the scale of the rewards (> 0).
        batch_size: sequences per forward pass.
        caller: the public function, for the messages.

    Raises:
        ValueError: ``beta`` is not positive.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}.")
    model = load_model(model)
    tokenizer = load_tokenizer(model, tokenizer)
    pad_id = pad_token_id(tokenizer)
    sequences, starts = [], []
    for row in rows:
        for seq, start in tokenize(tokenizer, row):
            sequences.append(seq)
            starts.append(start)

    def logps(m: Any) -> torch.Tensor:
        return completion_logps(m, sequences, starts, pad_id, batch_size)

    policy = logps(model)
    kind, ref = reference_logps(model, ref_model, logps, caller)
    rewards = beta * (policy - (torch.zeros_like(policy) if ref is None else ref))
    return ImplicitRewards(kind, policy, rewards)
