"""Scoring a preference dataset with reward heads, once, before training (step 1 of the objective).

Scores are stored as dataset columns ``upo_<head>_chosen`` and ``upo_<head>_rejected`` and cached on disk, keyed on
the dataset's fingerprint and the head's fingerprint, so a second identical run does not score again and adding a
head scores only that head.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import Dataset
from datasets.fingerprint import Hasher

from .fingerprints import short_hash
from .heads import HeadSpec, RewardHead

logger = logging.getLogger(__name__)

RESPONSE_COLUMNS = ("chosen", "rejected")
#: The responses of a preference pair, in score-array column order.
ROLES = ("chosen", "rejected")
#: The one response of an unpaired (KTO) row.
UNPAIRED_ROLES = ("completion",)


def score_column(head_name: str, role: str) -> str:
    """Name of the dataset column holding ``head_name``'s scores of the ``role`` responses."""
    return f"upo_{head_name}_{role}"


def default_cache_dir() -> str:
    """Where scores are cached when ``upo_score_cache_dir`` is unset: ``trl_upo/scores`` under the HF cache home."""
    from datasets import config as ds_config

    return os.path.join(str(ds_config.HF_CACHE_HOME), "trl_upo", "scores")


@dataclass
class ScoreReport:
    """What :func:`score_dataset` did, per head: ``"cached"`` or ``"scored"``."""

    status: dict[str, str]


def ensure_prompt(dataset: Dataset, roles: Sequence[str] = ROLES) -> Dataset:
    """Check the response columns and extract an implicit prompt the way DPOTrainer (and KTOTrainer) do.

    ``roles`` are the response columns: ``ROLES`` for preference pairs, ``UNPAIRED_ROLES`` for unpaired rows.
    """
    cols = set(dataset.column_names)
    if tuple(roles) != ROLES:
        missing = [c for c in ("prompt", *roles) if c not in cols]
        if missing:
            raise ValueError(
                f"Unpaired data needs the columns 'prompt' and {', '.join(repr(r) for r in roles)}; this dataset has "
                f"no {missing}. Columns: {sorted(cols)}."
            )
        return dataset
    missing = [c for c in RESPONSE_COLUMNS if c not in cols]
    if missing:
        raise ValueError(
            f"UPOTrainer needs a preference dataset with 'chosen' and 'rejected' columns (and 'prompt', or an "
            f"implicit prompt shared by both); this dataset has no {missing}. Columns: {sorted(cols)}."
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
) -> tuple[Dataset, ScoreReport]:
    """Score every response (each of ``roles``: chosen and rejected by default, ``UNPAIRED_ROLES`` for unpaired data)
    with every head; return the dataset with the score columns ``upo_<head>_<role>``.

    Heads marked ``parallel_safe`` (the text heads) score in ``num_proc`` processes when ``num_proc > 1``; model
    heads batch on one device.

    Raises ValueError, naming the head, the split, the row and the fix, on a non-finite score or a wrong count.
    """
    roles = tuple(roles)
    dataset = ensure_prompt(dataset, roles)
    fingerprint = getattr(dataset, "_fingerprint", None)
    cache_dir = cache_dir or default_cache_dir()
    status: dict[str, str] = {}
    new_columns: dict[str, list[float]] = {}
    # The tokenizer is part of the key: a head may count tokens, and the function head passes completion_ids.
    tok_key = Hasher.hash(tokenizer) if (use_cache and fingerprint and tokenizer is not None) else "none"
    for head, spec in zip(heads, specs, strict=True):
        cache_file = None
        if use_cache and fingerprint:
            role_key = "" if roles == ROLES else f"|{','.join(roles)}"
            key = short_hash(f"{fingerprint}|{head.fingerprint()}|{len(dataset)}|{tok_key}{role_key}")
            cache_file = os.path.join(cache_dir, f"{spec.name}-{key}.npy")
        scores = None
        if cache_file and os.path.exists(cache_file):
            try:
                scores = np.load(cache_file)
                if scores.shape != (len(dataset), len(roles)):
                    scores = None
            except (OSError, ValueError):
                scores = None
        if scores is not None:
            status[spec.name] = "cached"
        else:
            scores = _score_with_head(
                dataset, head, spec, split=split, tokenizer=tokenizer, batch_size=batch_size, num_proc=num_proc,
                roles=roles,
            )
            status[spec.name] = "scored"
            if cache_file:
                os.makedirs(cache_dir, exist_ok=True)
                tmp = f"{cache_file}.{os.getpid()}.tmp.npy"
                np.save(tmp, scores)
                os.replace(tmp, cache_file)
        check_finite(scores, spec.name, f"the {split} dataset", lambda idx: f"row {idx[0]} {roles[idx[1]]}")
        for j, role in enumerate(roles):
            new_columns[score_column(spec.name, role)] = scores[:, j].tolist()
    for col, values in new_columns.items():
        if col in dataset.column_names:
            logger.info("Replacing existing column %r in the %s dataset with fresh scores.", col, split)
            dataset = dataset.remove_columns(col)
        dataset = dataset.add_column(col, values)
    return dataset, ScoreReport(status)


def _score_with_head(
    dataset: Dataset,
    head: RewardHead,
    spec: HeadSpec,
    *,
    split: str,
    tokenizer: Any,
    batch_size: int,
    num_proc: int | None = None,
    roles: tuple[str, ...] = ROLES,
) -> np.ndarray:
    n = len(dataset)
    missing = [c for c in head.required_columns() if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"Reward head {spec.name!r} ({spec.type}) reads column(s) {missing}, which the {split} dataset does not "
            f"have. Columns: {sorted(dataset.column_names)}."
        )
    if num_proc and num_proc > 1 and head.parallel_safe and n > batch_size:
        # Text heads are pure CPU work: score shards of the dataset in `num_proc` worker processes.
        def score_shard(batch: dict[str, list], indices: list[int]) -> dict[str, list[float]]:
            scores = _score_batch(head, spec, batch, indices[0], split, tokenizer, roles)
            return {f"_upo_{role}": values for role, values in zip(roles, scores, strict=True)}

        scored = dataset.map(
            score_shard,
            batched=True,
            batch_size=batch_size,
            with_indices=True,
            num_proc=num_proc,
            remove_columns=dataset.column_names,
            keep_in_memory=True,
            load_from_cache_file=False,
            new_fingerprint=short_hash(f"{getattr(dataset, '_fingerprint', '')}|{head.fingerprint()}|parallel"),
            desc=f"Scoring the {split} dataset with {spec.name!r}",
        )
        return np.stack([np.asarray(scored[f"_upo_{role}"], dtype=np.float64) for role in roles], axis=1)
    out = np.empty((n, len(roles)), dtype=np.float64)
    for start in range(0, n, batch_size):
        scores = _score_batch(head, spec, dataset[start : start + batch_size], start, split, tokenizer, roles)
        for j, values in enumerate(scores):
            out[start : start + len(values), j] = values
    return out


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
    raise ValueError(
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
    from .objective import fit_normalization

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
