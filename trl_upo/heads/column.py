"""``column``: scores that are already in the dataset, one column for the chosen and one for the rejected (or, on
unpaired KTO data, one for the completion)."""

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
    reads_tokenizer = False

    def __init__(
        self,
        chosen: Annotated[str | None, Param("name of the column holding the chosen response's score")] = None,
        rejected: Annotated[str | None, Param("name of the column holding the rejected response's score")] = None,
        completion: Annotated[
            str | None, Param("name of the column holding an unpaired row's completion score (KTO data)")
        ] = None,
    ) -> None:
        self.check_params({"chosen": chosen, "rejected": rejected, "completion": completion})
        self.chosen, self.rejected, self.completion = chosen, rejected, completion

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        """Both ``chosen`` and ``rejected`` (preference pairs), or ``completion`` (unpaired rows), or all three."""
        chosen, rejected = params.get("chosen"), params.get("rejected")
        if bool(chosen) != bool(rejected) or not (chosen or params.get("completion")):
            raise ValueError(
                "the column head needs both 'chosen' and 'rejected' column names (preference pairs), or 'completion' "
                "(unpaired KTO rows), or all three"
            )

    def required_columns(self) -> list[str]:
        """The dataset columns this head reads: those named by its parameters."""
        return [c for c in (self.chosen, self.rejected, self.completion) if c]

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        *,
        role: str,
        columns: dict[str, list[Any]],
        tokenizer: Any = None,
    ) -> list[float]:
        col = {"chosen": self.chosen, "rejected": self.rejected, "completion": self.completion}.get(role)
        if not col:
            raise ValueError(
                f"column head: no column is named for the {role} scores: set params.{role} to the dataset column "
                f"that holds them."
            )
        if col not in columns:
            raise ValueError(
                f"column head: the dataset has no column {col!r} (the {role} scores). Available columns: "
                f"{sorted(columns)}. Set params.{role} to the right column name."
            )
        return [float("nan") if v is None else float(v) for v in columns[col]]
