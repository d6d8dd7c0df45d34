"""The on-disk score cache: one ``.npy`` of a head's scores per (dataset, head, tokenizer, roles), written
incrementally while the head scores, so that a run killed mid-scoring keeps what it scored.

While a head scores, every block of rows is saved as ``<name>-<key>.parts/<rank>-<pid>-<seq>.npz`` (the row indices and
their scores, written atomically); a rerun reads those chunks and scores only the rows none of them holds. When every
row is scored, the complete array is saved as ``<name>-<key>.npy`` and the chunks are removed. A cache directory that
cannot be written (no permission, a full disk, a file in its place) gives one warning and the run goes on with the
scores in memory: caching is an optimisation, never a reason to lose work.

What the cache trusts (docs/trust.md): only files it can verify. Every chunk carries the SHA-256 of its indices and
scores, and the complete ``.npy`` has its digest in ``<name>-<key>.sha256`` (written before the ``.npy`` is renamed
into place); a file without a matching digest is not read. A directory that others can write to (group- or
other-writable without the sticky bit, or owned by another user), or a file owned by another user, is not trusted:
one warning, and the run scores in memory (``TRL_UPO_TRUST_SHARED_CACHE=1`` accepts a group-writable team cache).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
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


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def untrusted_reason(path: str) -> str | None:
    """Why files under ``path`` (a cache directory, or a file in one) cannot be trusted, or None: owned by another
    user, or writable by others without the sticky bit (then anyone could plant scores there)."""
    try:
        st = os.stat(path)
    except OSError:
        return None  # not there yet: created by this process with its own umask
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"{path} is owned by another user (uid {st.st_uid})"
    sticky_dir = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
    if st.st_mode & stat.S_IWOTH and not sticky_dir:
        return f"{path} is writable by others"
    own_group = hasattr(os, "getgid") and st.st_gid == os.getgid()  # a user-private group (umask 002)
    team = os.environ.get("TRL_UPO_TRUST_SHARED_CACHE") == "1"
    if st.st_mode & stat.S_IWGRP and not (sticky_dir or own_group or team):
        return f"{path} is writable by its group (gid {st.st_gid})"
    return None


def warn_untrusted(cache_dir: str, reason: str) -> None:
    """Warn once per directory that the cache there is not trusted (``reason``), and is neither read nor written."""
    key = "untrusted:" + os.path.abspath(cache_dir)
    if key in _WARNED:
        return
    _WARNED.add(key)
    logger.warning(
        "The score cache directory %r is not trusted (%s): anyone who can write there could plant scores, so this "
        "run neither reads nor writes it and scores in memory. Use a directory only you can write to (chmod "
        "go-w), or set TRL_UPO_TRUST_SHARED_CACHE=1 for a group-writable team cache.", cache_dir, reason,
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
        self.digest_path = os.path.join(cache_dir, f"{stem}.sha256")
        self._prefix = f"{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._seq = 0
        #: Set by :meth:`load`: whether the complete ``.npy`` was there.
        self.complete_on_disk = False

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, have)``: the cached scores (NaN where missing) and a boolean mask of the rows cached."""
        scores = np.full(self.shape, np.nan, dtype=np.float64)
        have = np.zeros(self.shape[0], dtype=bool)
        if not self.enabled or not self._trusted():
            return scores, have
        try:
            if self._file_trusted(self.final_path):
                full = np.load(self.final_path, allow_pickle=False)
                with open(self.digest_path) as f:
                    expected = f.read().strip()
                if full.shape == self.shape and _digest(full) == expected:
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
            path = os.path.join(self.parts_dir, name)
            try:
                if not self._file_trusted(path):
                    continue
                with np.load(path, allow_pickle=False) as part:
                    idx, values, digest = part["idx"], part["scores"], str(part["digest"])
            except (OSError, ValueError, KeyError, EOFError):
                continue  # a kill never leaves half a chunk (written, then renamed); anything unreadable is skipped
            if digest != _digest(idx, values):
                continue  # not written by this cache (or altered since): not trusted
            in_range = len(idx) == 0 or (idx.min() >= 0 and idx.max() < self.shape[0])
            if values.shape != (len(idx), self.shape[1]) or not in_range:
                continue
            scores[idx] = values
            have[idx] = True
        return scores, have

    def _trusted(self) -> bool:
        """Whether the cache directory (and its chunk directory) can be trusted; else warn once and disable."""
        for path in (self.cache_dir, self.parts_dir):
            reason = untrusted_reason(path)
            if reason:
                warn_untrusted(self.cache_dir, reason)
                self.enabled = False
                return False
        return True

    @staticmethod
    def _file_trusted(path: str) -> bool:
        return os.path.isfile(path) and not os.path.islink(path) and untrusted_reason(path) is None

    def _write(self, write) -> bool:
        if not self.enabled or not self._trusted():
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
            idx64, values = np.asarray(idx, dtype=np.int64), np.asarray(scores, dtype=np.float64)
            np.savez(tmp, idx=idx64, scores=values, digest=np.asarray(_digest(idx64, values)))
            os.replace(tmp, path)
            self._seq += 1

        return self._write(write)

    def save_complete(self, scores: np.ndarray) -> bool:
        """Save every row's scores as the one ``.npy`` and remove the chunks."""

        def write() -> None:
            os.makedirs(self.cache_dir, exist_ok=True)
            tmp = f"{self.final_path}.{self._prefix}.tmp.npy"
            values = np.asarray(scores, dtype=np.float64)
            np.save(tmp, values)
            digest_tmp = f"{self.digest_path}.{self._prefix}.tmp"
            with open(digest_tmp, "w") as f:
                f.write(_digest(values))
            os.replace(digest_tmp, self.digest_path)  # the digest first: a .npy is never there without its digest
            os.replace(tmp, self.final_path)
            shutil.rmtree(self.parts_dir, ignore_errors=True)

        return self._write(write)
