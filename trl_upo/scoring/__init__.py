"""Scoring a preference dataset with reward heads, once, before training (step 1 of the objective).

Scores are stored as dataset columns ``upo_<head>_chosen`` and ``upo_<head>_rejected`` and cached on disk, keyed on
the dataset's fingerprint and the head's fingerprint, so a second identical run does not score again and adding a
head scores only that head.
"""

from __future__ import annotations

import logging
import math
import os
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
from ..heads._hf import LazyModelMixin
from .cache import ChunkedScoreCache
from .provenance import PROVENANCE_COLUMN, head_digest, recorded_scores, row_digests
from .provenance import record as record_provenance
from .shards import World, all_gather, current_world, pack_mask, plan, progress_bar, unpack_mask

logger = logging.getLogger(__name__)

RESPONSE_COLUMNS = ("chosen", "rejected")
#: The responses of a preference pair, in score-array column order.
ROLES = ("chosen", "rejected")
#: The one response of an unpaired (KTO) row.
UNPAIRED_ROLES = ("completion",)


#: Rows per cache block of text heads scored in worker processes (``num_proc > 1``): each block starts a pool.
PARALLEL_BLOCK = 50_000


def score_column(head_name: str, role: str) -> str:
    """Name of the dataset column holding ``head_name``'s scores of the ``role`` responses."""
    return f"upo_{head_name}_{role}"


def default_cache_dir() -> str:
    """Where scores are cached when ``upo_score_cache_dir`` is unset: ``trl_upo/scores`` under the HF cache home."""
    from datasets import config as ds_config

    return os.path.join(str(ds_config.HF_CACHE_HOME), "trl_upo", "scores")


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

def ensure_prompt(dataset: Dataset, roles: Sequence[str] = ROLES) -> Dataset:
    """Check the response columns and extract an implicit prompt the way DPOTrainer (and KTOTrainer) do.

    ``roles`` are the response columns: ``ROLES`` for preference pairs, ``UNPAIRED_ROLES`` for unpaired rows.
    """
    cols = set(dataset.column_names)
    if tuple(roles) != ROLES:
        missing = [c for c in ("prompt", *roles) if c not in cols]
        if missing:
            hint = (" Preference pairs (chosen/rejected) train with the DPO trainer (trainer: dpo), or unpair them first "
                    "(trl.data_utils.unpair_preference_dataset)." if {"chosen", "rejected"} <= cols else "")
            raise DataError(
                f"Unpaired data needs the columns 'prompt' and {', '.join(repr(r) for r in roles)}; this dataset has "
                f"no {missing}. Columns: {sorted(cols)}.{hint}"
            )
        return dataset
    missing = [c for c in RESPONSE_COLUMNS if c not in cols]
    if missing:
        hint = (" These are unpaired rows (completion, label): train them with UPOKTOTrainer (trainer: kto in a "
                "recipe)." if {"completion", "label"} <= cols else "")
        raise DataError(
            f"UPOTrainer needs a preference dataset with 'chosen' and 'rejected' columns (and 'prompt', or an "
            f"implicit prompt shared by both); this dataset has no {missing}. Columns: {sorted(cols)}.{hint}"
        )
    if "prompt" not in cols:
        from trl.data_utils import extract_prompt

        dataset = dataset.map(extract_prompt, desc="Extracting prompt")
    return dataset


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
            (one process scores everything) when no process group is initialised.
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
    new_columns: dict[str, np.ndarray] = {}
    recorded: dict[str, tuple[str, list[str]]] = {}
    # The tokenizer keys the scores of the heads that may read it (see reads_tokenizer).
    tok_key = Hasher.hash(tokenizer) if tokenizer is not None else "none"
    row_keys = _RowKeys(dataset, roles)
    if world.size > 1:
        _check_same_rows(world, row_keys, split)
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
            new_columns[col] = scores[:, j]
    for col, values in new_columns.items():
        if col in dataset.column_names:
            logger.info("Replacing existing column %r in the %s dataset with fresh scores.", col, split)
            dataset = dataset.remove_columns(col)
        dataset = dataset.add_column(col, values.tolist())
    if recorded:
        dataset = record_provenance(dataset, recorded)
    return dataset, report


def reads_tokenizer(head: RewardHead) -> bool:
    """Whether the head may read the trainer's tokenizer, which then keys its cached and recorded scores: a head's
    ``reads_tokenizer`` attribute when it has one; else False for model heads (they bring their own tokenizer) and
    True for any other head."""
    declared = getattr(head, "reads_tokenizer", None)
    if declared is not None:
        return bool(declared)
    return not isinstance(head, LazyModelMixin)


class _RowKeys:
    """Row digests for :mod:`~trl_upo.scoring.provenance`: the prompt, the responses and the columns a head reads
    (computed once per set of columns)."""

    def __init__(self, dataset: Dataset, roles: tuple[str, ...]) -> None:
        self.dataset, self.roles, self._memo = dataset, roles, {}

    def base(self) -> list[str]:
        """The digests of the prompt and the responses alone."""
        return self._digests(("prompt", *self.roles))

    def __call__(self, head: RewardHead) -> list[str]:
        extra = sorted(c for c in head.required_columns() if c in self.dataset.column_names)
        return self._digests(("prompt", *self.roles, *extra))

    def _digests(self, columns: tuple[str, ...]) -> list[str]:
        if columns not in self._memo:
            self._memo[columns] = row_digests(self.dataset, columns)
        return self._memo[columns]


def _recorded(dataset: Dataset, name: str, digest: str, keys: Any, cols: list[str], world: World):
    """The head's scores recorded in the dataset (``upo__scored_by``; ``keys()`` gives the row digests), or None.
    The ranks decide together: a rank alone in the scoring gathers would wait forever."""
    scores = recorded_scores(dataset, name, digest, keys(), cols) if PROVENANCE_COLUMN in dataset.column_names else None
    if world.size > 1 and not all(all_gather(world, scores is not None)):
        return None
    return scores


def _check_same_rows(world: World, row_keys: _RowKeys, split: str) -> None:
    """Every rank must hold the same rows in the same order: each scores a share of the row indices and the shares
    are put together by index. Raises the same ValueError on every rank when they differ."""
    mine = (len(row_keys.dataset), short_hash("|".join(row_keys.base())))
    everyone = all_gather(world, mine)
    if any(other != mine for other in everyone):
        sizes = sorted({n for n, _ in everyone})
        raise ValueError(
            f"The processes were given different {split} datasets (rows or their order differ; sizes {sizes}): "
            f"scoring splits the rows across processes by index and needs the same dataset, in the same order, on "
            f"every rank. Shuffle with a fixed seed (dataset.shuffle(seed=...)) or before launching, and select the "
            f"same rows on every rank."
        )


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
            sub = dataset.select(rows)
            if parallel:
                values = _score_parallel(sub, rows, head, spec, split, tokenizer, batch_size, num_proc, roles)
            else:
                values = np.asarray(_score_batch(head, spec, sub[:], int(rows[0]), split, tokenizer, roles)).T
            out[lo : lo + len(rows)] = values
            cache.add_chunk(rows, values)
            bar.update(len(rows) * len(roles))
    return out


def _score_parallel(sub, rows, head, spec, split, tokenizer, batch_size, num_proc, roles) -> np.ndarray:
    """Text heads are pure CPU work: score a block of rows in ``num_proc`` worker processes."""

    def score_shard(batch: dict[str, list], indices: list[int]) -> dict[str, list[float]]:
        scores = _score_batch(head, spec, batch, int(rows[indices[0]]), split, tokenizer, roles)
        return {f"_upo_{role}": values for role, values in zip(roles, scores, strict=True)}

    scored = sub.map(
        score_shard, batched=True, batch_size=batch_size, with_indices=True, num_proc=num_proc,
        remove_columns=sub.column_names, keep_in_memory=True, load_from_cache_file=False,
        new_fingerprint=short_hash(f"{getattr(sub, '_fingerprint', '')}|{head.fingerprint()}|parallel"),
    )
    return np.stack([np.asarray(scored[f"_upo_{role}"], dtype=np.float64) for role in roles], axis=1)


def call_head(
    head: RewardHead,
    name: str,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    role: str = "chosen",
    columns: dict[str, list[Any]] | None = None,
    tokenizer: Any = None,
    what: str = "responses",
) -> np.ndarray:
    """Score ``completions`` with ``head``: the one place where a head is called and its answer checked.

    Every caller (training-time scoring, the data builders, evaluation) goes through here, so a head's errors read
    the same everywhere.

    Args:
        head: the reward head.
        name: the head's name in messages (its spec name).
        prompts: the prompts, aligned with ``completions``.
        completions: the responses to score.
        role: passed to :meth:`~trl_upo.heads.RewardHead.score`.
        columns: the other dataset columns of these rows, by name.
        tokenizer: passed to the head.
        what: what is being scored, for messages (``"chosen responses of the train dataset (rows 0..)"``).

    Returns:
        ``float64`` array of ``len(completions)`` scores; a ``None`` from the head is NaN (callers reject non-finite
        scores with :func:`check_finite`, naming the rows).

    Raises:
        ValueError: the head raised ValueError (re-raised naming the head and ``what``), or returned a wrong number
            of scores. Other exceptions get a note naming the head and ``what``.
    """
    try:
        values = head.score(prompts, completions, role=role, columns=columns or {}, tokenizer=tokenizer)
    except ValueError as e:
        raise ValueError(f"Reward head {name!r} failed on the {what}: {e}") from e
    except Exception as e:
        e.add_note(f"(while reward head {name!r} scored the {what})")
        raise
    values = list(values)
    if len(values) != len(completions):
        raise ValueError(
            f"Reward head {name!r} returned {len(values)} scores for {len(completions)} {what}; it must return one "
            f"per response."
        )
    return np.array([float("nan") if v is None else float(v) for v in values], dtype=np.float64)


def check_finite(scores: np.ndarray, name: str, where: str, label: Any = None) -> None:
    """Reject non-finite scores, naming the head, where they came from and up to five of them.

    Args:
        scores: the scores, any shape.
        name: the head's name.
        where: where the scores came from (``"the train dataset"``).
        label: ``label(index_tuple) -> str`` names one score in the message (default: its index).

    Raises:
        ValueError: some score is NaN or infinite. UPO never drops a response silently.
    """
    bad = ~np.isfinite(scores)
    if not bad.any():
        return
    label = label or (lambda idx: f"index {idx[0] if len(idx) == 1 else idx}")
    examples = ", ".join(f"{label(idx)}={scores[idx]}" for idx in list(zip(*np.nonzero(bad)))[:5])
    raise DataError(
        f"Reward head {name!r} gave {int(bad.sum())} non-finite score(s) on {where} ({examples}). UPO never drops "
        f"responses silently: fix the head or the data (a None from a reward function is read as NaN), or remove "
        f"those rows from the data."
    )


def _score_batch(
    head: RewardHead,
    spec: HeadSpec,
    batch: dict[str, list],
    start: int,
    split: str,
    tokenizer: Any,
    roles: tuple[str, ...] = ROLES,
) -> list[list[float]]:
    """Score the responses of each role (chosen, rejected; or completion) of one batch of rows (``start`` is the first
    row's index); one list of scores per role."""
    columns = {k: v for k, v in batch.items() if k not in ("prompt", *roles)}
    result = []
    for role in roles:
        what = f"{role} responses of the {split} dataset (rows {start}..)"
        scores = call_head(
            head, spec.name, batch["prompt"], batch[role], role=role, columns=columns, tokenizer=tokenizer, what=what
        )
        result.append(scores.tolist())
    return result


def fit_head_statistics(
    dataset: Dataset, specs: Sequence[HeadSpec], default_mode: str, roles: Sequence[str] = ROLES
) -> list[dict]:
    """Eq. (2) statistics of every head over the training split (the responses of all ``roles`` pooled)."""
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
