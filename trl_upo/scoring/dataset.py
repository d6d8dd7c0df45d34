"""Scoring a map-style dataset with reward heads, once, before training (step 1 of the objective).

Scores are stored as dataset columns ``upo_<head>_chosen`` and ``upo_<head>_rejected`` and cached on disk, keyed on
the dataset's fingerprint and the head's fingerprint, so a second identical run does not score again and adding a
head scores only that head.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import Dataset
from datasets.fingerprint import Hasher

from ..fingerprints import short_hash
from ..formats import DataError
from ..heads import HeadSpec, RewardHead
from .cache import ChunkedScoreCache, default_cache_dir
from .calls import check_finite, reads_tokenizer, score_batch
from .columns import ROLES, ensure_prompt, score_column
from .provenance import PROVENANCE_COLUMN, head_digest, recorded_scores
from .provenance import record as record_provenance
from .rows import RowKeys, check_same_rows
from .shards import World, all_gather, current_world, pack_mask, plan, progress_bar, unpack_mask

logger = logging.getLogger(__name__)

#: Rows per cache block of text heads scored in worker processes (``num_proc > 1``): each block starts a pool.
PARALLEL_BLOCK = 50_000


@dataclass
class ScoreReport:
    """What :func:`score_dataset` did, per head.

    Attributes:
        status: ``"scored"`` (some rows were scored), ``"cached"`` (every row came from the score cache) or
            ``"recorded"`` (the dataset's own score columns, written by the same head: nothing was loaded or run).
        responses: the responses this process scored, per head (its shard in a distributed run).
        seconds: the wall time each head took in this process.
    """

    status: dict[str, str]
    responses: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def score_dataset(
    dataset: Dataset,
    heads: Sequence[RewardHead],
    specs: Sequence[HeadSpec],
    *,
    split: str,
    tokenizer: Any = None,
    batch_size: int = 256,
    cache_dir: str | None = None,
    use_cache: bool = True,
    num_proc: int | None = None,
    roles: Sequence[str] = ROLES,
    distributed: bool = False,
    record: bool = False,
) -> tuple[Dataset, ScoreReport]:
    """Score every response (each of ``roles``: chosen and rejected by default, ``UNPAIRED_ROLES`` for unpaired data)
    with every head; return the dataset with the score columns ``upo_<head>_<role>``.

    For each head, in this order: scores the dataset records for this very head (``upo__scored_by``, see
    :mod:`trl_upo.scoring.provenance`) are taken as they are; rows in the score cache are read; the rest is scored,
    ``batch_size`` rows at a time, each block saved to the cache as soon as it is scored (a killed run keeps it).
    Heads marked ``parallel_safe`` (the text heads) score in ``num_proc`` worker processes when ``num_proc > 1``.

    Args:
        distributed: score in every process of a running ``torch.distributed`` group (``accelerate launch``,
            torchrun) together: EVERY rank must call this with the same arguments; each scores an even share of the
            rows not cached anywhere, on its own device, and every rank returns the same, complete dataset. Ignored
            (one process scores everything) when no process group is initialised (see :mod:`~trl_upo.scoring.rows`).
        record: add the ``upo__scored_by`` column, so that scoring this dataset again (after saving and loading it
            in any format) with the same heads reuses its score columns without loading any head.

    Raises:
        ValueError: naming the head, the split, the row and the fix, on a non-finite score or a wrong count. In a
            distributed run, a head's error on one rank is raised on every rank (no rank is left waiting).
    """
    roles = tuple(roles)
    dataset = ensure_prompt(dataset, roles)
    world = current_world(distributed)
    fingerprint = getattr(dataset, "_fingerprint", None)
    cache_dir = cache_dir or default_cache_dir()
    report = ScoreReport({})
    new_columns: dict[str, tuple[np.ndarray, str]] = {}
    recorded: dict[str, tuple[str, list[str]]] = {}
    # The tokenizer keys the scores of the heads that may read it (see reads_tokenizer).
    tok_key = Hasher.hash(tokenizer) if tokenizer is not None else "none"
    row_keys = RowKeys(dataset, roles, world)
    if world.size > 1:
        check_same_rows(world, dataset, roles, split)
    for head, spec in zip(heads, specs, strict=True):
        started = time.perf_counter()
        head_tok = tok_key if reads_tokenizer(head) else "unused"
        digest = head_digest(head, head_tok, roles)
        cols = [score_column(spec.name, role) for role in roles]
        scores = _recorded(dataset, spec.name, digest, lambda: row_keys(head), cols, world)
        if scores is not None:
            report.status[spec.name], report.responses[spec.name] = "recorded", 0
        else:
            role_key = "" if roles == ROLES else f"|{','.join(roles)}"
            key = short_hash(f"{fingerprint}|{head.fingerprint()}|{len(dataset)}|{head_tok}{role_key}")
            cache = ChunkedScoreCache(
                cache_dir, f"{spec.name}-{key}", (len(dataset), len(roles)), tag=str(world.rank),
                enabled=bool(use_cache and fingerprint),
            )
            scores = _score_head(dataset, head, spec, cache, world, report, split=split, tokenizer=tokenizer,
                                 batch_size=batch_size, num_proc=num_proc, roles=roles)
        report.seconds[spec.name] = time.perf_counter() - started
        check_finite(scores, spec.name, f"the {split} dataset", lambda idx: f"row {idx[0]} {roles[idx[1]]}")
        _log_head(spec.name, split, report, world)
        if record:
            recorded[spec.name] = (digest, row_keys(head))
        for j, col in enumerate(cols):
            new_columns[col] = (scores[:, j], digest)
    dataset = _add_columns(dataset, new_columns, split)
    if recorded:
        dataset = record_provenance(dataset, recorded)
    return dataset, report


def _add_columns(dataset: Dataset, new_columns: dict[str, tuple[np.ndarray, str]], split: str) -> Dataset:
    """The dataset with the score columns (``new_columns[col]``: the scores and the head digest)."""
    for col, (values, digest) in new_columns.items():
        if col in dataset.column_names:
            logger.info("Replacing existing column %r in the %s dataset with fresh scores.", col, split)
            dataset = dataset.remove_columns(col)
        # The scores follow from the rows and the head digest: a fingerprint made of those, instead of datasets
        # hashing every score of the column on every rank (O(rows), the largest unsharded cost of scoring).
        dataset = dataset.add_column(col, values.tolist(),
                                     new_fingerprint=short_hash(f"{dataset._fingerprint}|{col}|{digest}"))
    return dataset


def _recorded(dataset: Dataset, name: str, digest: str, keys: Any, cols: list[str], world: World):
    """The head's scores recorded in the dataset (``upo__scored_by``; ``keys()`` gives the row digests), or None.
    The ranks decide together: a rank alone in the scoring gathers would wait forever."""
    scores = recorded_scores(dataset, name, digest, keys(), cols) if PROVENANCE_COLUMN in dataset.column_names else None
    if world.size > 1 and not all(all_gather(world, scores is not None)):
        return None
    return scores
def _log_head(name: str, split: str, report: ScoreReport, world: World) -> None:
    seconds, n = report.seconds[name], report.responses[name]
    where = f" (rank {world.rank} of {world.size}: its share)" if world.size > 1 else ""
    if report.status[name] == "scored":
        logger.info("Reward head %r scored %d responses of the %s dataset in %.1f s (%.0f responses/s)%s.",
                    name, n, split, seconds, n / max(seconds, 1e-9), where)
    else:
        logger.info("Reward head %r: every score of the %s dataset was %s (%.1f s).", name, split,
                    "in the dataset" if report.status[name] == "recorded" else "cached", seconds)


def _score_head(
    dataset: Dataset, head: RewardHead, spec: HeadSpec, cache: ChunkedScoreCache, world: World, report: ScoreReport,
    **kw: Any,
) -> np.ndarray:
    """One head's scores of every row: what any rank's cache holds, plus what is missing, scored in even shares;
    saved complete to this process's cache (each rank's cache may be on its own machine's disk), and reported."""
    n, n_roles = len(dataset), len(kw["roles"])
    cached, have = cache.load()
    have_by_rank = [unpack_mask(m, n) for m in all_gather(world, pack_mask(have))]
    todo, supply, missing = plan(world, have_by_rank)
    new, error = np.empty((0, n_roles)), None
    if missing.any():  # the same on every rank: all raise, or none
        _check_columns(dataset, head, spec, kw["split"])
    if world.size == 1:
        new = _score_rows(dataset, todo, head, spec, cache, world, **kw) if len(todo) else new
    else:
        try:  # every rank reaches the gather below, so an error on one rank leaves no other waiting
            new = _score_rows(dataset, todo, head, spec, cache, world, **kw) if len(todo) else new
        except Exception as e:  # noqa: BLE001 - re-raised on every rank after the gather
            error = e
    parts = all_gather(world, (supply, cached[supply], todo, None if error else new, _describe(error)))
    failed = [(rank, p[4]) for rank, p in enumerate(parts) if p[4] is not None]
    if error is not None:
        raise error
    if failed:
        rank, what = failed[0]
        raise RuntimeError(f"Reward head {spec.name!r} failed on rank {rank} while scoring the {kw['split']} dataset: "
                           f"{what} (the other ranks stop too; that rank's log has the traceback).")
    scores = np.empty((n, n_roles), dtype=np.float64)
    for sup, sup_scores, done, done_scores in (p[:4] for p in parts):
        scores[sup], scores[done] = sup_scores, done_scores
    report.status[spec.name] = "scored" if missing.any() else "cached"
    report.responses[spec.name] = len(todo) * n_roles
    if not (have.all() and cache.complete_on_disk):
        cache.save_complete(scores)
    return scores


def _describe(error: BaseException | None) -> str | None:
    return None if error is None else f"{type(error).__name__}: {error}"


def _check_columns(dataset: Dataset, head: RewardHead, spec: HeadSpec, split: str) -> None:
    missing = [c for c in head.required_columns() if c not in dataset.column_names]
    if missing:
        raise DataError(
            f"Reward head {spec.name!r} ({spec.type}) reads column(s) {missing}, which the {split} dataset does not "
            f"have. Columns: {sorted(dataset.column_names)}."
        )


def _score_rows(
    dataset: Dataset,
    todo: np.ndarray,
    head: RewardHead,
    spec: HeadSpec,
    cache: ChunkedScoreCache,
    world: World,
    *,
    split: str,
    tokenizer: Any,
    batch_size: int,
    num_proc: int | None = None,
    roles: tuple[str, ...] = ROLES,
) -> np.ndarray:
    """Score rows ``todo`` (sorted indices) block by block; each block is saved to the cache once scored.

    Text heads marked ``parallel_safe`` score blocks of at least ``PARALLEL_BLOCK`` rows in ``num_proc`` worker
    processes (a pool starts per block); other heads score ``batch_size`` rows per call."""
    parallel = bool(num_proc and num_proc > 1 and head.parallel_safe and len(todo) > batch_size)
    block = max(batch_size * num_proc * 4, PARALLEL_BLOCK) if parallel else batch_size
    out = np.empty((len(todo), len(roles)), dtype=np.float64)
    desc = f"Scoring the {split} dataset with {spec.name!r}" + (f" (rank 0's share of {world.size})"
                                                                  if world.size > 1 else "")
    with progress_bar(world, len(todo) * len(roles), desc) as bar:
        for lo in range(0, len(todo), block):
            rows = todo[lo : lo + block]
            if parallel:
                sub = dataset.select(rows, new_fingerprint=short_hash(f"{dataset._fingerprint}|{rows[0]}|{len(rows)}"))
                values = _score_parallel(sub, rows, head, spec, split, tokenizer, batch_size, num_proc, roles)
            else:  # read the rows without select(), whose fingerprint would hash the index list
                batch = dataset[rows.tolist()]
                values = np.asarray(score_batch(head, spec, batch, int(rows[0]), split, tokenizer, roles)).T
            out[lo : lo + len(rows)] = values
            cache.add_chunk(rows, values)
            bar.update(len(rows) * len(roles))
    return out


def _score_parallel(sub, rows, head, spec, split, tokenizer, batch_size, num_proc, roles) -> np.ndarray:
    """Text heads are pure CPU work: score a block of rows in ``num_proc`` worker processes."""

    def score_shard(batch: dict[str, list], indices: list[int]) -> dict[str, list[float]]:
        scores = score_batch(head, spec, batch, int(rows[indices[0]]), split, tokenizer, roles)
        return {f"_upo_{role}": values for role, values in zip(roles, scores, strict=True)}

    scored = sub.map(
        score_shard, batched=True, batch_size=batch_size, with_indices=True, num_proc=num_proc,
        remove_columns=sub.column_names, keep_in_memory=True, load_from_cache_file=False,
        new_fingerprint=short_hash(f"{getattr(sub, '_fingerprint', '')}|{head.fingerprint()}|parallel"),
    )
    return np.stack([np.asarray(scored[f"_upo_{role}"], dtype=np.float64) for role in roles], axis=1)


