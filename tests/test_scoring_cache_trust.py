"""The score cache trusts only files it can verify, in directories only the user can write (issue 23, item 5/6).

Before: a cache directory shared with other users accepted planted ``.npy`` files (an "avoid very" head ended up
rewarding "very")."""

from __future__ import annotations

import os

import numpy as np
import pytest

from trl_upo.scoring.cache import ChunkedScoreCache, untrusted_reason

SHAPE = (4, 2)


def _written(tmp_path, name="cache") -> tuple[ChunkedScoreCache, np.ndarray]:
    d = tmp_path / name
    d.mkdir(mode=0o700)
    scores = np.arange(8, dtype=np.float64).reshape(SHAPE)
    cache = ChunkedScoreCache(str(d), "head-key", SHAPE)
    assert cache.save_complete(scores)
    return cache, scores


def test_own_cache_round_trips(tmp_path):
    cache, scores = _written(tmp_path)
    loaded, have = ChunkedScoreCache(cache.cache_dir, "head-key", SHAPE).load()
    assert have.all() and np.array_equal(loaded, scores)


def test_a_planted_npy_without_its_digest_is_not_read(tmp_path):
    d = tmp_path / "cache"
    d.mkdir(mode=0o700)
    np.save(d / "head-key.npy", np.full(SHAPE, 99.0))
    loaded, have = ChunkedScoreCache(str(d), "head-key", SHAPE).load()
    assert not have.any()


def test_a_replaced_npy_fails_its_digest(tmp_path):
    cache, _ = _written(tmp_path)
    np.save(cache.final_path, np.full(SHAPE, 99.0))
    assert not ChunkedScoreCache(cache.cache_dir, "head-key", SHAPE).load()[1].any()


def test_a_planted_chunk_is_not_read(tmp_path):
    d = tmp_path / "cache"
    parts = d / "head-key.parts"
    parts.mkdir(parents=True, mode=0o700)
    np.savez(parts / "0-1-x-000000.npz", idx=np.arange(4), scores=np.full(SHAPE, 99.0))
    assert not ChunkedScoreCache(str(d), "head-key", SHAPE).load()[1].any()
    cache = ChunkedScoreCache(str(d), "head-key", SHAPE)
    assert cache.add_chunk(np.array([1]), np.array([[1.0, 2.0]]))
    scores, have = ChunkedScoreCache(str(d), "head-key", SHAPE).load()
    assert have.tolist() == [False, True, False, False] and scores[1].tolist() == [1.0, 2.0]


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_a_directory_others_can_write_is_neither_read_nor_written(tmp_path, caplog):
    cache, _ = _written(tmp_path)
    os.chmod(cache.cache_dir, 0o777)
    assert "writable by others" in untrusted_reason(cache.cache_dir)
    fresh = ChunkedScoreCache(cache.cache_dir, "head-key", SHAPE)
    with caplog.at_level("WARNING"):
        assert not fresh.load()[1].any()
        assert not fresh.add_chunk(np.array([0]), np.zeros((1, 2)))
    assert "is not trusted" in caplog.text
    os.chmod(cache.cache_dir, 0o1777)  # sticky, like /tmp: others cannot replace this user's files
    assert untrusted_reason(cache.cache_dir) is None
    assert ChunkedScoreCache(cache.cache_dir, "head-key", SHAPE).load()[1].all()
