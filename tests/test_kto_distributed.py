"""UPO-KTO on two processes (`accelerate launch --multi_gpu --num_processes 2` of a `use_cpu=True` script: two CPU
processes over gloo) trains like one process with the same global batch: the batch baseline, the weight
normalisation, the global count of desirable rows and the metrics are gathered across processes.

The loss type is ``apo_zero_unpaired``: ``kto``'s KL estimate pairs each completion with its neighbour's prompt within
a per-device batch, so its value depends on the per-device batch size by design (TRL's, not UPO's).

The training script is this file: ``python tests/test_kto_distributed.py MODEL OUT_JSON PER_DEVICE_BATCH CACHE_DIR``
(repository root on ``PYTHONPATH``) writes the run's logged history to OUT_JSON (main process)."""

import os
import sys

import pytest

from tests.helpers import ROOT, cpu_args, end_distributed, one_and_two_process_histories, train_and_record

METRICS = ["loss", "upo/aux_loss", "upo/weight/max", "upo/advantage/max", "upo/novery/completion",
           "upo/length/completion_norm", "upo/loglik/desirable", "rewards/chosen", "logps/chosen"]


@pytest.mark.slow
def test_two_processes_match_one_process(tiny_model_path, tmp_path):
    a, b = one_and_two_process_histories(str(ROOT / "tests" / "test_kto_distributed.py"), tiny_model_path, tmp_path)
    assert (a["num_processes"], b["num_processes"]) == (1, 2)
    steps_a = [h for h in a["history"] if "loss" in h]
    steps_b = [h for h in b["history"] if "loss" in h]
    assert len(steps_a) == len(steps_b) == 3
    for ha, hb in zip(steps_a, steps_b):
        assert set(ha) == set(hb)
        for key in METRICS:
            if key in ha:  # a step without desirable rows logs no desirable statistic, on both
                assert hb[key] == pytest.approx(ha[key], rel=1e-4, abs=1e-6), (key, ha["step"])


def train_and_write_history(model_path: str, out_json: str, per_device_batch: int, cache_dir: str) -> None:
    """The training script: a short UPO-KTO run (two heads, 16 unpaired rows), in one process or two."""
    from trl.data_utils import unpair_preference_dataset

    from tests.tiny import preference_dataset
    from trl_upo import UPOKTOConfig, UPOKTOTrainer

    args = cpu_args(
        os.path.join(os.path.dirname(out_json), "run"),
        config_cls=UPOKTOConfig,
        per_device_train_batch_size=per_device_batch,
        loss_type="apo_zero_unpaired",
        reward_heads=[
            {"name": "novery", "type": "function",
             "params": {"function": "trl_upo.quickstart_task:avoid_word_reward"}},
            {"name": "length", "weight": 0.5},
        ],
        upo_alpha=1.0,
        upo_score_cache_dir=cache_dir,
    )
    data = unpair_preference_dataset(preference_dataset(8, seed=0)).shuffle(seed=0)
    trainer = UPOKTOTrainer(model=model_path, args=args, train_dataset=data)
    train_and_record(trainer, out_json)


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    train_and_write_history(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
    end_distributed()  # the trainer is released now
