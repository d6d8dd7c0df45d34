"""Eq. (2)'s normalisation statistics of every head, and where they come from."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..heads import HeadSpec
from .columns import ROLES, score_column

logger = logging.getLogger(__name__)


def fit_head_statistics(
    dataset: Any, specs: Sequence[HeadSpec], default_mode: str, roles: Sequence[str] = ROLES
) -> list[dict]:
    """Eq. (2) statistics of every head over the training split (the responses of all ``roles`` pooled).

    ``dataset`` is a scored ``Dataset`` or a mapping of column name to values (the rows of a stream)."""
    from ..objective import fit_normalization

    stats = []
    for spec in specs:
        values = np.concatenate(
            [np.asarray(dataset[score_column(spec.name, role)], dtype=np.float64) for role in roles]
        )
        st = fit_normalization(values, spec.normalize or default_mode)
        if st["std"] == 0 or not math.isfinite(st["std"]):
            logger.warning(
                "Reward head %r gives the same score (%s) to every response of the training split: it cannot rank "
                "responses and contributes nothing to the auxiliary reward. Check its parameters.",
                spec.name,
                st["mean"],
            )
        stats.append(st)
    return stats
