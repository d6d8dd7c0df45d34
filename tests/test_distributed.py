"""Two processes (`accelerate launch --multi_gpu --num_processes 2` running a `use_cpu=True` script: torchrun
starts two CPU processes that talk over gloo; `--cpu` alone would start one) train like one process with the same global
batch: the batch baseline, the weight normalisation and the metrics are gathered across processes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
METRICS = ["loss", "upo/aux_loss", "upo/weight/max", "upo/advantage/max", "upo/novery/chosen", "upo/length/rejected_norm",
           "rewards/margins", "logps/chosen"]


def _run(cmd, tmp_path):
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_two_processes_match_one_process(tiny_model_path, tmp_path):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    assert accelerate, "accelerate's launcher is not installed"
    cache = str(tmp_path / "cache")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    _run([sys.executable, str(HERE / "dist_run.py"), tiny_model_path, str(one), "4", cache], tmp_path)
    _run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", str(HERE / "dist_run.py"), tiny_model_path, str(two), "2", cache], tmp_path)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["num_processes"], b["num_processes"]) == (1, 2)
    steps_a = [h for h in a["history"] if "loss" in h]
    steps_b = [h for h in b["history"] if "loss" in h]
    assert len(steps_a) == len(steps_b) == 3
    for ha, hb in zip(steps_a, steps_b):
        for key in METRICS:
            # Float32 reductions run in a different order across two processes: agreement to 1e-4 relative.
            assert hb[key] == pytest.approx(ha[key], rel=1e-4, abs=1e-6), (key, ha["step"])
