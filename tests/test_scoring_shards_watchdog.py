"""A reward head that blocks on one rank is reported by name within a bounded time (issue 23, item 4).

Before: a function head that sleeps when ``RANK=1`` hung `trl-upo score --num_processes 2` for the 30-minute
``ddp_timeout`` with no message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT

_HEAD = """
import os, time

def stuck(completions, **kwargs):
    if os.environ.get("RANK") == "1":
        time.sleep(3600)
    return [0.0] * len(completions)
"""


@pytest.mark.slow
def test_a_head_stuck_on_rank_1_is_named_and_the_run_ends(tmp_path):
    (tmp_path / "stuck_heads.py").write_text(_HEAD)
    rows = [json.loads(line) for line in (ROOT / "trl_upo/resources/quickstart-data/train.jsonl").open()][:8]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRL_UPO_STUCK_WARN": "2", "TRL_UPO_STUCK_TIMEOUT": "8",
           "TRL_UPO_SIGNAL_GRACE": "5"}
    heads = json.dumps([{"name": "sleepy", "type": "function", "params": {"function": "stuck_heads:stuck"}}])
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "trl_upo.cli", "score", "--dataset_name", str(data), "--reward_heads", heads,
         "--num_processes", "2", "--use_cpu", "true", "--upo_use_score_cache", "false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode != 0
    err = proc.stderr
    assert "rank 1: no progress for" in err and "with 'sleepy'" in err, err[-3000:]  # the stuck rank names itself
    assert "rank 0: no progress for" in err and "the gather after" in err  # the waiting rank names the gather
    assert time.monotonic() - t0 < 400


def test_the_watchdog_names_the_rank_and_what_it_does(monkeypatch, caplog):
    from trl_upo.scoring.shards import STUCK_WARN_ENV, Watchdog, World

    monkeypatch.setenv(STUCK_WARN_ENV, "0.2")
    with caplog.at_level("WARNING", logger="trl_upo.scoring.shards"):
        with Watchdog(World(rank=1, size=2), "Scoring the train dataset with 'sleepy'") as dog:
            time.sleep(1.2)
            quiet_after_beat = len(caplog.records)
            dog.beat()
    assert quiet_after_beat >= 1
    assert "rank 1: no progress for" in caplog.text and "'sleepy'" in caplog.text


def test_the_watchdog_is_off_in_one_process(monkeypatch):
    from trl_upo.scoring.shards import STUCK_WARN_ENV, Watchdog, World

    monkeypatch.setenv(STUCK_WARN_ENV, "0.1")
    assert Watchdog(World(), "x")._thread is None
