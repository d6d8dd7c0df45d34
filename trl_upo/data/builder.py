"""The skeleton every pair builder shares, so that a builder only says what is specific to it.

A build run (:func:`run_builder`) is: input checked before any model loads (:func:`check_column`,
:func:`check_output`), a fingerprint of the settings and the data (:func:`run_fingerprint`) that names the run's
shard store, every batch not yet stored run through the builder's ``process`` and stored
(:func:`~trl_upo.data.io.run_in_shards`), the builder's summary (warnings), the shards turned into the output
(:func:`~trl_upo.data.io.finish`), and whatever the builder loaded released, also on failure or interruption.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..fingerprints import short_hash
from ..formats import DataError
from .io import OutputSettings, dataset_digest, finish, open_store, run_in_shards

#: ``process(rows, batch_index, first_row_index) -> output rows`` of one batch.
Process = Callable[[list[dict[str, Any]], int, int], list[dict[str, Any]]]


def check_column(dataset: Any, column: str, kind: str) -> None:
    """Fail when ``dataset`` has no column ``column``, suggesting the closest name.

    Args:
        dataset: a ``datasets.Dataset``.
        column: the column the settings name.
        kind: what the column holds, for the message (``"candidate"``, ``"response"``).

    Raises:
        ValueError: naming the column, the closest existing one and all of them.
    """
    names = dataset.column_names
    if column not in names:
        close = difflib.get_close_matches(column, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise DataError(f"The dataset has no {kind} column {column!r}.{hint} Columns: {names}.")


def check_output(
    dataset: Any, output: OutputSettings | None, *, consumed: Iterable[str | None], produced: Iterable[str], hint: str
) -> list[str]:
    """Check that the output can be written: no input column it would overwrite, no existing output (unless
    ``overwrite``).

    Args:
        dataset: the input ``datasets.Dataset``.
        output: where the pairs go, or None.
        consumed: the input columns the builder reads (they are not passed through).
        produced: the columns the builder writes.
        hint: the builder's own way out of a clash, appended to the message (``", or rank them as ..."``).

    Returns:
        The passed-through input columns, in the dataset's order.

    Raises:
        ValueError: naming the clashing columns, or the existing output.
    """
    consumed = set(consumed)
    passthrough = [c for c in dataset.column_names if c not in consumed]
    if output is not None and output.unpaired:  # unpaired rows add these two
        produced = [*produced, "completion", "label"]
    clash = sorted(set(passthrough) & set(produced))
    if clash:
        raise DataError(
            f"The input dataset has column(s) {clash}, which the output would overwrite. Rename or remove them first "
            f"(Dataset.rename_column / remove_columns){hint}."
        )
    if output is not None:
        output.check_writable()
    return passthrough


def run_fingerprint(kind: str, settings: dict[str, Any], dataset: Any) -> str:
    """The fingerprint of a run: the builder, its settings and the input data's content (so a resume in a new
    process recognises its shards, and a changed setting or input is never mixed with them).

    Args:
        kind: the builder (``"rank"``, ``"critique"``).
        settings: everything that changes the output, JSON-serialisable (other values count by their ``repr``).
        dataset: the input ``datasets.Dataset``.

    Returns:
        A short hex digest.
    """
    return short_hash(f"{kind}|{json.dumps(settings, sort_keys=True, default=repr)}|{dataset_digest(dataset)}")


def run_builder(
    dataset: Any,
    output: OutputSettings | None,
    *,
    fingerprint: str,
    batch_size: int,
    process: Process,
    desc: str,
    on_batch: Callable[[int], None] | None = None,
    release: Sequence[Any] = (),
    summary: Callable[[], None] | None = None,
) -> Any:
    """Run a builder's ``process`` over every batch not yet stored, then write the output.

    Args:
        dataset: the checked input ``datasets.Dataset``.
        output: where to write the pairs and the resumable shards; None keeps shards in a temporary directory.
        fingerprint: the run's :func:`run_fingerprint`.
        batch_size: rows per batch (and per shard).
        process: builds one batch's output rows (see :data:`Process`).
        desc: the progress bar's label.
        on_batch: called with each batch's index once it is stored.
        release: what the builder loaded (heads, generators; None entries are skipped): ``release()`` is called on
            each when the run ends, finished or not.
        summary: called once every batch is stored, before the output is written (the builder's warnings).

    Returns:
        The output ``Dataset``.
    """
    try:
        store, tmp = open_store(output, fingerprint, math.ceil(len(dataset) / batch_size))
        try:
            run_in_shards(
                dataset,
                process,
                batch_size=batch_size,
                store=store,
                desc=desc,
                progress=output.progress if output is not None else True,
                on_batch=on_batch,
            )
            if summary is not None:
                summary()
            return finish(store, output, "pairs")
        finally:
            if tmp is not None:
                tmp.cleanup()
    finally:
        for item in release:
            if item is not None:
                item.release()
