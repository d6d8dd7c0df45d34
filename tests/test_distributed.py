"""Two processes (`accelerate launch --multi_gpu --num_processes 2` running a `use_cpu=True` script: torchrun
starts two CPU processes that talk over gloo; `--cpu` alone would start one) train like one process with the same global
batch: the batch baseline, the weight normalisation and the metrics are gathered across processes.

The training script is this file: ``python tests/test_distributed.py MODEL OUT_JSON PER_DEVICE_BATCH CACHE_DIR``, with
the repository root on ``PYTHONPATH`` (for ``tests.*``), writes the run's logged history to OUT_JSON (main process)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT, assert_same_training_steps, cpu_args


def _run(cmd, tmp_path):
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_two_processes_match_one_process(tiny_model_path, tmp_path):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    assert accelerate, "accelerate's launcher is not installed"
    cache = str(tmp_path / "cache")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    script = str(ROOT / "tests" / "test_distributed.py")
    _run([sys.executable, script, tiny_model_path, str(one), "4", cache], tmp_path)
    _run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", script, tiny_model_path, str(two), "2", cache], tmp_path)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["num_processes"], b["num_processes"]) == (1, 2)
    assert_same_training_steps(a["history"], b["history"], steps=3)


def train_and_write_history(model_path: str, out_json: str, per_device_batch: int, cache_dir: str) -> None:
    """The training script: a short UPO run (two heads, 32 pairs), in one process or under `accelerate launch`."""
    from tests.tiny import preference_dataset
    from trl_upo import UPOTrainer

    args = cpu_args(
        os.path.join(os.path.dirname(out_json), "run"),
        per_device_train_batch_size=per_device_batch,
        reward_heads=[
            {"name": "novery", "type": "function",
             "params": {"function": "trl_upo.quickstart_task:avoid_word_reward"}},
            {"name": "length", "weight": 0.5},
        ],
        upo_score_cache_dir=cache_dir,
    )
    trainer = UPOTrainer(model=model_path, args=args, train_dataset=preference_dataset(32, seed=0))
    trainer.train()
    if trainer.accelerator.is_main_process:
        with open(out_json, "w") as f:
            json.dump({"num_processes": trainer.accelerator.num_processes, "history": trainer.state.log_history}, f)


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    train_and_write_history(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
