"""``reward_model``: the scalar output of a reward model (``AutoModelForSequenceClassification``, one label) on
the (prompt, response) pair."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..formats import completion_text, is_conversational
from ._hf import HFSequenceClassifierHead
from .registry import register_head


@register_head("reward_model")
class RewardModelHead(HFSequenceClassifierHead):
    """Score = ``logits[:, 0]`` of a reward model on the prompt and the response.

    Conversational rows (message lists) are rendered with the reward model's chat template, when its tokenizer has
    one, and tokenised without adding special tokens again (the template writes them). Otherwise the input is the
    prompt text followed by the response text (directly for strings, after a newline for message lists), with the
    tokenizer's special tokens. Long inputs are cut
    from the left, so the response is kept and the start of the prompt is dropped.

    Args:
        model: local directory or Hub id of the reward model (its tokenizer is loaded from the same place).
        batch_size: pairs per forward pass.
        device: ``"cuda"``, ``"cpu"``, ``"cuda:1"``, ...; default: the process's current CUDA device (each rank's
            own GPU under accelerate) when available, else CPU.
        max_length: truncate inputs to this many tokens, from the left (None: no truncation).
        dtype: ``"auto"``, ``"float32"``, ``"float16"`` or ``"bfloat16"``; None loads in float32.
        revision: the Hub revision (branch, tag or commit) to load.
    """

    _kind = "reward_model"
    _truncation_side = "left"  # keep the response, drop the start of the prompt

    def __init__(
        self,
        model: str,
        batch_size: int = 8,
        device: str | None = None,
        max_length: int | None = 2048,
        dtype: str | None = None,
        revision: str | None = None,
    ) -> None:
        self._init_model(model, batch_size, device, max_length, dtype, revision)

    def _on_load(self, model: Any, tokenizer: Any) -> None:
        if model.config.num_labels != 1:
            raise ValueError(
                f"reward_model head: {self.model_name!r} has {model.config.num_labels} labels, but a reward model "
                f"has one (a scalar score). For a classifier use the 'classifier' head with params.labels."
            )

    def texts(self, prompts: Sequence[Any], completions: Sequence[Any]) -> tuple[list[str], bool]:
        """The model inputs, and whether they were rendered with the chat template (no special tokens to add)."""
        _, tokenizer = self.load()
        chat = (
            getattr(tokenizer, "chat_template", None) is not None
            and len(completions) > 0
            and all(is_conversational(p) and is_conversational(c) for p, c in zip(prompts, completions, strict=True))
        )
        if chat:
            texts = [
                tokenizer.apply_chat_template(list(p) + list(c), tokenize=False)
                for p, c in zip(prompts, completions, strict=True)
            ]
            return texts, True
        # Strings are joined as they are (preference datasets carry the separator, e.g. a leading space); the texts
        # of message lists are joined with a newline.
        return [
            completion_text(p) + ("" if isinstance(p, str) and isinstance(c, str) else "\n") + completion_text(c)
            for p, c in zip(prompts, completions, strict=True)
        ], False

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        *,
        role: str,
        columns: dict[str, list[Any]],
        tokenizer: Any = None,
    ) -> list[float]:
        texts, templated = self.texts(prompts, completions)
        return self.logits(texts, add_special_tokens=not templated)[:, 0].double().tolist()
