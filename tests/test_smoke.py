from trl_upo import UPOTrainer

from tests.helpers import cpu_args


def test_upo_trains_and_logs_head_metrics(tiny_model_path, train_dataset, tmp_path, score_cache):
    args = cpu_args(tmp_path / "out", reward_heads=[{"name": "length"}], upo_score_cache_dir=score_cache)
    trainer = UPOTrainer(model=tiny_model_path, args=args, train_dataset=train_dataset)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    assert all("upo/length/chosen" in h and "upo/aux_loss" in h for h in logs)
