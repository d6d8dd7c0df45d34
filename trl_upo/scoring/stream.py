"""Scoring a stream (``datasets.IterableDataset``) lazily: batch by batch, as the trainer reads it.

:func:`score_stream` returns a stream whose rows carry the same score columns ``upo_<head>_<role>`` as
:func:`~trl_upo.scoring.score_dataset` gives a map-style dataset, computed by ``IterableDataset.map(batched=True)``
when a batch of rows is read: step 1 starts after one batch is scored, not after the whole split. The heads are
called exactly as for a map-style dataset (:func:`~trl_upo.scoring.calls.score_batch`: one call per role and batch
of ``batch_size`` rows; model heads batch on their device and halve their batch on a CUDA out-of-memory error), and a
non-finite score raises naming the head and the row (its position in the stream as this process reads it).

Scores recorded by ``trl-upo score --output`` (the ``upo__scored_by`` column, :mod:`~trl_upo.scoring.provenance`)
are reused as for a map-style dataset, batch by batch: a batch whose every row records the same head (same digest:
its fingerprint, the tokenizer, the roles) and is unchanged takes its scores from the score columns, and the head is
not called for it; any other batch is scored.

The score cache of a stream is keyed on the content of each batch (not on row indices: a stream has no length and
no fingerprint that names its rows): a re-read of the same stream with the same batch size (a second run, an
evaluation) loads each batch's scores instead of running the head. It applies to heads that are not
``parallel_safe``: model and function heads. The text heads (length, lexicon, readability) score a batch faster than
its content can be hashed and its file written, so they are not cached.

In a distributed run each rank scores only the rows it trains on, as accelerate shares the stream out (TRL reads a
streamed train set with ``dispatch_batches=False``): with at least as many data files (shards) as processes, each rank
reads its own files and scores all it reads; with fewer, every rank reads the whole stream and keeps ``batch_size``
rows of every ``batch_size x world_size`` (accelerate's ``IterableDatasetShard``), and :class:`RankShare` tells the
scoring which ones, so that each rank scores its own rows only (plus the first ``batch_size x world_size`` rows of the
stream, which accelerate may reuse to fill the last batch). No collective either way.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import Features, IterableDataset, Value
from datasets.fingerprint import Hasher

from ..formats import DataError
from ..heads import HeadSpec, RewardHead
from .cache import default_cache_dir, untrusted_reason, warn_untrusted, warn_unwritable
from .calls import check_finite, reads_tokenizer, score_batch
from .columns import ROLES, missing_columns_error, score_column
from .provenance import PROVENANCE_COLUMN, batch_row_digests, head_digest, record_batch, recorded_batch_scores


def score_stream(
    stream: IterableDataset,
    heads: Sequence[RewardHead],
    specs: Sequence[HeadSpec],
    *,
    split: str = "train",
    tokenizer: Any = None,
    batch_size: int = 256,
    roles: Sequence[str] = ROLES,
    cache_dir: str | None = None,
    use_cache: bool = True,
    record: bool = False,
    share: RankShare | None = None,
) -> IterableDataset:
    """The stream with the score columns ``upo_<head>_<role>`` added, computed lazily ``batch_size`` rows at a time.

    Args:
        stream: the rows: ``prompt`` (optional for pairs: an implicit prompt is extracted as DPOTrainer does),
            ``chosen`` and ``rejected`` (``roles=ROLES``) or ``completion`` (``roles=UNPAIRED_ROLES``), and the
            columns the heads read.
        heads: the built heads.
        specs: their specs, in the same order.
        split: the split's name, for messages.
        tokenizer: passed to the heads (the policy's).
        batch_size: rows per head call (``upo_score_batch_size``).
        roles: the response columns.
        cache_dir: the score cache's directory (see the module docstring: model and function heads only).
        use_cache: whether to read and write it.
        record: add the ``upo__scored_by`` column to every batch, as ``score_dataset(record=True)`` does
            (``trl-upo score --output`` from a stream), so that a later read reuses the scores.
        share: the stream positions this process keeps (:class:`RankShare`, :func:`rank_share`): only those rows
            are scored, the others get NaN score columns (accelerate drops them before this process's collator).
            None: every row is scored.

    Returns:
        An ``IterableDataset``; nothing is scored until it is iterated. Its features are the stream's plus one
        ``float64`` per score column when the stream's features are known.

    Raises:
        DataError: at once when the stream's columns are known and a response column (or a column a head reads) is
            missing; else when the first batch is read. A non-finite score raises when its batch is read.
    """
    roles = tuple(roles)
    if record and share is not None:
        raise ValueError("score_stream: record=True records every row as scored; it cannot take a share of the rows.")
    names = stream.column_names
    if names is not None:
        _check_columns(set(names), heads, specs, roles, split)
    tok_key = Hasher.hash(tokenizer) if tokenizer is not None else "none"
    scorer = _BatchScorer(
        heads=list(heads), specs=list(specs), split=split, tokenizer=tokenizer, roles=roles, share=share, record=record,
        digests=[head_digest(h, tok_key if reads_tokenizer(h) else "unused", roles) for h in heads],
        cache=StreamCache(cache_dir or default_cache_dir(), enabled=use_cache), checked=names is not None,
    )
    features = None
    if stream.features is not None and "prompt" in stream.features:
        extra = {score_column(s.name, r): Value("float64") for s in specs for r in roles}
        extra.update({PROVENANCE_COLUMN: Value("string")} if record else {})
        features = Features({**{k: v for k, v in stream.features.items() if k not in extra}, **extra})
    return stream.map(scorer, batched=True, batch_size=batch_size, with_indices=True, features=features)


@dataclass
class _BatchScorer:
    """The function ``score_stream`` maps over the stream: one batch of rows in, the batch with its scores out."""

    heads: list[RewardHead]
    specs: list[HeadSpec]
    split: str
    tokenizer: Any
    roles: tuple[str, ...]
    share: RankShare | None
    record: bool
    digests: list[str]
    cache: StreamCache
    checked: bool

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        roles = self.roles
        if not self.checked:
            _check_columns(set(batch), self.heads, self.specs, roles, self.split)
            self.checked = True
        batch = _with_prompt(batch, roles)
        mine = None if self.share is None else [j for j, i in enumerate(indices) if self.share(i)]
        part = batch if mine is None else {k: [v[j] for j in mine] for k, v in batch.items()}
        part_indices = indices if mine is None else [indices[j] for j in mine]
        recorded = {}
        for head, spec, digest in zip(self.heads, self.specs, self.digests, strict=True):
            values = self.scores(part, part_indices, head, spec, digest)
            for role, row in zip(roles, values, strict=True):
                batch[score_column(spec.name, role)] = _spread(row, mine, len(indices))
            if self.record:
                recorded[spec.name] = (digest, batch_row_digests(batch, _digest_columns(batch, head, roles)))
        if recorded:
            batch[PROVENANCE_COLUMN] = record_batch(batch, recorded)
        return batch

    def scores(self, part: dict[str, list], indices: list[int], head: RewardHead, spec: HeadSpec,
               digest: str) -> np.ndarray:
        """The ``(n_roles, n_rows)`` scores of the rows to score: recorded in the rows, cached, or from the head."""
        roles = self.roles
        if not indices:
            return np.empty((len(roles), 0))
        values = _recorded(part, head, spec.name, digest, roles)
        if values is None and not head.parallel_safe:
            values = self.cache.load(spec.name, digest, part, head, roles)
        if values is None:
            values = np.asarray(score_batch(head, spec, part, indices[0], self.split, self.tokenizer, roles),
                                dtype=float)
            check_finite(values, spec.name, f"the {self.split} stream",
                         lambda idx: f"row {indices[idx[1]]} {roles[idx[0]]}")
            if not head.parallel_safe:
                self.cache.save(spec.name, digest, part, head, roles, values)
        return values


def _spread(values: np.ndarray, mine: list[int] | None, n: int) -> list[float]:
    """A score column of the whole batch from the scores of the rows this process scored (NaN for the others)."""
    if mine is None:
        return values.tolist()
    out = np.full(n, np.nan)
    out[mine] = values
    return out.tolist()


def _recorded(batch: dict[str, list], head: RewardHead, name: str, digest: str, roles: tuple[str, ...]) -> Any:
    """The head's scores recorded in this batch by ``trl-upo score --output`` (``upo__scored_by``), or None."""
    return recorded_batch_scores(batch, name, digest, _digest_columns(batch, head, roles),
                                 [score_column(name, r) for r in roles])


def _digest_columns(batch: dict[str, list], head: RewardHead, roles: tuple[str, ...]) -> tuple[str, ...]:
    """What a row's provenance digest covers: the prompt, the responses, the columns the head reads."""
    return ("prompt", *roles, *sorted(c for c in head.required_columns() if c in batch))


def _check_columns(cols: set[str], heads: Sequence[RewardHead], specs: Sequence[HeadSpec], roles: tuple[str, ...],
                   split: str) -> None:
    error = missing_columns_error(cols, roles)
    if error is not None:
        raise error
    for head, spec in zip(heads, specs, strict=True):
        missing = [c for c in head.required_columns() if c not in cols]
        if missing:
            raise DataError(
                f"Reward head {spec.name!r} ({spec.type}) reads column(s) {missing}, which the {split} stream does "
                f"not have. Columns: {sorted(cols)}."
            )


def _with_prompt(batch: dict[str, list], roles: tuple[str, ...]) -> dict[str, list]:
    """The batch with an implicit prompt extracted (preference pairs without ``prompt``), as DPOTrainer does."""
    if "prompt" in batch or roles != ROLES:
        return batch
    from trl.data_utils import extract_prompt

    rows = [extract_prompt({"chosen": c, "rejected": r}) for c, r in zip(batch["chosen"], batch["rejected"],
                                                                         strict=True)]
    return {**batch, **{k: [row[k] for row in rows] for k in ("prompt", "chosen", "rejected")}}


class StreamCache:
    """Scores of stream batches on disk, keyed on the head's digest and the content of the batch (its prompts,
    responses and the columns the head reads): ``<cache_dir>/stream/<head>-<key>.npy``. A directory that cannot be
    written gives one warning and scoring goes on uncached."""

    def __init__(self, cache_dir: str, enabled: bool = True) -> None:
        self.cache_dir, self.enabled = cache_dir, enabled
        self.dir = os.path.join(cache_dir, "stream")

    def path(self, name: str, digest: str, batch: dict[str, list], head: RewardHead, roles: tuple[str, ...]) -> str:
        """The file of this batch's scores by this head."""
        columns = ("prompt", *roles, *sorted(c for c in head.required_columns() if c in batch))
        content = json.dumps([batch[c] for c in columns], sort_keys=True, default=repr).encode()
        key = hashlib.sha256(digest.encode() + b"|" + content).hexdigest()[:24]
        return os.path.join(self.dir, f"{name}-{key}.npy")

    def trusted(self) -> bool:
        """Whether the cache directory can be trusted (as the map-style cache judges it); else warn once and
        disable: planted files in a directory others can write are never read."""
        for path in (self.cache_dir, self.dir):
            reason = untrusted_reason(path)
            if reason is not None:
                warn_untrusted(self.cache_dir, reason)
                self.enabled = False
                return False
        return True

    def load(self, name: str, digest: str, batch: dict, head: RewardHead, roles: tuple[str, ...]) -> Any:
        """The cached ``(n_roles, n_rows)`` scores of this batch, or None."""
        if not self.enabled or not self.trusted():
            return None
        path = self.path(name, digest, batch, head, roles)
        if os.path.islink(path) or untrusted_reason(path) is not None:
            return None
        try:
            values = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        n = len(batch[roles[0]])
        return values if values.shape == (len(roles), n) and np.isfinite(values).all() else None

    def save(self, name: str, digest: str, batch: dict, head: RewardHead, roles: tuple[str, ...],
             values: np.ndarray) -> None:
        """Save this batch's scores (atomically: written under a temporary name, then renamed)."""
        if not self.enabled or not self.trusted():
            return
        path = self.path(name, digest, batch, head, roles)
        tmp = f"{path}.{os.getpid()}.tmp.npy"
        try:
            os.makedirs(self.dir, exist_ok=True)
            np.save(tmp, np.asarray(values, dtype=np.float64))
            os.replace(tmp, path)
        except OSError as e:
            warn_unwritable(self.cache_dir, e)
            self.enabled = False


@dataclass(frozen=True)
class RankShare:
    """The stream positions one process keeps when accelerate shares out a stream with fewer data files than processes
    (``IterableDatasetShard``, ``dispatch_batches=False``): of every group of ``group`` rows, the ``per_rank`` rows
    from ``rank * per_rank``; and every row of the first group, which accelerate repeats to fill a last incomplete
    batch (on any rank). Positions count the rows of the stream as this process reads it, from 0."""

    rank: int
    per_rank: int
    group: int

    def __call__(self, position: int) -> bool:
        return position < self.group or (position % self.group) // self.per_rank == self.rank


def rank_share(stream: IterableDataset, *, world_size: int, rank: int, batch_size: int, split_batches: bool = False,
               dispatch_batches: bool | None = False) -> RankShare | None:
    """Which rows of ``stream`` this process trains on (or evaluates), as accelerate's ``prepare_data_loader`` shares
    it out; None when the process keeps every row it reads (so it scores all of them).

    Args:
        stream: the stream, as the trainer will read it.
        world_size: the number of processes (``args.world_size``).
        rank: this process's index (``args.process_index``).
        batch_size: the per-device batch size of the dataloader that reads it (train or eval).
        split_batches: ``args.accelerator_config.split_batches``.
        dispatch_batches: ``args.accelerator_config.dispatch_batches`` as the dataloader will see it: TRL sets it to
            False for a streamed train set. True or None (accelerate then dispatches a stream from the main process,
            which reads and scores every row): None is returned.

    Returns:
        A :class:`RankShare`, or None: one process; batches dispatched from the main process; or at least as many
        data files as processes, when accelerate gives each process its own files (``IterableDataset.shard``).
    """
    if world_size <= 1 or dispatch_batches is not False:
        return None
    if not split_batches and (stream.n_shards > world_size
                              or (stream.n_shards == world_size and accelerate_shards_files_at(world_size))):
        return None
    if split_batches:
        return RankShare(rank=rank, per_rank=batch_size // world_size, group=batch_size)
    return RankShare(rank=rank, per_rank=batch_size, group=batch_size * world_size)


@functools.lru_cache(maxsize=None)
def accelerate_shards_files_at(world_size: int) -> bool:
    """Whether the installed accelerate gives each process its own data files when a stream has exactly
    ``world_size`` of them (accelerate 1.14 and later: ``n_shards >= num_processes``; earlier: ``>``, so the stream is
    then read whole by every process and shared out row by row). Found by asking ``prepare_data_loader`` itself, on
    a two-row probe stream, not by a version number."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    def rows(shard):
        yield {"x": shard}

    probe = IterableDataset.from_generator(rows, gen_kwargs={"shard": list(range(world_size))})
    loader = prepare_data_loader(DataLoader(probe, batch_size=1), num_processes=world_size, process_index=0,
                                 dispatch_batches=False, put_on_device=False)
    return isinstance(loader.dataset, IterableDataset)
