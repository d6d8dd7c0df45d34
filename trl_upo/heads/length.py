"""``length``: rewards shorter (or longer) responses, or closeness to a target length."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from ..formats import completion_text
from .protocol import RewardHead
from .registry import register_head
from .schema import Param

UNITS = ("words", "chars", "tokens")
DIRECTIONS = ("shorter", "longer")


@register_head("length")
class LengthHead(RewardHead):
    """Score = -length (``direction="shorter"``), +length (``"longer"``), or -|length - target| with ``target``.
    Parameters: the annotated ``__init__`` signature (the schema; see ``docs/heads/length.md``)."""

    parallel_safe = True

    @property
    def reads_tokenizer(self) -> bool:  # type: ignore[override]
        """Only ``unit: tokens`` counts with the trainer's tokenizer; words and characters do not read it."""
        return self.unit == "tokens"

    def __init__(
        self,
        unit: Annotated[
            str,
            Param("`words` (whitespace-separated), `chars`, or `tokens` (the trainer's tokenizer, no special tokens)",
                  choices=UNITS),
        ] = "words",
        direction: Annotated[
            str, Param("`shorter` or `longer`; ignored when `target` is set", choices=DIRECTIONS)
        ] = "shorter",
        target: Annotated[float | None, Param("a length to aim for, in `unit`", minimum=0)] = None,
    ) -> None:
        if unit not in UNITS:
            raise ValueError(f"length head: unit must be one of {list(UNITS)}, got {unit!r}")
        if direction not in DIRECTIONS:
            raise ValueError(f"length head: direction must be one of {list(DIRECTIONS)}, got {direction!r}")
        if target is not None and not target >= 0:
            raise ValueError(f"length head: target must be >= 0, got {target!r}")
        self.unit, self.direction, self.target = unit, direction, target

    def _length(self, text: str, tokenizer: Any) -> int:
        if self.unit == "words":
            return len(text.split())
        if self.unit == "chars":
            return len(text)
        if tokenizer is None:
            raise ValueError("length head with unit='tokens' needs the trainer's tokenizer (processing_class).")
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        *,
        role: str,
        columns: dict[str, list[Any]],
        tokenizer: Any = None,
    ) -> list[float]:
        lengths = [self._length(completion_text(c), tokenizer) for c in completions]
        if self.target is not None:
            return [-abs(float(n) - float(self.target)) for n in lengths]
        sign = -1.0 if self.direction == "shorter" else 1.0
        return [sign * n for n in lengths]
