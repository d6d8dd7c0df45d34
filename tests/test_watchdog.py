"""The stuck-rank watchdog during training (``trl_upo.watchdog.StuckRankCallback``): in a real two-process CPU run
(``accelerate launch --multi_gpu --num_processes 2``, gloo) where rank 1 hangs in the forward of step 2, each rank
reports its own state within ``TRL_UPO_STUCK_WARN`` seconds (rank 1: its forward; rank 0: the gradient all-reduce it
waits at) and ``TRL_UPO_STUCK_TIMEOUT`` ends the run, instead of every rank waiting for ``ddp_timeout``.

The training script is this file: ``python tests/test_watchdog.py MODEL OUT_DIR`` (repository root on
``PYTHONPATH``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT

#: Seconds the stuck rank sleeps: far beyond the bounds below, far below the test's budget.
HANG = 300


@pytest.mark.slow
def test_a_rank_stuck_in_a_training_step_is_named_and_the_run_ends(tiny_model_path, tmp_path):
    """Measured: about 40 s on 2 busy cores (two ranks start, score 16 pairs, train a step); budget 120 s."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "TRL_UPO_STUCK_WARN": "3", "TRL_UPO_STUCK_TIMEOUT": "12"}
    t0 = time.monotonic()
    proc = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", str(ROOT / "tests" / "test_watchdog.py"), tiny_model_path, str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG - 60,
    )
    elapsed = time.monotonic() - t0
    err = proc.stderr
    assert proc.returncode != 0, err[-3000:]
    # each rank says where it is: the stuck one in its own forward, the other at the all-reduce that waits for it
    assert "rank 1: no progress for" in err and "in step 2: forward (this rank's own compute)" in err, err[-4000:]
    assert "rank 0: no progress for" in err and "step 2: backward and gradient all-reduce (waits" in err, err[-4000:]
    assert "TRL_UPO_STUCK_TIMEOUT=12): stopping the run" in err
    assert elapsed < 120, elapsed


def test_one_process_has_no_watchdog():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from trl_upo.watchdog import StuckRankCallback

    callback = StuckRankCallback()
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[])
    callback.on_train_begin(args, TrainerState(), TrainerControl())
    assert callback.dog is None


def test_the_watchdog_waits_longer_than_the_slowest_step(monkeypatch):
    from trl_upo.watchdog import STUCK_WARN_ENV, Watchdog

    monkeypatch.setenv(STUCK_WARN_ENV, "1")
    dog = Watchdog(0, 2, "step 1: forward", min_warn=30.0)
    try:
        assert dog._thread is not None and max(dog.warn, dog.min_warn) == 30.0
    finally:
        dog.stop()


def _train(model_path: str, out_dir: str) -> None:
    """Train 3 steps on two ranks; rank 1 hangs in the forward of step 2 (the embedding layer's pre-hook sleeps)."""
    import torch.distributed as dist
    from datasets import Dataset

    from tests.helpers import cpu_args
    from tests.tiny import preference_dataset
    from trl_upo import UPOTrainer
    from trl_upo.watchdog import StuckRankCallback

    heads = [{"name": "short", "type": "length", "params": {"direction": "shorter"}}]
    args = cpu_args(out_dir, per_device_train_batch_size=2, max_steps=3, upo_use_score_cache=False, reward_heads=heads)
    data: Dataset = preference_dataset(16, seed=0)
    trainer = UPOTrainer(model=model_path, args=args, train_dataset=data)
    if not any(isinstance(c, StuckRankCallback) for c in trainer.callback_handler.callbacks):
        trainer.add_callback(StuckRankCallback())  # until the core adds it to every UPO trainer
    def hang_on_rank_1(module, inputs):
        if dist.get_rank() == 1 and trainer.state.global_step == 1:
            time.sleep(HANG)

    trainer.model.get_input_embeddings().register_forward_pre_hook(hang_on_rank_1)  # inside the model's forward
    trainer.train()


if __name__ == "__main__":
    _train(sys.argv[1], sys.argv[2])
