"""Unpaired rows (prompt, completion, boolean label) for KTO-style training with reward heads, checked before any
scoring: :func:`unpaired_dataset` is the KTO adapter's data check (``UPOKTOMixin.upo_prepare_split``)."""

from __future__ import annotations

from typing import Any

from datasets import Dataset, Value

from ..formats import DataError

__all__ = ["unpaired_dataset"]


def unpaired_dataset(dataset: Any, split: str, *, train: bool, applies_to: str, num_proc: int | None = None) -> Any:
    """The unpaired rows UPO scores, checked before any scoring.

    A paired dataset (``chosen`` and ``rejected``, no ``completion``) is unpaired exactly as ``KTOTrainer`` unpairs it
    (TRL's ``extract_prompt`` for an implicit prompt, then ``unpair_preference_dataset``): the chosen answer becomes a
    desirable row, the rejected one an undesirable row. An unpaired dataset needs ``prompt``, ``completion`` and a
    boolean ``label`` (True: desirable). Anything that is not a ``datasets.Dataset`` is returned unchanged (the
    scoring step rejects it with its own message).

    Args:
        dataset: the train or an eval dataset.
        split: its name, for the messages.
        train: the train split: it must hold desirable and undesirable rows.
        applies_to: ``upo_applies_to`` (``desirable`` needs desirable rows in the train split).
        num_proc: processes for the unpairing map (``dataset_num_proc``, as KTOTrainer uses).

    Raises:
        ValueError: no ``completion``/``label`` columns, a label that is not boolean or missing, an empty train split,
            or a train split with only desirable (or, for ``applies_to="desirable"``, no desirable) rows.
    """
    if not isinstance(dataset, Dataset):
        return dataset
    cols = set(dataset.column_names)
    if "completion" not in cols and {"chosen", "rejected"} <= cols:
        from trl.data_utils import extract_prompt, unpair_preference_dataset

        if "prompt" not in cols:
            dataset = dataset.map(extract_prompt, num_proc=num_proc, desc=f"Extracting prompt from {split} dataset")
        dataset = unpair_preference_dataset(dataset, num_proc=num_proc, desc=f"Unpairing {split} dataset")
        cols = set(dataset.column_names)
    if "completion" not in cols or "label" not in cols:
        missing = [c for c in ("completion", "label") if c not in cols]
        raise DataError(
            f"UPOKTOTrainer needs unpaired data: a 'prompt', a 'completion' and a boolean 'label' column (True: "
            f"desirable, False: undesirable), or preference pairs ('chosen' and 'rejected'), which it unpairs as "
            f"KTOTrainer does. The {split} dataset has no {missing}; its columns: {sorted(cols)}. Add the column "
            f"(e.g. dataset.add_column('label', [...])) or rename yours (dataset.rename_column(old, 'label'))."
        )
    feature = dataset.features["label"]
    if not (isinstance(feature, Value) and feature.dtype == "bool"):
        raise DataError(
            f"The 'label' column of the {split} dataset must be boolean (True: desirable, False: undesirable); it is "
            f"{feature}. Convert it explicitly, e.g. dataset.map(lambda r: {{'label': r['label'] == 'good'}}) (then "
            f"cast_column('label', Value('bool'))), so that no value is misread."
        )
    labels = dataset["label"]
    if any(v is None for v in labels):
        first = next(i for i, v in enumerate(labels) if v is None)
        raise DataError(
            f"The {split} dataset has rows without a label (row {first} is the first): label every row True or False, "
            f"or filter those rows out (dataset.filter(lambda r: r['label'] is not None))."
        )
    if train:
        desirable = sum(labels)
        if len(labels) == 0:
            raise DataError("The train dataset is empty.")
        if desirable == len(labels):
            raise DataError(
                f"Every row of the train dataset is desirable (label True, {desirable} rows): KTO learns from both "
                f"kinds, and its loss needs undesirable rows (label False) too, such as the rejected answers of your "
                f"preference data. With desirable answers only, train with SFT."
            )
        if desirable == 0:
            raise DataError(
                f"No row of the train dataset is desirable (label True, out of {len(labels)}): the auxiliary term "
                f"trains on desirable completions and would never train (upo_applies_to='all' would make it imitate "
                f"the undesirable answers only, upo_applies_to={applies_to!r} here). Add desirable rows (e.g. the "
                f"chosen answers of your preference data), or train KTO without reward heads."
            )
    return dataset
