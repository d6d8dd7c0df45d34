"""The one dataset loader of trl-upo: every command (``train``, ``score``, ``eval``, ``build-pairs``) and the data
builders' input read datasets through here, so a source means the same thing everywhere.

A *source* is one of:

- a ``.json`` / ``.jsonl`` / ``.parquet`` / ``.csv`` file (:data:`FILE_BUILDERS`): one split, whichever split is
  asked for;
- a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``;
- any other directory or a Hub dataset name, for ``datasets.load_dataset`` (with an optional configuration name);
- ``upo://<path>``: a packaged asset (:mod:`trl_upo.resources`), then one of the above.

:func:`load_splits` returns every split (what a training recipe needs); :func:`load_split` returns one, optionally
without some columns and cut to its first rows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..resources import PATH_PREFIXES

#: File extension -> ``datasets`` builder: the file types a source may be.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DatasetLoadError(ValueError):
    """A dataset source that cannot be loaded as asked; the message names the problem and the fix."""


def _resolve(source: Any) -> str:
    from trl_upo.resources import resolve_resource

    if not isinstance(source, (str, os.PathLike)) or not str(source):
        raise DatasetLoadError(
            f"No dataset given (got {source!r}): give a .json/.jsonl/.parquet/.csv file, a directory (save_to_disk "
            f"or data files), a Hub dataset name, or upo://<asset>."
        )
    path = resolve_resource(os.fspath(source))
    return os.path.expanduser(path) if path.startswith("~") else path  # `--key=~/x` and YAML leave `~` as it is


def _is_saved(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, name)) for name in ("dataset_info.json", "dataset_dict.json")
    )


def _file_builder(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_BUILDERS:
        raise DatasetLoadError(
            f"Cannot read {path!r}: unknown file type {ext!r}. Give a {', '.join(sorted(FILE_BUILDERS))} file, a "
            f"directory, or a Hub dataset name."
        )
    return FILE_BUILDERS[ext]


def _missing_local_path(path: str) -> bool:
    return path.startswith(PATH_PREFIXES) and not os.path.exists(os.path.expanduser(path))


#: Columns that hold text in one of TRL's two formats: a string, or a list of ``{"role", "content"}`` messages.
TEXT_COLUMNS = ("prompt", "chosen", "rejected", "completion", "messages")


def _is_empty(path: str) -> bool:
    """Whether a file has no content but whitespace (read up to the first non-blank byte)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def check_one_format(ds: Any, source: Any) -> None:
    """Refuse a text column that mixes strings and message lists (``datasets`` reads such a JSON file with a
    ``Json`` feature; TRL then fails deep inside tokenisation).

    Args:
        ds: One loaded split.
        source: Where it came from, for the message.

    Raises:
        DatasetLoadError: naming the column and the first row of each kind.
    """
    features = getattr(ds, "features", None) or {}
    for column in TEXT_COLUMNS:
        feature = features.get(column)
        if feature is None or type(feature).__name__ in ("Value", "List", "Sequence", "LargeList"):
            continue
        first: dict[str, int] = {}
        for i, value in enumerate(ds[column]):
            kind = "string" if isinstance(value, str) else "messages" if isinstance(value, list) else "other"
            first.setdefault(kind, i)
            if len(first) > 1:
                rows = ", ".join(f"row {r} is {k}" for k, r in first.items())
                raise DatasetLoadError(
                    f"Column {column!r} of {str(source)!r} mixes formats ({rows}): TRL takes either strings or "
                    f"lists of {{'role', 'content'}} messages in one dataset. Convert the rows to one format."
                )


def load_splits(source: Any, *, config_name: str | None = None, file_split: str = "train", streaming: bool = False):
    """Every split of a dataset source (see the module docstring).

    Args:
        source: A file, a directory, a Hub dataset name, or ``upo://<asset>``.
        config_name: Configuration name for ``datasets.load_dataset`` (Hub datasets).
        file_split: The split name a single file, or a saved single ``Dataset``, is given.
        streaming: Stream the rows (``datasets.load_dataset(streaming=True)``) instead of loading them whole: a Hub
            dataset, a data directory or a file; a saved dataset is read from disk as a stream of its rows.

    Returns:
        (datasets.DatasetDict): A ``DatasetDict`` (an ``IterableDatasetDict`` when streaming).

    Raises:
        DatasetLoadError: no source, a file of an unknown type, or a local path that does not exist.
        FileNotFoundError: a ``upo://`` asset that is not in the package.
    """
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    path = _resolve(source)
    if os.path.isfile(path):
        builder = _file_builder(path)
        if _is_empty(path):
            raise DatasetLoadError(
                f"The dataset file {path!r} is empty: it has no rows. Write one row per line (JSON lines), e.g. "
                f'{{"prompt": "...", "chosen": "...", "rejected": "..."}}, or give another file.'
            )
        splits = load_dataset(builder, data_files={file_split: path}, streaming=streaming)
        if not streaming:  # a stream is checked as it is read (its columns, row by row, by the scoring)
            for ds in splits.values():
                check_one_format(ds, path)
        return splits
    if _is_saved(path):
        ds = load_from_disk(path)
        ds = DatasetDict({file_split: ds}) if isinstance(ds, Dataset) else ds
        if streaming:
            from datasets import IterableDatasetDict

            return IterableDatasetDict({k: v.to_iterable_dataset() for k, v in ds.items()})
        return ds
    if _missing_local_path(path):
        raise DatasetLoadError(
            f"The dataset path {path!r} does not exist. Check the path, or give a Hub dataset name (org/name)."
        )
    ds = load_dataset(path, name=config_name, streaming=streaming)
    return ds if hasattr(ds, "keys") else DatasetDict({file_split: ds})


def require_columns(ds: Any, names: Any, source: Any, what: str) -> None:
    """Fail naming the columns of ``names`` that ``ds`` (loaded from ``source``) lacks; ``what`` names the setting."""
    missing = [c for c in names if c not in ds.column_names]
    if missing:
        raise DatasetLoadError(f"{what} names {missing}, which {str(source)!r} does not have: {ds.column_names}.")


def _load_named_split(path: str, split: str, config_name: str | None, source: Any, fix: str) -> Any:
    """One split of a Hub dataset or data directory; ``split`` may slice (``train[:100]``), as in ``datasets``."""
    from datasets import load_dataset

    try:
        return load_dataset(path, name=config_name, split=split)
    except ValueError as e:
        if "Unknown split" not in str(e):
            raise
        raise DatasetLoadError(f"{str(source)!r} has no split {split!r} ({e}). {_sentence(fix)}") from None


def _sentence(text: str) -> str:
    return f"{text[:1].upper()}{text[1:]}."


def select_split(splits: Any, split: str, source: Any = None, fix: str = "choose one of them as the split"):
    """One split of a ``DatasetDict``.

    Args:
        splits: The ``DatasetDict`` (or any mapping of split names to datasets).
        split: The split to return.
        source: The source it was loaded from, for the message.
        fix: How the caller chooses the split (``"pass --split"``), for the message.

    Raises:
        DatasetLoadError: there is no such split (the message lists the splits there are).
    """
    if split not in splits:
        where = f"{str(source)!r}" if source is not None else "the dataset"
        raise DatasetLoadError(f"{where} has no split {split!r}; its splits: {list(splits.keys())}. {_sentence(fix)}")
    return splits[split]


def load_split(
    source: Any,
    split: str = "train",
    *,
    config_name: str | None = None,
    limit: int | None = None,
    remove_columns: Sequence[str] | None = None,
    fix: str = "choose one of them as the split",
) -> Any:
    """One split of a dataset source, as a ``datasets.Dataset`` (a single file is that split, whatever its name).

    Args:
        source: A file, a directory, a Hub dataset name, or ``upo://<asset>``.
        split: The split to use (Hub datasets and data directories, where it may slice: ``train[:100]``;
            ``DatasetDict`` directories).
        config_name: Configuration name for ``datasets.load_dataset`` (Hub datasets).
        limit: Keep only the first ``limit`` rows (at least 1).
        remove_columns: Input columns to leave out (e.g. the old ``chosen``/``rejected`` of a preference dataset
            whose prompts get new pairs); naming a column the dataset does not have is an error.
        fix: How the caller chooses the split, for the message of a missing split.

    Returns:
        The ``datasets.Dataset``.

    Raises:
        DatasetLoadError: an unreadable source (see :func:`load_splits`), a missing split, a source that is not one
            split, an unknown column in ``remove_columns``, or ``limit < 1``.
        FileNotFoundError: a ``upo://`` asset that is not in the package.
    """
    from datasets import Dataset

    if limit is not None and limit < 1:
        raise DatasetLoadError(f"limit must be >= 1, got {limit}.")
    path = _resolve(source)
    if os.path.isfile(path) or _is_saved(path) or _missing_local_path(path):
        ds = select_split(load_splits(path, file_split=split), split, source, fix)
    else:
        ds = _load_named_split(path, split, config_name, source, fix)
    if not isinstance(ds, Dataset):
        raise DatasetLoadError(f"{str(source)!r} did not load as one dataset split (got {type(ds).__name__}).")
    if remove_columns:
        require_columns(ds, remove_columns, source, "remove_columns")
        ds = ds.remove_columns(list(remove_columns))
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds
