"""UPOTrainer across TRL's options: PEFT, explicit ref_model, precomputed reference log-probs, the margin mode,
conversational data, every objective option, evaluation, and the inputs it must reject."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM
from trl import DPOConfig
from trl.trainer.dpo_trainer import DataCollatorForPreference

from trl_upo import UPOTrainer
from trl_upo.objective import aux_reward, normalize_scores
from trl_upo.quickstart import NOVERY_HEAD as NOVERY
from trl_upo.collator import head_signs_and_weights
from trl_upo.scoring import score_column

from tests.helpers import cpu_args
from tests.tiny import preference_dataset

LENGTH = {"name": "length", "weight": 0.5}
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _first_step_margin_loss(trainer, dataset, alpha, beta):
    """At step 1 the policy equals the reference, so every DPO log-ratio difference D is 0 and the margin loss is
    mean(-log sigmoid(beta * 0 - alpha * m)) = mean(softplus(alpha * m)), m = r_aux(y_w) - r_aux(y_l), computed
    here from the dataset's score columns and the trainer's training-split statistics."""
    names = [s.name for s in trainer.upo.specs]
    raw_c = torch.tensor([[row[score_column(n, "chosen")] for n in names] for row in dataset], dtype=torch.float64)
    raw_r = torch.tensor([[row[score_column(n, "rejected")] for n in names] for row in dataset], dtype=torch.float64)
    signs, weights = head_signs_and_weights(trainer.upo.specs)
    r_c = aux_reward(normalize_scores(raw_c, trainer.upo.statistics, signs), weights)
    r_r = aux_reward(normalize_scores(raw_r, trainer.upo.statistics, signs), weights)
    return float(F.softplus(alpha * (r_c - r_r)).mean())


@pytest.mark.parametrize("setup", ["full", "lora", "ref_model", "precompute"])
def test_margin_mode_first_step_matches_hand_value(setup, tiny_model_path, tmp_path, score_cache):
    data = preference_dataset(8, seed=3)
    alpha = 2.0
    args = cpu_args(
        tmp_path,
        reward_heads=[NOVERY, LENGTH],
        upo_combine="margin",
        upo_alpha=alpha,
        per_device_train_batch_size=8,  # the whole dataset in one batch: the hand value uses every row
        max_steps=1,
        precompute_ref_log_probs=setup == "precompute",
        upo_score_cache_dir=score_cache,
    )
    kwargs = {}
    if setup == "lora":
        kwargs["peft_config"] = LoraConfig(**LORA)
    if setup == "ref_model":
        kwargs["ref_model"] = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    trainer = UPOTrainer(model=tiny_model_path, args=args, train_dataset=data, **kwargs)
    trainer.train()
    expected = _first_step_margin_loss(trainer, trainer.train_dataset, alpha, args.beta)
    assert _losses(trainer)[0] == pytest.approx(expected, rel=1e-5)
    assert expected > math.log(2) + 1e-3  # the designer margin really moved the loss away from DPO's log 2


@pytest.mark.parametrize(
    "options",
    [
        {"upo_applies_to": "both"},
        {"upo_baseline": "pair"},
        {"upo_baseline": "none", "upo_normalize_weights": False},
        {"upo_loglik": "sum"},
        {"upo_normalization": "rank"},
        {"ld_alpha": 0.5},
        {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
        {"use_weighting": True},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_objective_options_train(options, tiny_model_path, train_dataset, tmp_path, score_cache):
    args = cpu_args(tmp_path, reward_heads=[NOVERY, LENGTH], upo_score_cache_dir=score_cache, max_steps=2, **options)
    trainer = UPOTrainer(model=tiny_model_path, args=args, train_dataset=train_dataset)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert math.isfinite(h["loss"]) and math.isfinite(h["upo/aux_loss"])
        assert h["upo/weight/max"] >= h["upo/weight/mean"] > 0
    if options.get("upo_baseline", "batch") == "batch" and options.get("upo_normalize_weights", True):
        assert all(h["upo/weight/mean"] == pytest.approx(1.0) for h in logs)


def test_weight_cap_is_reported(tiny_model_path, train_dataset, tmp_path, score_cache):
    args = cpu_args(tmp_path, reward_heads=[NOVERY], upo_weight_cap=1.0, upo_score_cache_dir=score_cache)
    trainer = UPOTrainer(model=tiny_model_path, args=args, train_dataset=train_dataset)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["upo/weight/max"] <= 1.0 + 1e-9 for h in logs)
    assert any(h["upo/weight/capped_frac"] > 0 for h in logs)


def test_conversational_data_with_lora(tiny_model_path, tmp_path, score_cache):
    data = preference_dataset(16, conversational=True)
    args = cpu_args(tmp_path, reward_heads=[NOVERY, {"name": "length", "params": {"unit": "tokens"}}],
                    upo_score_cache_dir=score_cache)
    trainer = UPOTrainer(model=tiny_model_path, args=args, train_dataset=data, peft_config=LoraConfig(**LORA))
    # message lists were scored: the "very" head sees the assistant message's content
    expected = [0.0 if "very" in row["chosen"][0]["content"].split() else 1.0 for row in data]
    assert trainer.train_dataset[score_column("novery", "chosen")] == expected
    trainer.train()
    assert all(math.isfinite(h["upo/aux_loss"]) for h in trainer.state.log_history if "loss" in h)


def test_alpha_zero_logs_scores_only(tiny_model_path, train_dataset, tmp_path, score_cache):
    args = cpu_args(tmp_path, reward_heads=[NOVERY], upo_alpha=0.0, upo_score_cache_dir=score_cache)
    trainer = UPOTrainer(model=tiny_model_path, args=args, train_dataset=train_dataset)
    trainer.train()
    log = [h for h in trainer.state.log_history if "loss" in h][0]
    assert "upo/novery/chosen" in log and "upo/aux_loss" not in log
    assert not trainer.upo.hooks_attached  # nothing hooks the model when the term is off


def test_eval_dict_and_evaluate_with_a_new_dataset(tiny_model_path, train_dataset, tmp_path, score_cache):
    args = cpu_args(tmp_path, reward_heads=[NOVERY], upo_score_cache_dir=score_cache, max_steps=1)
    evals = {"a": preference_dataset(8, seed=5), "b": preference_dataset(8, seed=6)}
    trainer = UPOTrainer(model=tiny_model_path, args=args, train_dataset=train_dataset, eval_dataset=evals)
    metrics = trainer.evaluate()
    # As in DPOTrainer, the per-batch metrics of every split are logged as `eval_<metric>` (TRL does not prefix them
    # with the split name), so the returned dict holds the last split's values; the losses are per split.
    assert "eval_a_loss" in metrics and "eval_b_loss" in metrics and "eval_upo/aux_loss" in metrics
    expected = sum(0.0 if "very" in r["chosen"].split() else 1.0 for r in evals["b"]) / len(evals["b"])
    assert metrics["eval_upo/novery/chosen"] == pytest.approx(expected)
    fresh = preference_dataset(8, seed=7)
    metrics = trainer.evaluate(eval_dataset=fresh)
    assert "eval_upo/novery/chosen_norm" in metrics
    stats = trainer.upo.statistics[0]
    expected = sum((0.0 if "very" in r["chosen"].split() else 1.0) - stats["mean"] for r in fresh) / 8 / stats["std"]
    assert metrics["eval_upo/novery/chosen_norm"] == pytest.approx(expected)  # train statistics, not the eval set's


def test_custom_collator_is_wrapped(tiny_model_path, train_dataset, tmp_path, score_cache, tokenizer):
    calls = []

    class CountingCollator(DataCollatorForPreference):
        def torch_call(self, examples):
            calls.append(len(examples))
            return super().torch_call(examples)

    args = cpu_args(tmp_path, reward_heads=[NOVERY], upo_score_cache_dir=score_cache, max_steps=2)
    trainer = UPOTrainer(
        model=tiny_model_path, args=args, train_dataset=train_dataset,
        data_collator=CountingCollator(pad_token_id=tokenizer.pad_token_id),
    )
    trainer.train()
    assert calls and "upo/aux_loss" in trainer.state.log_history[0]


def test_dpo_config_is_accepted_and_trains_as_dpo(tiny_model_path, train_dataset, tmp_path):
    args = cpu_args(tmp_path, config_cls=DPOConfig, max_steps=2)
    trainer = UPOTrainer(model=tiny_model_path, args=args, train_dataset=train_dataset)
    trainer.train()
    assert not any(k.startswith("upo/") for h in trainer.state.log_history for k in h)


def test_a_train_set_that_is_no_dataset_is_a_clear_error_with_heads(tiny_model_path, train_dataset, tmp_path,
                                                                      score_cache):
    """A map-style Dataset or a stream (tests/test_streaming.py) is scored; anything else is refused by name."""
    args = cpu_args(tmp_path, reward_heads=[NOVERY], upo_score_cache_dir=score_cache)
    with pytest.raises(TypeError, match="must be a `datasets.Dataset` or `IterableDataset`, got list"):
        UPOTrainer(model=tiny_model_path, args=args, train_dataset=list(train_dataset))


def test_vision_dataset_with_heads_is_rejected(tiny_model_path, tmp_path, score_cache):
    data = Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"], "images": [[]]})
    args = cpu_args(tmp_path, reward_heads=[LENGTH], upo_score_cache_dir=score_cache)
    with pytest.raises(NotImplementedError, match="vision"):
        UPOTrainer(model=tiny_model_path, args=args, train_dataset=data)


def test_non_finite_score_stops_before_training(tiny_model_path, tmp_path, score_cache):
    data = Dataset.from_dict(
        {"prompt": ["p"] * 4, "chosen": [" a"] * 4, "rejected": [" b"] * 4, "s_c": [1.0, None, 2.0, 3.0],
         "s_r": [0.0] * 4}
    )
    head = {"name": "ext", "type": "column", "params": {"chosen": "s_c", "rejected": "s_r"}}
    args = cpu_args(tmp_path, reward_heads=[head], upo_score_cache_dir=score_cache)
    with pytest.raises(ValueError, match=r"'ext'.*non-finite.*row 1 chosen"):
        UPOTrainer(model=tiny_model_path, args=args, train_dataset=data)


def test_missing_response_column_is_a_clear_error(tiny_model_path, tmp_path, score_cache):
    data = Dataset.from_dict({"prompt": ["p"], "chosen": [" a"], "loser": [" b"]})
    args = cpu_args(tmp_path, reward_heads=[LENGTH], upo_score_cache_dir=score_cache)
    with pytest.raises(ValueError, match=r"'chosen' and 'rejected'.*\['rejected'\]"):
        UPOTrainer(model=tiny_model_path, args=args, train_dataset=data)


def test_gradient_accumulation_matches_the_large_batch(tiny_model_path, train_dataset, tmp_path, score_cache):
    """Two micro-batches of 2 with gradient accumulation train like one batch of 4. With per-response weights that do
    not depend on the rest of the batch (baseline none, unnormalised weights), the UPO loss of the large batch is
    the mean of the micro-batch losses, so the logged losses of the two runs agree; the Trainer scales the returned
    loss for accumulation exactly as it does DPO's."""
    common = dict(
        reward_heads=[NOVERY, LENGTH], upo_baseline="none", upo_normalize_weights=False, upo_temperature=1.0,
        upo_score_cache_dir=score_cache, max_steps=3,
    )
    big = UPOTrainer(
        model=tiny_model_path, args=cpu_args(tmp_path / "big", per_device_train_batch_size=4, **common),
        train_dataset=train_dataset,
    )
    big.train()
    acc = UPOTrainer(
        model=tiny_model_path,
        args=cpu_args(tmp_path / "acc", per_device_train_batch_size=2, gradient_accumulation_steps=2, **common),
        train_dataset=train_dataset,
    )
    acc.train()
    assert _losses(acc) == pytest.approx(_losses(big), rel=1e-5)
    assert _losses(big)[0] != _losses(big)[-1]  # the model moved between steps


def test_sync_ref_model(tiny_model_path, train_dataset, tmp_path, score_cache):
    args = cpu_args(tmp_path, reward_heads=[NOVERY], sync_ref_model=True, ref_model_sync_steps=1,
                    ref_model_mixup_alpha=0.5, upo_score_cache_dir=score_cache, upo_combine="margin")
    trainer = UPOTrainer(model=tiny_model_path, args=args, train_dataset=train_dataset)
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_model_heads_are_released_before_training(tiny_model_path, tiny_classifier_path, train_dataset, tmp_path,
                                                  score_cache):
    """A scoring model (here a classifier head) does not stay in memory while the policy trains."""
    head = {"name": "clf", "type": "classifier", "params": {"model": tiny_classifier_path, "labels": [1]}}
    args = cpu_args(tmp_path, reward_heads=[head], upo_score_cache_dir=score_cache, max_steps=1)
    trainer = UPOTrainer(model=tiny_model_path, args=args, train_dataset=train_dataset)
    assert trainer.upo.score_report["train"] == {"clf": "scored"}
    assert trainer.upo.heads[0]._model is None
    trainer.train()
    metrics = trainer.evaluate(eval_dataset=preference_dataset(8, seed=9))  # reloads lazily to score a new set
    assert "eval_upo/clf/chosen" in metrics


@pytest.mark.parametrize("head_type", ["classifier", "reward_model", "similarity"])
def test_missing_model_path_fails_before_training(head_type, tiny_model_path, train_dataset, tmp_path, score_cache):
    params = {"model": str(tmp_path / "no-such-model")}
    if head_type == "classifier":
        params["labels"] = [0]
    if head_type == "similarity":
        params["exemplars"] = ["short answer"]
    args = cpu_args(tmp_path, reward_heads=[{"name": "m", "type": head_type, "params": params}],
                    upo_score_cache_dir=score_cache)
    with pytest.raises(ValueError, match="does not exist"):
        UPOTrainer(model=tiny_model_path, args=args, train_dataset=train_dataset)


def _registered_builtin_heads():
    from trl_upo import registered_heads

    return sorted(n for n, c in registered_heads().items() if c is not None and c.__module__.startswith("trl_upo."))


@pytest.mark.parametrize("head_type", _registered_builtin_heads())
def test_a_head_with_weight_zero_changes_nothing_in_training(head_type, request, tiny_model_path, train_dataset,
                                                            tmp_path, score_cache):
    """Contract over the registry: adding any head with weight 0 next to a real head leaves the losses unchanged."""
    from tests.test_heads import HEAD_PARAMS

    params = HEAD_PARAMS[head_type]
    params = params(request) if callable(params) else params
    n = len(train_dataset)
    data = train_dataset.add_column("score_chosen", [1.0] * n).add_column("score_rejected", [0.0] * n)
    base = [{"name": "length"}]
    extra = {"name": "zero", "type": head_type, "weight": 0.0, "params": params}
    losses = []
    for i, heads in enumerate([base, base + [extra]]):
        args = cpu_args(tmp_path / str(i), reward_heads=heads, upo_score_cache_dir=score_cache, max_steps=2)
        trainer = UPOTrainer(model=tiny_model_path, args=args, train_dataset=data)
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert losses[0] == losses[1]


def test_evaluate_with_a_new_dataset_gives_heads_the_tokenizer(tiny_model_path, train_dataset, tmp_path, score_cache,
                                                               tokenizer):
    """A dataset handed to evaluate() is scored like the constructor's: token-counting heads get the tokenizer."""
    head = {"name": "tokens", "type": "length", "params": {"unit": "tokens"}}
    args = cpu_args(tmp_path, reward_heads=[head], upo_score_cache_dir=score_cache, max_steps=1)
    trainer = UPOTrainer(model=tiny_model_path, args=args, train_dataset=train_dataset)
    fresh = preference_dataset(8, seed=7)
    metrics = trainer.evaluate(eval_dataset=fresh)
    expected = sum(len(tokenizer(r["chosen"], add_special_tokens=False)["input_ids"]) for r in fresh) / 8
    assert metrics["eval_upo/tokens/chosen"] == pytest.approx(-expected)  # the default direction: shorter


def test_alpha_raised_after_construction(tiny_model_path, train_dataset, tmp_path, score_cache):
    """Issue 17: built with alpha 0 (nothing hooked), ``trainer.args.upo_alpha = 0.5`` before ``train()`` trains with
    the term (the hooks are attached at the first step that needs them); an invalid value set after construction
    fails at ``train()``, naming the field."""
    args = cpu_args(tmp_path, reward_heads=[NOVERY], upo_alpha=0.0, max_steps=1, upo_score_cache_dir=score_cache)
    trainer = UPOTrainer(model=tiny_model_path, args=args, train_dataset=train_dataset)
    assert not trainer.upo.hooks_attached
    trainer.args.upo_temperature = 0
    with pytest.raises(ValueError, match="upo_temperature must be > 0"):
        trainer.train()
    trainer.args.upo_temperature = 0.25
    trainer.args.upo_alpha = 0.5
    trainer.train()
    log = [h for h in trainer.state.log_history if "loss" in h][0]
    assert "upo/aux_loss" in log and log["upo/aux_loss"] > 0


def test_upo_trains_and_logs_head_metrics(tiny_model_path, train_dataset, tmp_path, score_cache):
    args = cpu_args(tmp_path / "out", reward_heads=[{"name": "length"}], upo_score_cache_dir=score_cache)
    trainer = UPOTrainer(model=tiny_model_path, args=args, train_dataset=train_dataset)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    assert all("upo/length/chosen" in h and "upo/aux_loss" in h for h in logs)
