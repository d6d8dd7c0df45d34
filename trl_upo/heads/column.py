"""``column``: scores that are already in the dataset, one column for the chosen and one for the rejected."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from .protocol import RewardHead
from .registry import register_head
from .schema import Param


@register_head("column")
class ColumnHead(RewardHead):
    """Reads precomputed scores from dataset columns (for example from a reward-model labelling job).
    Parameters: the annotated ``__init__`` signature (the schema; see ``docs/heads/column.md``)."""

    needs_text = False

    def __init__(
        self,
        chosen: Annotated[str, Param("name of the column holding the chosen response's score")],
        rejected: Annotated[str, Param("name of the column holding the rejected response's score")],
    ) -> None:
        if not chosen or not rejected:
            raise ValueError("column head needs both 'chosen' and 'rejected' column names")
        self.chosen, self.rejected = chosen, rejected

    def required_columns(self) -> list[str]:
        """The two dataset columns this head reads: the chosen and the rejected score."""
        return [self.chosen, self.rejected]

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        *,
        role: str,
        columns: dict[str, list[Any]],
        tokenizer: Any = None,
    ) -> list[float]:
        col = self.chosen if role == "chosen" else self.rejected
        if col not in columns:
            raise ValueError(
                f"column head: the dataset has no column {col!r} (the {role} scores). Available columns: "
                f"{sorted(columns)}. Set params.{role} to the right column name."
            )
        return [float("nan") if v is None else float(v) for v in columns[col]]
