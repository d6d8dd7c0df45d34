"""The per-pair values a UPO step reads from the reward heads, and the collator that puts them in the batch.

The normalised scores and auxiliary reward of every response depend only on the raw scores and the statistics
fitted on the train split, so :func:`add_values_column` computes them once for the whole dataset (vectorised) and
stores them, with the raw scores, in one column; :class:`UPODataCollator` stacks that column into the batch.

Paired data has two responses per row (``ROLES``: chosen, rejected), unpaired data (KTO) one (``UNPAIRED_ROLES``:
completion); every function takes the roles. Which value sits in which column: :class:`trl_upo.layout.ValueLayout`.
"""

from __future__ import annotations

import copy

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset, Features, IterableDataset, List, Value
from datasets.fingerprint import Hasher

from .heads import HeadSpec
from .layout import ValueLayout
from .objective import aux_reward, normalize_scores
from .scoring import ROLES, score_column

#: Dataset column UPOTrainer adds: per row, the values a step needs from the reward heads, in the order of
#: :class:`~trl_upo.layout.ValueLayout` (raw scores, normalised scores, auxiliary rewards). Head names start with a letter, so the
#: double underscore cannot collide with a head's score column ``upo_<head>_<role>``.
VALUES_COLUMN = "upo__values"
#: The batch key under which :class:`UPODataCollator` hands those values to the step, a ``(B, width)`` float64 tensor
#: (popped before TRL sees the batch).
VALUES_KEY = "upo_values"


def head_signs_and_weights(specs: Sequence[HeadSpec]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(signs, weights)`` of the heads as float64 tensors: +1 / -1 for ``higher_is_better``, and ``w_i``."""
    signs = torch.tensor([1.0 if s.higher_is_better else -1.0 for s in specs], dtype=torch.float64)
    weights = torch.tensor([s.weight for s in specs], dtype=torch.float64)
    return signs, weights


def value_rows(columns: Any, specs: Sequence[HeadSpec], stats: list[dict], roles: Sequence[str] = ROLES) -> torch.Tensor:
    """Eqs. (2)-(3) for a block of rows: the ``(N, width)`` values (raw scores, normalised scores and r_aux of every
    response; :class:`~trl_upo.layout.ValueLayout`) from the heads' score columns ``upo_<head>_<role>`` of
    ``columns`` (a dataset or a batch of a stream)."""
    signs, weights = head_signs_and_weights(specs)
    names = [s.name for s in specs]
    raw = {
        role: torch.from_numpy(
            np.stack([np.asarray(columns[score_column(n, role)], dtype=np.float64) for n in names], axis=1)
        )
        for role in roles
    }
    norm = {role: normalize_scores(raw[role], stats, signs) for role in roles}
    r_aux = {role: aux_reward(norm[role], weights) for role in roles}
    return ValueLayout.of(names, roles).assemble(raw, norm, r_aux)


def add_values_column(
    dataset: Dataset | IterableDataset, specs: Sequence[HeadSpec], stats: list[dict], roles: Sequence[str] = ROLES,
    batch_size: int = 1000,
) -> Dataset | IterableDataset:
    """Eqs. (2)-(3) once per response: add the ``upo__values`` column (:func:`value_rows`). A map-style dataset gets
    it for all rows at once (vectorised); a stream gets it batch by batch as it is read.

    A column of this name (from an earlier trainer, or from statistics replaced on resume) is replaced.

    Args:
        dataset: a dataset (or stream) with the heads' score columns (``upo_<head>_<role>``).
        specs: the heads.
        stats: the normalisation statistics (fitted on the train split, or read), one per head.
        roles: the response columns (``ROLES``, or ``UNPAIRED_ROLES`` for unpaired data).
        batch_size: a stream's rows per values batch (the scoring batch: step 1 waits for no more rows than that).

    Returns:
        The dataset with the column; a map-style dataset's fingerprint covers the statistics, weights and signs
        instead of hashing the new column's values.
    """
    stats = copy.deepcopy(stats)
    if isinstance(dataset, IterableDataset):
        def add(batch: dict[str, list]) -> dict[str, list]:
            batch[VALUES_COLUMN] = value_rows(batch, specs, stats, roles).tolist()
            return batch

        features = None
        if dataset.features is not None:
            features = Features({**{k: v for k, v in dataset.features.items() if k != VALUES_COLUMN},
                                 VALUES_COLUMN: List(Value("float64"))})
        return dataset.map(add, batched=True, batch_size=batch_size, features=features)
    values = value_rows(dataset, specs, stats, roles)
    if VALUES_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(VALUES_COLUMN)
    signs, weights = head_signs_and_weights(specs)
    fingerprint = Hasher.hash((dataset._fingerprint, stats, weights.tolist(), signs.tolist()))
    return dataset.add_column(VALUES_COLUMN, values.tolist(), new_fingerprint=fingerprint)


@dataclass
class UPODataCollator:
    """Wraps a preference collator and adds the reward heads' values of each row as one ``(B, width)`` float64
    tensor under ``upo_values``: raw scores, normalised scores and r_aux of every response (layout:
    :class:`~trl_upo.layout.ValueLayout`), read from the ``upo__values`` column that the trainer adds to the dataset.

    Args:
        base: the preference collator to wrap (TRL's ``DataCollatorForPreference`` by default).
        head_names: the reward heads' names (``K`` of them), for the error message and the shape check.
        roles: the response roles of a row (``ROLES``; ``UNPAIRED_ROLES`` for KTO's unpaired rows).
    """

    base: Callable[[list[dict[str, Any]]], dict[str, Any]]
    head_names: list[str]
    roles: tuple[str, ...] = ROLES

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base(examples)
        try:
            rows = [ex[VALUES_COLUMN] for ex in examples]
        except KeyError:
            raise KeyError(
                f"A batch lacks the UPO column {VALUES_COLUMN!r}. The dataset was not prepared by this trainer, or a "
                f"custom data pipeline removed the column; keep the 'upo_*' columns UPOTrainer adds."
            ) from None
        values = torch.tensor(rows, dtype=torch.float64)
        if values.shape != (len(examples), ValueLayout.of(self.head_names, self.roles).width):
            raise ValueError(
                f"The {VALUES_COLUMN!r} column has {tuple(values.shape)} values for heads {self.head_names}; it was "
                f"prepared for other heads. Let UPOTrainer score the dataset (drop the 'upo_*' columns first)."
            )
        if not torch.isfinite(values).all():
            row = int((~torch.isfinite(values)).any(dim=1).nonzero()[0])
            raise ValueError(
                f"Row {row} of a batch has non-finite UPO values ({values[row].tolist()}): a streamed row this "
                f"process did not score reached its batch (the stream was shared out across processes in a way "
                f"trl_upo.scoring.rank_share did not expect), or the '{VALUES_COLUMN}' column was changed. Please "
                f"report it with your accelerate version; set accelerator_config.dispatch_batches: true to score "
                f"every row on the main process instead."
            )
        batch[VALUES_KEY] = values
        return batch
