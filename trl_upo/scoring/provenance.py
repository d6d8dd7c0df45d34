"""Score columns that say which head wrote them: "score once, train many".

``score_dataset(..., record=True)`` (and ``trl-upo score --output``) adds the string column ``upo__scored_by``: per
row, a small JSON object with a digest of the row's prompt and responses and, per head name, a digest of the head's
fingerprint (its class, the parameters that decide its scores, its model's content), the tokenizer and the response
roles. A plain column survives every way a dataset is stored (``save_to_disk``, JSON lines, Parquet, CSV, the Hub).
When a dataset that carries it is scored again, a head whose digest matches on every row, with rows unchanged, takes
its scores from the columns: the head is never built into a model, never loaded, never run.

A stream (:func:`~trl_upo.scoring.stream.score_stream`) applies the same rule batch by batch
(:func:`recorded_batch_scores`): a batch whose every row records the head's digest, with rows unchanged, takes its
scores from the columns and the head is not called for it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..fingerprints import short_hash, stable_repr

#: The column that records which head wrote each score column (one JSON string per row).
PROVENANCE_COLUMN = "upo__scored_by"


def head_digest(head: Any, tok_key: str, roles: Sequence[str]) -> str:
    """What must match for a head's recorded scores to be reused: its fingerprint, the tokenizer, the roles."""
    return short_hash(f"{head.fingerprint()}|{tok_key}|{','.join(roles)}")


def row_digests(dataset: Any, columns: Sequence[str]) -> list[str]:
    """One short digest per row of the values in ``columns`` (the prompt, the responses, columns a head reads)."""
    data = [dataset[c] for c in columns]
    return [short_hash(stable_repr([col[i] for col in data])) for i in range(len(dataset))]


def _entries(dataset: Any) -> list[dict] | None:
    names = dataset.column_names if hasattr(dataset, "column_names") else list(dataset)
    if PROVENANCE_COLUMN not in names:
        return None
    out = []
    for raw in dataset[PROVENANCE_COLUMN]:
        try:
            entry = json.loads(raw) if isinstance(raw, str) else None
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            return None
        out.append(entry)
    return out


def recorded_scores(dataset: Any, name: str, digest: str, rows: list[str], score_columns: Sequence[str]) -> Any:
    """The ``(n_rows, n_roles)`` scores of head ``name`` recorded in the dataset, or None when any row lacks them,
    records another digest for the head, or has changed since it was scored (``rows``: the current row digests,
    including the columns the head reads)."""
    if any(c not in dataset.column_names for c in score_columns) or len(dataset) == 0:
        return None
    entries = _entries(dataset)
    if entries is None:
        return None
    for entry, row in zip(entries, rows, strict=True):
        if entry.get("heads", {}).get(name) != [digest, row]:
            return None
    try:
        return np.stack([np.asarray(dataset[c], dtype=np.float64) for c in score_columns], axis=1)
    except (TypeError, ValueError):
        return None


def batch_row_digests(batch: dict[str, list], columns: Sequence[str]) -> list[str]:
    """:func:`row_digests` of the rows of one batch of a stream (a dict of columns)."""
    return [short_hash(stable_repr([batch[c][i] for c in columns])) for i in range(len(batch[columns[0]]))]


def recorded_batch_scores(batch: dict[str, list], name: str, digest: str, columns: Sequence[str],
                          score_columns: Sequence[str]) -> Any:
    """The ``(n_roles, n_rows)`` scores of head ``name`` recorded in a batch of a stream (a dict of columns), or None:
    the rule of :func:`recorded_scores`, on the rows of one batch (``columns``: what the row digest covers, as
    :func:`row_digests` takes them: the prompt, the responses, the columns the head reads)."""
    if PROVENANCE_COLUMN not in batch or any(c not in batch for c in score_columns):
        return None
    entries = _entries({PROVENANCE_COLUMN: batch[PROVENANCE_COLUMN]})
    if not entries:
        return None
    for entry, row in zip(entries, batch_row_digests(batch, columns), strict=True):
        if entry.get("heads", {}).get(name) != [digest, row]:
            return None
    try:
        values = np.asarray([batch[c] for c in score_columns], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return values if np.isfinite(values).all() else None


def record_batch(batch: dict[str, list], recorded: dict[str, tuple[str, list[str]]]) -> list[str]:
    """The ``upo__scored_by`` values of one batch of a stream: :func:`record`'s, row by row."""
    n = len(next(iter(recorded.values()))[1]) if recorded else 0
    entries = _entries({PROVENANCE_COLUMN: batch[PROVENANCE_COLUMN]}) if PROVENANCE_COLUMN in batch else None
    return [_entry_json((entries or [{}] * n)[i], recorded, i) for i in range(n)]


def _entry_json(entry: dict, recorded: dict[str, tuple[str, list[str]]], i: int) -> str:
    heads = dict(entry.get("heads", {}))
    for name, (digest, rows) in recorded.items():
        heads[name] = [digest, rows[i]]
    return json.dumps({"heads": heads}, sort_keys=True, separators=(",", ":"))


def record(dataset: Any, recorded: dict[str, tuple[str, list[str]]]) -> Any:
    """The dataset with ``upo__scored_by`` saying that head ``name`` wrote its columns (``recorded[name]``:
    ``(head digest, row digests)``); entries of other heads already recorded are kept."""
    entries = _entries(dataset) or [{} for _ in range(len(dataset))]
    values = [_entry_json(entry, recorded, i) for i, entry in enumerate(entries)]
    if PROVENANCE_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(PROVENANCE_COLUMN)
    return dataset.add_column(PROVENANCE_COLUMN, values)
