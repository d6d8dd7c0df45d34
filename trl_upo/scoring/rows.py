"""Row keys in a distributed run, made from the shards: the same-rows check and the provenance row digests.

Every rank holds the whole dataset but scores only its share of the rows, so no rank should read or hash every row
for bookkeeping either:

- :func:`check_same_rows` compares, across ranks, the number of rows, the column names and the digests of a fixed
  sample of :data:`SAME_ROWS_SAMPLE` rows (evenly spaced plus seeded random positions, the same on every rank): O(1)
  per rank whatever the size. A different order (an unseeded shuffle) or a different selection of rows changes
  sampled rows with near certainty; an edit to a single row outside the sample is not seen (the scores of that row
  would come from the rank that scored it).
- :class:`RowKeys` gives the per-row digests that provenance records (``upo__scored_by``): each rank digests every
  ``size``-th row from its ``rank``-th (its scoring share) and one gather assembles the full list on every rank.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from datasets import Dataset

from ..fingerprints import short_hash
from ..heads import RewardHead
from .provenance import row_digests
from .shards import World, all_gather

#: How many rows (at most) every rank digests for the same-rows check.
SAME_ROWS_SAMPLE = 256


def sample_rows(n: int, k: int = SAME_ROWS_SAMPLE) -> np.ndarray:
    """The row indices the same-rows check digests: about ``k/2`` evenly spaced and ``k/2`` at positions drawn with
    a fixed seed (the same on every rank), sorted and unique."""
    if n <= k:
        return np.arange(n)
    spaced = np.linspace(0, n - 1, k // 2).astype(np.int64)
    drawn = np.random.default_rng(0).choice(n, k - k // 2, replace=False)
    return np.unique(np.concatenate([spaced, drawn]))


def sharded_digests(dataset: Dataset, columns: tuple[str, ...], world: World) -> list[str]:
    """:func:`~trl_upo.scoring.provenance.row_digests` of every row, each rank digesting its share (every ``size``-th
    row from its ``rank``-th) and one gather bringing every rank the whole list."""
    n = len(dataset)
    if world.size == 1:
        return row_digests(dataset, columns)
    mine = row_digests(dataset.select(range(world.rank, n, world.size)), columns) if world.rank < n else []
    out: list[str] = [""] * n
    for rank, part in enumerate(all_gather(world, mine)):
        out[rank::world.size] = part
    return out


class RowKeys:
    """Row digests for :mod:`~trl_upo.scoring.provenance`: the prompt, the responses and the columns a head reads
    (computed once per set of columns, from the shards in a distributed run: every rank must call it together)."""

    def __init__(self, dataset: Dataset, roles: tuple[str, ...], world: World = World()) -> None:
        self.dataset, self.roles, self.world, self._memo = dataset, roles, world, {}

    def __call__(self, head: RewardHead) -> list[str]:
        extra = sorted(c for c in head.required_columns() if c in self.dataset.column_names)
        columns = ("prompt", *self.roles, *extra)
        if columns not in self._memo:
            self._memo[columns] = sharded_digests(self.dataset, columns, self.world)
        return self._memo[columns]


def same_rows_key(dataset: Dataset, roles: tuple[str, ...]) -> tuple[int, str]:
    """What the ranks compare: the number of rows and a digest of the column names and the sampled rows."""
    sub = dataset.select(sample_rows(len(dataset)))
    digests = row_digests(sub, ("prompt", *roles))
    return len(dataset), short_hash("|".join([",".join(sorted(dataset.column_names)), *digests]))


def check_same_rows(world: World, dataset: Dataset, roles: tuple[str, ...], split: str) -> None:
    """Every rank must hold the same rows in the same order: each scores a share of the row indices and the shares
    are put together by index. Raises the same ValueError on every rank when they differ."""
    mine = same_rows_key(dataset, roles)
    everyone: list[Any] = all_gather(world, mine)
    if any(other != mine for other in everyone):
        sizes = sorted({n for n, _ in everyone})
        raise ValueError(
            f"The processes were given different {split} datasets (rows, their order or the columns differ; sizes {sizes}): "
            f"scoring splits the rows across processes by index and needs the same dataset, in the same order, on "
            f"every rank. Shuffle with a fixed seed (dataset.shuffle(seed=...)) or before launching, and select the "
            f"same rows on every rank."
        )
