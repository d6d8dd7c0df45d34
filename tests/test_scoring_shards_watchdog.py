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
    assert "rank(s) 1 did not reach the gather after" in proc.stderr and "'sleepy'" in proc.stderr, proc.stderr[-3000:]
    assert "rank 0 has waited" in proc.stderr
    assert time.monotonic() - t0 < 400
