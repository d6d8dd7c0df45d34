"""Two processes (`accelerate launch --multi_gpu --num_processes 2` running a `use_cpu=True` script: torchrun
starts two CPU processes that talk over gloo; `--cpu` alone would start one) train like one process with the same global
batch: the batch baseline, the weight normalisation and the metrics are gathered across processes.

The training script is this file: ``python tests/test_distributed.py MODEL OUT_JSON PER_DEVICE_BATCH CACHE_DIR``, with
the repository root on ``PYTHONPATH`` (for ``tests.*``), writes the run's logged history to OUT_JSON (main process)."""

import os
import sys

import pytest

from tests.helpers import (
    ROOT,
    assert_same_training_steps,
    cpu_args,
    end_distributed,
    one_and_two_process_histories,
    train_and_record,
)


@pytest.mark.slow
def test_two_processes_match_one_process(tiny_model_path, tmp_path):
    a, b = one_and_two_process_histories(str(ROOT / "tests" / "test_distributed.py"), tiny_model_path, tmp_path)
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
    train_and_record(trainer, out_json)


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    train_and_write_history(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
    end_distributed()  # the trainer is released now
