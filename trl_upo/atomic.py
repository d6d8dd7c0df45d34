"""Writes that a kill, a full disk or a planted symlink cannot leave half done or send elsewhere.

:func:`atomic_write` writes to a temporary file in the target's directory, flushes it to disk and renames it over
the target (``os.replace``): readers see the old file or the new one, never a truncated one. The rename replaces a
symlink at the target instead of following it, so a ``log_history.json`` symlinked by someone else to a file of
yours is not overwritten through the link. Used for every file the commands write into ``output_dir`` and for
``trl-upo score --output``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing; on a clean exit it is synced and renamed to ``path``, on
    an error it is removed and ``path`` is left as it was.

    Args:
        path: The file to (re)place. A symlink there is replaced, not followed.
        mode: ``"w"`` (text) or ``"wb"`` (bytes).
        encoding: Text encoding (ignored for bytes).

    Yields:
        The open temporary file.
    """
    with _atomic_path(os.fspath(path)) as tmp, open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
        yield f


def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Like :func:`atomic_write` for writers that take a path (``Dataset.to_json``): yields a temporary path in the
    target's directory, renamed to ``path`` when the block ends without an error."""
    return _atomic_path(os.fspath(path))


@contextlib.contextmanager
def _atomic_path(path: str) -> Iterator[str]:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
