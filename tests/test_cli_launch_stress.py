"""Two-process runs exit (issue 23, item 3): 30 consecutive CPU runs of ``trl-upo train`` (DPO and KTO) and
``trl-upo score`` with ``--num_processes 2`` on tiny and small datasets, each within a bound.

Before the fix, rank 1 of `trl-upo train --num_processes 2 --use_cpu true --max_steps 1` with a function head blocked
forever in 4 of 8 runs, in the Gloo group's destructor reached from the DDP reducer's deallocation in
``end_distributed()``: ``trainer.end()`` had destroyed the group under the live DDP model, and the group's last
reference (the reducer's) was dropped in a garbage collection with the GIL held while a worker thread was still busy.

``TRL_UPO_STRESS_RUNS`` sets the number of runs (default 30); ``TRL_UPO_STRESS_BOUND`` the seconds one run may take
(default 180). The total is printed (``-s``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT

_HEADS = """
def brevity(completions, **kwargs):
    return [-len(str(c)) / 100.0 for c in completions]
"""


def _data(tmp_path, n: int):
    rows = [json.loads(line) for line in (ROOT / "trl_upo/resources/quickstart-data/train.jsonl").open()][:n]
    paired = tmp_path / f"pairs{n}.jsonl"
    paired.write_text("".join(json.dumps(r) + "\n" for r in rows))
    unpaired = tmp_path / f"unpaired{n}.jsonl"
    unpaired.write_text("".join(
        json.dumps({"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}) + "\n"
        for r in rows for k in ("chosen", "rejected")
    ))
    return paired, unpaired


def _recipe(tmp_path, name: str, data, trainer: str) -> str:
    recipe = {
        "model_name_or_path": "upo://tiny-llama", "dataset_name": str(data), "output_dir": str(tmp_path / name),
        "use_cpu": True, "bf16": False, "activation_checkpointing": False, "report_to": "none",
        "save_strategy": "no", "per_device_train_batch_size": 2, "max_steps": 1, "torch_num_threads": 1,
        "dataloader_num_workers": 0, "trainer": trainer, "max_length": 32, "disable_tqdm": True,
        "reward_heads": [{"name": "brev", "type": "function", "params": {"function": "stress_heads:brevity"}}],
        "upo_score_cache_dir": str(tmp_path / "cache"),
    }
    if trainer == "kto":
        recipe["loss_type"] = "apo_zero_unpaired"
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(recipe))
    return str(path)


@pytest.mark.slow
def test_thirty_two_process_runs_each_exit_in_bounded_time(tmp_path):
    (tmp_path / "stress_heads.py").write_text(_HEADS)
    runs = int(os.environ.get("TRL_UPO_STRESS_RUNS", "30"))
    bound = float(os.environ.get("TRL_UPO_STRESS_BOUND", "180"))
    kinds = []
    for n in (4, 16):
        paired, unpaired = _data(tmp_path, n)
        kinds += [("train", "dpo", paired, n), ("train", "kto", unpaired, n), ("score", "dpo", paired, n)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRL_UPO_SIGNAL_GRACE": "5"}
    times, start = [], time.monotonic()
    for i in range(runs):
        command, trainer, data, n = kinds[i % len(kinds)]
        name = f"run{i}-{command}-{trainer}-{n}"
        argv = [sys.executable, "-m", "trl_upo.cli", command, "--config", _recipe(tmp_path, name, data, trainer),
                "--num_processes", "2"]
        t0 = time.monotonic()
        try:
            proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=bound)
        except subprocess.TimeoutExpired as e:  # run() sends SIGKILL; the command's tree dies with it (PDEATHSIG)
            raise AssertionError(f"{name} did not exit within {bound:g} s; stderr tail:\n"
                                 f"{(e.stderr or b'')[-3000:]}") from None
        times.append(time.monotonic() - t0)
        assert proc.returncode == 0, f"{name} failed:\n{proc.stderr[-3000:]}"
    total = time.monotonic() - start
    print(f"\n{runs} two-process runs: total {total:.0f} s, slowest {max(times):.1f} s, "
          f"mean {sum(times) / len(times):.1f} s")
