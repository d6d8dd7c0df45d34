"""``reward_model``: the scalar output of a reward model (``AutoModelForSequenceClassification``, one label) on
the (prompt, response) pair."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from ..formats import completion_text, is_conversational
from ..models import DTYPES
from ._hf import HFSequenceClassifierHead
from .registry import register_head
from .schema import Param


@register_head("reward_model")
class RewardModelHead(HFSequenceClassifierHead):
    """Score = ``logits[:, 0]`` of a reward model on the prompt and the response.

    Conversational rows (message lists) are rendered with the reward model's chat template, when its tokenizer has
    one, and tokenised without adding special tokens again (the template writes them). Otherwise the input is the
    prompt text followed by the response text (directly for strings, after a newline for message lists), with the
    tokenizer's special tokens. Long inputs are cut
    from the left, so the response is kept and the start of the prompt is dropped.

    Parameters: the annotated ``__init__`` signature (the schema; see ``docs/heads/reward_model.md``).
    """

    _kind = "reward_model"
    _truncation_side = "left"  # keep the response, drop the start of the prompt

    def __init__(
        self,
        model: Annotated[
            str, Param("local directory or Hub id of the reward model; the tokenizer is loaded from the same place")
        ],
        batch_size: Annotated[int, Param("(prompt, response) pairs per forward pass", speed_only=True, minimum=1)] = 8,
        device: Annotated[str | None, Param("`cpu`, `cuda`, `cuda:1`, ...", speed_only=True, default_doc="the current CUDA device if any (each rank's own GPU), else CPU")] = None,
        max_length: Annotated[
            int | None,
            Param("truncate inputs to this many tokens, from the left; `null` for no truncation", minimum=2),
        ] = 2048,
        dtype: Annotated[
            str | None,
            Param("`auto`, `float32`, `float16` or `bfloat16` (`bfloat16` halves the memory of a 7B model)",
                  choices=DTYPES, default_doc="float32"),
        ] = None,
        revision: Annotated[str | None, Param("Hub branch, tag or commit")] = None,
        trust_remote_code: Annotated[
            bool, Param("run the model's own code (an `auto_map` in its config) to load it: read that code first "
                        "(docs/trust.md)", permission=True)
        ] = False,
    ) -> None:
        self._init_model(model, batch_size, device, max_length, dtype, revision, trust_remote_code)

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
