"""Model inputs for evaluation, made the way ``DPOTrainer`` makes them in training: the chat template for message
lists (with the generation prompt for a prompt that the model answers), a plain tokenizer call for strings; batches
padded by hand, so the tokenizer's padding side never matters."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..formats import is_conversational


@contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """Put ``model`` in eval mode (no dropout) for the block, then restore its training mode.

    Args:
        model: a ``torch.nn.Module``.

    Yields:
        The model.
    """
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        yield model
    finally:
        if was_training:
            model.train()


def model_device(model: Any) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def check_prompts(prompts: Sequence[Any]) -> None:
    """Check that every prompt is a string or a message list.

    Raises:
        ValueError: naming the first prompt of another type.
    """
    for i, prompt in enumerate(prompts):
        if not (isinstance(prompt, str) or is_conversational(prompt)):
            raise ValueError(
                f"prompts[{i}] must be a string or a list of messages ({{'role': ..., 'content': ...}}), got "
                f"{type(prompt).__name__}: {str(prompt)[:80]!r}."
            )


def encode(tokenizer: Any, conversation_or_text: Any, *, generation_prompt: bool = False) -> list[int]:
    """Token ids of a string (with the tokenizer's special tokens) or of a message list (through the chat template).

    Args:
        tokenizer: the model's tokenizer.
        conversation_or_text: a string, or a list of ``{"role", "content"}`` messages.
        generation_prompt: for a message list, end with the assistant turn's opening (a prompt to be answered).

    Returns:
        The ids.

    Raises:
        ValueError: a message list with a tokenizer that has no chat template.
    """
    if isinstance(conversation_or_text, str):
        return list(tokenizer(conversation_or_text)["input_ids"])
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "Conversational prompts (message lists) need a tokenizer with a chat template; this tokenizer has none. "
            "Set tokenizer.chat_template or pass string prompts."
        )
    out = tokenizer.apply_chat_template(
        list(conversation_or_text), tokenize=True, return_dict=True, add_generation_prompt=generation_prompt
    )
    return list(out["input_ids"])


def pad_batch(seqs: Sequence[list[int]], pad_id: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token-id lists into ``(input_ids, attention_mask)``, padded on the left (generation) or the right.

    Args:
        seqs: the token ids, one list per sequence.
        pad_id: the id of the padding.
        left: pad on the left (True) or on the right (False).

    Returns:
        Two ``(len(seqs), longest)`` long tensors.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            attn[i, width - len(s) :] = 1
        else:
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            attn[i, : len(s)] = 1
    return ids, attn
