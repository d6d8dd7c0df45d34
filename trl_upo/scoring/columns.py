"""The names scoring shares with the rest of the package: the response roles, the score columns, and the check that
a dataset has the columns its trainer reads (with the implicit prompt extracted as TRL does)."""

from __future__ import annotations

from collections.abc import Sequence

from datasets import Dataset

from ..formats import DataError

RESPONSE_COLUMNS = ("chosen", "rejected")
#: The responses of a preference pair, in score-array column order.
ROLES = ("chosen", "rejected")
#: The one response of an unpaired (KTO) row.
UNPAIRED_ROLES = ("completion",)


def score_column(head_name: str, role: str) -> str:
    """Name of the dataset column holding ``head_name``'s scores of the ``role`` responses."""
    return f"upo_{head_name}_{role}"


def missing_columns_error(cols: set[str], roles: Sequence[str]) -> DataError | None:
    """The error for a dataset (or stream) with columns ``cols`` that lacks a response column (or, for unpaired
    roles, the prompt); None when nothing is missing. A paired dataset without ``prompt`` is fine (implicit)."""
    if tuple(roles) != ROLES:
        missing = [c for c in ("prompt", *roles) if c not in cols]
        hint = (" Preference pairs (chosen/rejected) train with the DPO trainer (trainer: dpo), or unpair them first "
                "(trl.data_utils.unpair_preference_dataset)." if {"chosen", "rejected"} <= cols else "")
        need = f"Unpaired data needs the columns 'prompt' and {', '.join(repr(r) for r in roles)}"
    else:
        missing = [c for c in RESPONSE_COLUMNS if c not in cols]
        hint = (" These are unpaired rows (completion, label): train them with UPOKTOTrainer (trainer: kto in a "
                "recipe)." if {"completion", "label"} <= cols else "")
        need = ("UPOTrainer needs a preference dataset with 'chosen' and 'rejected' columns (and 'prompt', or an "
                "implicit prompt shared by both)")
    if not missing:
        return None
    return DataError(f"{need}; this dataset has no {missing}. Columns: {sorted(cols)}.{hint}")


def ensure_prompt(dataset: Dataset, roles: Sequence[str] = ROLES) -> Dataset:
    """Check the response columns and extract an implicit prompt the way DPOTrainer (and KTOTrainer) do.

    ``roles`` are the response columns: ``ROLES`` for preference pairs, ``UNPAIRED_ROLES`` for unpaired rows.
    """
    cols = set(dataset.column_names)
    error = missing_columns_error(cols, roles)
    if error is not None:
        raise error
    if tuple(roles) == ROLES and "prompt" not in cols:
        from trl.data_utils import extract_prompt

        dataset = dataset.map(extract_prompt, desc="Extracting prompt")
    return dataset
