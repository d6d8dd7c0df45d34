"""The on-disk score cache: one ``.npy`` of a head's scores per (dataset, head, tokenizer, roles), written
incrementally while the head scores, so that a run killed mid-scoring keeps what it scored.

While a head scores, every block of rows is saved as ``<name>-<key>.parts/<rank>-<pid>-<seq>.npz`` (the row indices and
their scores, written atomically); a rerun reads those chunks and scores only the rows none of them holds. When every
row is scored, the complete array is saved as ``<name>-<key>.npy`` and the chunks are removed. A cache directory that
cannot be written (no permission, a full disk, a file in its place) gives one warning and the run goes on with the
scores in memory: caching is an optimisation, never a reason to lose work.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid

import numpy as np

logger = logging.getLogger(__name__)

#: Directories this process already warned about (one warning each).
_WARNED: set[str] = set()


def warn_unwritable(cache_dir: str, error: BaseException) -> None:
    """Warn once per process and directory that the score cache cannot be written; scoring goes on in memory."""
    key = os.path.abspath(cache_dir)
    if key in _WARNED:
        return
    _WARNED.add(key)
    reason = getattr(error, "strerror", None) or str(error)
    logger.warning(
        "The score cache directory %r cannot be written (%s): scores are kept in memory and this run goes on, but "
        "nothing is cached for the next run. Set upo_score_cache_dir to a writable directory (or "
        "upo_use_score_cache: false to silence this).", cache_dir, reason,
    )


def default_cache_dir() -> str:
    """Where scores are cached when ``upo_score_cache_dir`` is unset: ``trl_upo/scores`` under the HF cache home."""
    from datasets import config as ds_config

    return os.path.join(str(ds_config.HF_CACHE_HOME), "trl_upo", "scores")


def writable_dir(path: str) -> str | None:
    """Why ``path`` cannot be used as a directory to write in (None: it can): created if missing, and probed with a
    small file that is removed again."""
    if os.path.exists(path) and not os.path.isdir(path):
        return "it is a file, not a directory"
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".upo-probe-{uuid.uuid4().hex}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        return e.strerror or str(e)
    return None


class ChunkedScoreCache:
    """The cached scores of one head: ``(n_rows, n_roles)`` floats, complete or in chunks.

    Args:
        cache_dir: the cache directory.
        stem: ``<head name>-<key>``: the file name without its extension.
        shape: ``(n_rows, n_roles)``.
        tag: what distinguishes this process's chunk files from other processes' (its rank).
        enabled: False: read nothing, write nothing.
    """

    def __init__(self, cache_dir: str, stem: str, shape: tuple[int, int], tag: str = "0", enabled: bool = True):
        self.cache_dir, self.shape, self.enabled = cache_dir, shape, enabled
        self.final_path = os.path.join(cache_dir, f"{stem}.npy")
        self.parts_dir = os.path.join(cache_dir, f"{stem}.parts")
        self._prefix = f"{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._seq = 0
        #: Set by :meth:`load`: whether the complete ``.npy`` was there.
        self.complete_on_disk = False

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, have)``: the cached scores (NaN where missing) and a boolean mask of the rows cached."""
        scores = np.full(self.shape, np.nan, dtype=np.float64)
        have = np.zeros(self.shape[0], dtype=bool)
        if not self.enabled:
            return scores, have
        try:
            full = np.load(self.final_path)
            if full.shape == self.shape:
                self.complete_on_disk = True
                return full.astype(np.float64), np.ones(self.shape[0], dtype=bool)
        except (OSError, ValueError, EOFError):
            pass
        try:
            names = sorted(os.listdir(self.parts_dir))
        except OSError:
            return scores, have
        for name in names:
            if not name.endswith(".npz"):
                continue
            try:
                with np.load(os.path.join(self.parts_dir, name)) as part:
                    idx, values = part["idx"], part["scores"]
            except (OSError, ValueError, KeyError, EOFError):
                continue  # a kill never leaves half a chunk (written, then renamed); anything unreadable is skipped
            in_range = len(idx) == 0 or (idx.min() >= 0 and idx.max() < self.shape[0])
            if values.shape != (len(idx), self.shape[1]) or not in_range:
                continue
            scores[idx] = values
            have[idx] = True
        return scores, have

    def _write(self, write) -> bool:
        if not self.enabled:
            return False
        try:
            write()
            return True
        except OSError as e:
            warn_unwritable(self.cache_dir, e)
            self.enabled = False
            return False

    def add_chunk(self, idx: np.ndarray, scores: np.ndarray) -> bool:
        """Save the scores of rows ``idx`` as one chunk (atomically: a kill leaves the chunk whole or absent)."""

        def write() -> None:
            os.makedirs(self.parts_dir, exist_ok=True)
            path = os.path.join(self.parts_dir, f"{self._prefix}-{self._seq:06d}.npz")
            tmp = f"{path}.tmp.npz"
            np.savez(tmp, idx=np.asarray(idx, dtype=np.int64), scores=np.asarray(scores, dtype=np.float64))
            os.replace(tmp, path)
            self._seq += 1

        return self._write(write)

    def save_complete(self, scores: np.ndarray) -> bool:
        """Save every row's scores as the one ``.npy`` and remove the chunks."""

        def write() -> None:
            os.makedirs(self.cache_dir, exist_ok=True)
            tmp = f"{self.final_path}.{self._prefix}.tmp.npy"
            np.save(tmp, np.asarray(scores, dtype=np.float64))
            os.replace(tmp, self.final_path)
            shutil.rmtree(self.parts_dir, ignore_errors=True)

        return self._write(write)
