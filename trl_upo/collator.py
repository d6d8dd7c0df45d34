"""The per-pair values a UPO step reads from the reward heads, and the collator that puts them in the batch.

The normalised scores and auxiliary reward of every response depend only on the raw scores and the statistics
fitted on the train split, so :func:`add_values_column` computes them once for the whole dataset (vectorised) and
stores them, with the raw scores, in one column; :class:`UPODataCollator` stacks that column into the batch.

Paired data has two responses per row (``ROLES``: chosen, rejected; ``4K + 2`` values), unpaired data (KTO) one
(``UNPAIRED_ROLES``: completion; ``2K + 1`` values); every function takes the roles.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from datasets.fingerprint import Hasher

from .heads import HeadSpec
from .objective import aux_reward, normalize_scores
from .scoring import ROLES, score_column

#: Dataset column UPOTrainer adds: per pair, the ``4K + 2`` values a step needs from the reward heads, in the order of
#: :func:`step_value_layout` (raw scores, normalised scores, auxiliary rewards). Head names start with a letter, so the
#: double underscore cannot collide with a head's score column ``upo_<head>_<role>``.
VALUES_COLUMN = "upo__values"
#: The batch key under which :class:`UPODataCollator` hands those values to the step, a ``(B, 4K + 2)`` float64 tensor
#: (popped before TRL sees the batch).
VALUES_KEY = "upo_values"


def value_width(num_heads: int, roles: Sequence[str] = ROLES) -> int:
    """The number of per-row values: raw and normalised scores of every head and r_aux, for every role."""
    return (2 * num_heads + 1) * len(roles)


def step_value_layout(head_names: list[str], roles: Sequence[str] = ROLES) -> list[str]:
    """The metric name of each of the ``4K + 2`` per-pair values, in column order: every head's raw score of the chosen
    response, of the rejected one, then the normalised scores (eq. 2) of each, then r_aux (eq. 3) of each.

    Example: heads ``["a", "b"]`` -> ``upo/a/chosen, upo/b/chosen, upo/a/rejected, upo/b/rejected,
    upo/a/chosen_norm, upo/b/chosen_norm, upo/a/rejected_norm, upo/b/rejected_norm, upo/reward_aux/chosen,
    upo/reward_aux/rejected``. Unpaired (``roles=("completion",)``): ``upo/a/completion, upo/b/completion,
    upo/a/completion_norm, upo/b/completion_norm, upo/reward_aux/completion``.
    """
    parts = (*roles, *(f"{r}_norm" for r in roles))
    return [f"upo/{n}/{part}" for part in parts for n in head_names] + [f"upo/reward_aux/{r}" for r in roles]


def head_signs_and_weights(specs: Sequence[HeadSpec]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(signs, weights)`` of the heads as float64 tensors: +1 / -1 for ``higher_is_better``, and ``w_i``."""
    signs = torch.tensor([1.0 if s.higher_is_better else -1.0 for s in specs], dtype=torch.float64)
    weights = torch.tensor([s.weight for s in specs], dtype=torch.float64)
    return signs, weights


def add_values_column(
    dataset: Dataset, specs: Sequence[HeadSpec], stats: list[dict], roles: Sequence[str] = ROLES
) -> Dataset:
    """Eqs. (2)-(3) once per response for the whole dataset: add the ``upo__values`` column (raw scores, normalised
    scores and r_aux of both responses; :func:`step_value_layout`).

    A column of this name (from an earlier trainer, or from statistics replaced on resume) is replaced.

    Args:
        dataset: a dataset with the heads' score columns (``upo_<head>_<role>``).
        specs: the heads.
        stats: the normalisation statistics fitted on the train split, one per head.
        roles: the response columns (``ROLES``, or ``UNPAIRED_ROLES`` for unpaired data).

    Returns:
        The dataset with the column; its fingerprint covers the statistics, weights and signs instead of hashing
        the new column's values.
    """
    signs, weights = head_signs_and_weights(specs)
    names = [s.name for s in specs]
    raw = {
        role: torch.from_numpy(
            np.stack([np.asarray(dataset[score_column(n, role)], dtype=np.float64) for n in names], axis=1)
        )
        for role in roles
    }
    norm = {role: normalize_scores(raw[role], stats, signs) for role in roles}
    r_aux = [aux_reward(norm[role], weights)[:, None] for role in roles]
    values = torch.cat([*raw.values(), *norm.values(), *r_aux], dim=1)
    if VALUES_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(VALUES_COLUMN)
    fingerprint = Hasher.hash((dataset._fingerprint, stats, weights.tolist(), signs.tolist()))
    return dataset.add_column(VALUES_COLUMN, values.tolist(), new_fingerprint=fingerprint)


@dataclass
class UPODataCollator:
    """Wraps a preference collator and adds the reward heads' values of each pair as one ``(B, 4K + 2)`` float64
    tensor under ``upo_values``: raw scores, normalised scores and r_aux of the chosen and rejected responses (layout:
    :func:`step_value_layout`), read from the ``upo__values`` column that ``UPOTrainer`` adds to the dataset.

    Args:
        base: the preference collator to wrap (TRL's ``DataCollatorForPreference`` by default).
        head_names: the reward heads' names (``K`` of them), for the error message and the shape check.
        roles: the response roles of a row (``ROLES``; ``UNPAIRED_ROLES`` for KTO's unpaired rows: ``2K + 1`` values).
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
        if values.shape != (len(examples), value_width(len(self.head_names), self.roles)):
            raise ValueError(
                f"The {VALUES_COLUMN!r} column has {tuple(values.shape)} values for heads {self.head_names}; it was "
                f"prepared for other heads. Let UPOTrainer score the dataset (drop the 'upo_*' columns first)."
            )
        batch[VALUES_KEY] = values
        return batch
