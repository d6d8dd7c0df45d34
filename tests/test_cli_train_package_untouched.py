"""Nothing is written outside output_dir, the cache and the named paths (issue 23, item 10): the installed package
directory is watched during a `trl-upo train` run and must be unchanged (Python's own ``__pycache__`` aside)."""

from __future__ import annotations

import os

import pytest

from trl_upo.resources import PACKAGE_DIR


def _snapshot() -> dict[str, tuple[int, int]]:
    out = {}
    for root, dirs, files in os.walk(PACKAGE_DIR):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            st = os.lstat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), PACKAGE_DIR)] = (st.st_size, st.st_mtime_ns)
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), PACKAGE_DIR) + "/"] = (0, 0)
    return out


@pytest.mark.slow
def test_a_train_run_leaves_the_package_directory_unchanged(tmp_path, monkeypatch):
    from trl_upo.cli import train as cli_train

    monkeypatch.chdir(tmp_path)
    before = _snapshot()
    code = cli_train.main(["--max_steps", "1", "--report_before_after", "false", "--output_dir", str(tmp_path / "o"),
                           "--upo_score_cache_dir", str(tmp_path / "cache"), "--logging_steps", "1"],
                          prog="trl-upo train")
    assert code == 0
    after = _snapshot()
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert changed == [], f"the run changed the package directory: {changed}"
    assert (tmp_path / "o" / "upo_complete.json").is_file()
