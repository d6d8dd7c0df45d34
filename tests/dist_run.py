"""Run by tests/test_distributed.py: a short UPO run, in one process or under `accelerate launch`, that writes its
logged history to a JSON file (main process only)."""

import json
import os
import sys

os.environ.setdefault("TQDM_DISABLE", "1")

from trl_upo import UPOTrainer  # noqa: E402
from trl_upo.testing import preference_dataset  # noqa: E402

from tests.helpers import cpu_args  # noqa: E402


def main(model_path: str, out_json: str, per_device_batch: int, cache_dir: str) -> None:
    args = cpu_args(
        os.path.join(os.path.dirname(out_json), "run"),
        per_device_train_batch_size=per_device_batch,
        reward_heads=[
            {"name": "novery", "type": "function", "params": {"function": "trl_upo.testing:avoid_word_reward"}},
            {"name": "length", "weight": 0.5},
        ],
        upo_score_cache_dir=cache_dir,
    )
    trainer = UPOTrainer(model=model_path, args=args, train_dataset=preference_dataset(32, seed=0))
    trainer.train()
    if trainer.accelerator.is_main_process:
        with open(out_json, "w") as f:
            json.dump(
                {"num_processes": trainer.accelerator.num_processes, "history": trainer.state.log_history}, f
            )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
