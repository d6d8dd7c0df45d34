"""Writing pairs: a run is written batch by batch into a shard directory, so an interrupted run resumes at the first
missing batch and loses at most the batch it was working on; when every batch is done the shards become the output
(JSONL, Parquet or a saved dataset) and, if asked, are pushed to the Hub. Input datasets are read by
:mod:`trl_upo.data.loading`."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

FORMATS = ("jsonl", "parquet", "disk")
_SHARD_VERSION = 1


@dataclass
class OutputSettings:
    """Where and how the pairs are written.

    Attributes:
        path: the output file (``.jsonl``/``.json``: JSON lines; ``.parquet``: Parquet) or directory (``disk``:
            ``Dataset.save_to_disk``).
        format: ``"jsonl"``, ``"parquet"`` or ``"disk"``; None infers it from ``path``'s extension.
        shard_dir: where finished batches are kept until the run completes; default ``<path>.shards``.
        overwrite: replace an existing output, and start over when the shard directory holds a run with other
            settings (otherwise both are errors).
        keep_shards: keep the shard directory after the output is written.
        push_to_hub: a Hub dataset repo id to push the result to (``Dataset.push_to_hub``), or None.
        hub_private: create the Hub repo as private.
        progress: show tqdm progress bars.
        unpaired: write unpaired rows for KTO instead of pairs (:func:`unpair_rows`: each pair's chosen answer a
            desirable row, its rejected answer an undesirable one).
    """

    path: str
    format: str | None = None
    shard_dir: str | None = None
    overwrite: bool = False
    keep_shards: bool = False
    push_to_hub: str | None = None
    hub_private: bool = False
    progress: bool = True
    unpaired: bool = False

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("output path is empty: give the file or directory to write the pairs to.")
        if self.format is None:
            self.format = infer_format(self.path)
        if self.format not in FORMATS:
            raise ValueError(f"output format must be one of {list(FORMATS)}, got {self.format!r}.")
        if self.shard_dir is None:
            self.shard_dir = self.path.rstrip("/\\") + ".shards"

    def check_writable(self) -> None:
        """Fail before any work when the output exists and ``overwrite`` is off."""
        if os.path.exists(self.path) and not self.overwrite:
            raise ValueError(
                f"The output {self.path!r} already exists. Pass overwrite=True (--overwrite) to replace it, or choose "
                f"another path."
            )


def infer_format(path: str) -> str:
    """The output format implied by a path: ``.jsonl``/``.json`` -> jsonl, ``.parquet`` -> parquet, else disk."""
    lower = path.lower()
    if lower.endswith((".jsonl", ".json")):
        return "jsonl"
    if lower.endswith(".parquet"):
        return "parquet"
    if os.path.splitext(lower)[1] in (".csv", ".arrow", ".txt", ".tsv"):
        raise ValueError(f"Cannot write {path!r}: use a .jsonl or .parquet file, or a directory (save_to_disk).")
    return "disk"


class ShardStore:
    """Finished batches of one run, one JSONL file each (``shard-000003.jsonl``), written atomically.

    ``meta.json`` records the run's fingerprint (settings, input data, batch size): a directory holding another run
    is an error unless ``overwrite`` (then it is cleared), so a resume never mixes two runs.
    """

    def __init__(self, directory: str, fingerprint: str, num_batches: int, overwrite: bool = False) -> None:
        self.directory = directory
        self.num_batches = num_batches
        meta_path = os.path.join(directory, "meta.json")
        meta = {"version": _SHARD_VERSION, "fingerprint": fingerprint, "num_batches": num_batches}
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                old = json.load(f)
            if old != meta:
                if not overwrite:
                    raise ValueError(
                        f"The shard directory {directory!r} holds an unfinished run with different settings or input "
                        f"data, so it cannot be resumed with these. Delete it, pass overwrite=True (--overwrite) to "
                        f"start over, or use another output path."
                    )
                shutil.rmtree(directory)
        elif os.path.isdir(directory) and os.listdir(directory):
            if not overwrite:
                raise ValueError(
                    f"The shard directory {directory!r} exists and is not a trl-upo shard directory. Delete it or "
                    f"pass overwrite=True (--overwrite)."
                )
            shutil.rmtree(directory)
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(directory):
            if name.endswith(".tmp"):  # a shard a killed run was writing: that batch runs again
                os.remove(os.path.join(directory, name))
        if not os.path.exists(meta_path):
            _atomic_write(meta_path, json.dumps(meta))

    def _path(self, index: int) -> str:
        return os.path.join(self.directory, f"shard-{index:06d}.jsonl")

    def done(self, index: int) -> bool:
        """Whether batch ``index`` is already written."""
        return os.path.exists(self._path(index))

    def num_done(self) -> int:
        """How many batches are written."""
        return sum(self.done(i) for i in range(self.num_batches))

    def write(self, index: int, rows: list[dict[str, Any]]) -> None:
        """Write the rows of batch ``index`` (an empty batch is written too: it is done)."""
        _atomic_write(self._path(index), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    def rows(self) -> list[dict[str, Any]]:
        """All rows, in batch order."""
        out = []
        for i in range(self.num_batches):
            with open(self._path(i), encoding="utf-8") as f:
                out.extend(json.loads(line) for line in f if line.strip())
        return out

    def remove(self) -> None:
        """Delete the shard directory."""
        shutil.rmtree(self.directory, ignore_errors=True)


def open_store(output: OutputSettings | None, fingerprint: str, num_batches: int) -> tuple[ShardStore, Any]:
    """The run's shard store: ``output.shard_dir``, or a temporary directory when there is no output (returned too,
    to clean up; None otherwise)."""
    import tempfile

    if output is None:
        tmp = tempfile.TemporaryDirectory(prefix="trl-upo-pairs-")
        return ShardStore(tmp.name, fingerprint, num_batches), tmp
    return ShardStore(output.shard_dir, fingerprint, num_batches, overwrite=output.overwrite), None


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_in_shards(
    dataset: Any,
    process: Callable[[list[dict[str, Any]], int, int], list[dict[str, Any]]],
    *,
    batch_size: int,
    store: ShardStore,
    desc: str,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Run ``process(rows, batch_index, first_row_index)`` on every batch not yet in ``store`` and store its output.

    ``on_batch(batch_index)`` is called after each batch is stored (a progress hook; the tests interrupt a run there).
    """
    from tqdm.auto import tqdm

    n = len(dataset)
    done = store.num_done()
    if done:
        logger.info("Resuming: %d of %d batches are already in %s.", done, store.num_batches, store.directory)
    # An explicit `disable` would override TQDM_DISABLE, which the environment may set to silence every bar.
    disable = not progress or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    bar = tqdm(total=store.num_batches, initial=done, desc=desc, unit="batch", disable=disable)
    try:
        for b in range(store.num_batches):
            if store.done(b):
                continue
            start = b * batch_size
            rows = dataset.select(range(start, min(start + batch_size, n))).to_list()
            store.write(b, process(rows, b, start))
            bar.update(1)
            if on_batch is not None:
                on_batch(b)
    finally:
        bar.close()


def finish(store: ShardStore, output: OutputSettings | None, what: str) -> Any:
    """Turn the finished shards into a ``Dataset``, write it to ``output`` and push it if asked."""
    from datasets import Dataset

    rows = store.rows()
    if not rows:
        raise ValueError(
            f"No {what} were built from any prompt (see the warnings above), so there is nothing to write. Lower the "
            f"margin, or check the reward heads and the responses."
        )
    if output is not None and output.unpaired:
        rows = unpair_rows(rows)
    dataset = Dataset.from_list(rows)
    if output is not None:
        write_dataset(dataset, rows, output)
        if output.push_to_hub:
            dataset.push_to_hub(output.push_to_hub, private=output.hub_private)
        if not output.keep_shards:
            store.remove()
    return dataset


def unpair_rows(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Preference pairs -> unpaired rows (``UPOKTOTrainer``, TRL's ``KTOTrainer``): per pair, the chosen answer as a
    desirable row (``label`` True) followed by the rejected one (``label`` False), so every batch mixes both kinds.

    A column ``<name>_chosen`` with a ``<name>_rejected`` twin (``score_chosen``, ``score_<head>_chosen``, ...)
    becomes ``<name>_completion``, the score of that row's completion; every other column is repeated on both
    rows. A (prompt, completion, label) row that an earlier pair already gave is not repeated (ranking several pairs
    per prompt reuses answers); an answer that is chosen in one pair and rejected in another is kept with both
    labels, and a warning counts them.

    Raises:
        ValueError: a row without ``chosen`` and ``rejected``, or one that already has ``completion``/``label``.
    """
    out: list[dict[str, Any]] = []
    seen: dict[str, set] = {}
    for i, row in enumerate(pairs):
        if "chosen" not in row or "rejected" not in row or "completion" in row or "label" in row:
            raise ValueError(
                f"Unpairing needs pairs with 'chosen' and 'rejected' and no 'completion' or 'label' column; row {i} "
                f"has {sorted(row)}."
            )
        twins = [k[: -len("_chosen")] for k in row if k.endswith("_chosen") and f"{k[:-7]}_rejected" in row]
        shared = {k: v for k, v in row.items() if k not in ("chosen", "rejected")
                  and not any(k in (f"{t}_chosen", f"{t}_rejected") for t in twins)}
        for role, label in (("chosen", True), ("rejected", False)):
            key = json.dumps([row.get("prompt"), row[role]], sort_keys=True, default=repr)
            if label in seen.setdefault(key, set()):
                continue
            seen[key].add(label)
            out.append({**shared, "completion": row[role], "label": label,
                        **{f"{t}_completion": row[f"{t}_{role}"] for t in twins}})
    both = sum(1 for labels in seen.values() if len(labels) == 2)
    if both:
        logger.warning(
            "%d answer(s) are the chosen answer of one pair and the rejected answer of another: they are written "
            "as both a desirable and an undesirable row. Pair best against worst for clean unpaired labels.",
            both,
        )
    return out


def write_dataset(dataset: Any, rows: list[dict[str, Any]], output: OutputSettings) -> None:
    """Write the pairs in ``output.format`` (JSON lines are written from ``rows`` so floats keep every digit)."""
    path = output.path
    if os.path.exists(path):
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if output.format == "jsonl":
        _atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    elif output.format == "parquet":
        dataset.to_parquet(path)
    else:
        dataset.save_to_disk(path)


def dataset_digest(dataset: Any) -> str:
    """A hash of a dataset's content (not of how it was built), so a resume in a new process recognises its input."""
    import hashlib

    if getattr(dataset, "_indices", None) is not None:
        dataset = dataset.flatten_indices()
    h = hashlib.sha256()
    h.update(str(dataset.features).encode())
    for batch in dataset.data.to_batches():
        h.update(batch.serialize())
    return h.hexdigest()[:24]
