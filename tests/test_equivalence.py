"""UPO without an auxiliary term is DPO, bit for bit.

docs/objective.md: "With no heads, or `upo_alpha: 0`, `L` equals TRL's DPO loss to floating-point precision."
UPOTrainer hooks into DPOTrainer (column pruning, collator, ``compute_loss``, a forward hook on the policy); when a
TRL upgrade moves any of those, these tests are the ones that ring.

Each case trains ``trl.DPOTrainer`` and ``UPOTrainer`` from the same saved weights, on the same data and seed, for
10 optimizer steps at a learning rate high enough that the policy moves away from the reference, and compares every
metric DPOTrainer logs (loss, grad_norm, rewards/*, logps/*, logits/*, entropy, ..., and eval_* when evaluating)
*exactly*. Exact equality is the right bar on one CPU process: the UPO code path with no heads or alpha = 0 runs the
very same floating-point operations in the same order as DPOTrainer (the auxiliary term adds a Python 0.0, the score
columns are popped before TRL sees the batch), and CPU kernels are deterministic run to run.

The DPO runs are cached per case (module-level), so the two UPO variants of a case share one baseline.
"""

from __future__ import annotations

import pytest
import torch
import transformers
import trl
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from tests.helpers import cpu_args
from trl_upo import UPOTrainer
from trl_upo.quickstart_task import avoid_word_reward

MAX_STEPS = 10

# Two real heads (different types: a registered head and a TRL-style reward function), so the heads path is
# fully exercised: scoring, the score columns surviving TRL's pruning, the wrapped collator, compute_loss popping.
HEADS = [
    {"name": "length", "weight": 1.0, "params": {"direction": "shorter"}},
    {"name": "avoid_very", "type": "function", "weight": 2.0, "params": {"function": avoid_word_reward}},
]

# Keys that measure wall-clock time, not the computation.
_TIMING = ("runtime", "per_second")

# case id -> (DPOConfig/UPOConfig overrides, use LoRA, evaluate); "_explicit_ref_model" passes a loaded ref_model=
CASES = {
    "full-sigmoid-eval": (dict(loss_type="sigmoid"), False, True),
    "lora-sigmoid-gradaccum2": (dict(loss_type="sigmoid", gradient_accumulation_steps=2), True, False),
    "full-ipo": (dict(loss_type="ipo"), False, False),
    "full-hinge": (dict(loss_type="hinge"), False, False),
    "full-sigmoid+sft-weighted": (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]), False, False),
    # Only in the slow test:
    "lora-ipo": (dict(loss_type="ipo"), True, False),
    "lora-hinge": (dict(loss_type="hinge"), True, False),
    "lora-sigmoid+sft-weighted-eval": (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]), True, True),
    "full-sigmoid-gradaccum2-eval": (dict(loss_type="sigmoid", gradient_accumulation_steps=2), False, True),
    "full-precompute-ref-eval": (dict(loss_type="sigmoid", precompute_ref_log_probs=True), False, True),
    "full-explicit-ref-model": (dict(loss_type="sigmoid", _explicit_ref_model=True), False, False),
}

# Fast matrix: (case, variant). Both variants for the two structurally different setups (full FT with eval, LoRA
# with gradient accumulation); for the other loss types the heads-with-alpha-0 variant, which goes through every
# UPO hook (the no-heads variant of those is in the slow test).
FAST = [
    ("full-sigmoid-eval", "no_heads"),
    ("full-sigmoid-eval", "heads_alpha0"),
    ("lora-sigmoid-gradaccum2", "no_heads"),
    ("lora-sigmoid-gradaccum2", "heads_alpha0"),
    ("full-ipo", "heads_alpha0"),
    ("full-hinge", "heads_alpha0"),
    ("full-sigmoid+sft-weighted", "heads_alpha0"),
]
SLOW = [
    ("full-ipo", "no_heads"),
    ("full-hinge", "no_heads"),
    ("full-sigmoid+sft-weighted", "no_heads"),
    ("lora-ipo", "heads_alpha0"),
    ("lora-hinge", "heads_alpha0"),
    ("lora-sigmoid+sft-weighted-eval", "no_heads"),
    ("lora-sigmoid+sft-weighted-eval", "heads_alpha0"),
    ("full-sigmoid-gradaccum2-eval", "heads_alpha0"),
    ("full-sigmoid-eval", "margin_alpha0"),  # the fast margin test runs LoRA; this is its full fine-tuning twin
    ("full-precompute-ref-eval", "heads_alpha0"),
    ("full-explicit-ref-model", "heads_alpha0"),
]

_DPO_CACHE: dict[str, list[dict]] = {}


def _lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")


def _common(case: str) -> tuple[dict, bool]:
    overrides, use_lora, with_eval = CASES[case]
    kw = dict(max_steps=MAX_STEPS, learning_rate=1e-3, **overrides)
    if with_eval:
        kw.update(eval_strategy="steps", eval_steps=5)
    return kw, use_lora


def _train(trainer_cls, model_path, tmp_path, train_dataset, eval_dataset, *, use_lora, **kw) -> list[dict]:
    # DPOTrainer seeds before building the PEFT adapter; seeding here as well keeps any RNG use before that point
    # (none expected) from making the comparison depend on test order.
    transformers.set_seed(42)
    explicit_ref = kw.pop("_explicit_ref_model", False)
    args = cpu_args(tmp_path, **kw)
    trainer = trainer_cls(
        model=model_path,
        ref_model=AutoModelForCausalLM.from_pretrained(model_path) if explicit_ref else None,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if args.eval_strategy != "no" else None,
        peft_config=_lora() if use_lora else None,
    )
    if use_lora:
        assert trainer.ref_model is None  # the reference is the adapter-disabled policy
    trainer.train()
    return trainer.state.log_history


def _dpo_logs(case, model_path, tmp_path_factory, train_dataset, eval_dataset) -> list[dict]:
    if case not in _DPO_CACHE:
        kw, use_lora = _common(case)
        _DPO_CACHE[case] = _train(
            trl.DPOTrainer,
            model_path,
            tmp_path_factory.mktemp(f"dpo-{case}"),
            train_dataset,
            eval_dataset,
            use_lora=use_lora,
            config_cls=trl.DPOConfig,
            **kw,
        )
    return _DPO_CACHE[case]


def _upo_logs(case, variant, model_path, tmp_path, train_dataset, eval_dataset, score_cache) -> list[dict]:
    kw, use_lora = _common(case)
    if variant == "no_heads":
        kw.update(reward_heads=None)
    elif variant == "heads_alpha0":
        kw.update(reward_heads=HEADS, upo_alpha=0.0, upo_score_cache_dir=score_cache)
    elif variant == "margin_alpha0":
        kw.update(reward_heads=HEADS, upo_alpha=0.0, upo_combine="margin", upo_score_cache_dir=score_cache)
    else:  # pragma: no cover
        raise AssertionError(variant)
    return _train(UPOTrainer, model_path, tmp_path / "upo", train_dataset, eval_dataset, use_lora=use_lora, **kw)


def _split(logs: list[dict]) -> tuple[list[dict], list[dict]]:
    train = [h for h in logs if "loss" in h]
    evals = [h for h in logs if "eval_loss" in h]
    return train, evals


def assert_logs_equal(dpo_logs: list[dict], upo_logs: list[dict], *, with_heads: bool, with_eval: bool) -> None:
    dpo_train, dpo_eval = _split(dpo_logs)
    upo_train, upo_eval = _split(upo_logs)
    assert len(dpo_train) == MAX_STEPS, "one train log per step expected (logging_steps=1)"
    assert len(upo_train) == len(dpo_train)
    assert len(upo_eval) == len(dpo_eval) == (2 if with_eval else 0)  # eval_steps=5 over 10 steps

    # The learning rate is high enough that the policy leaves the reference: otherwise "equal" would be weak.
    assert dpo_train[0]["rewards/margins"] == 0.0  # step 1: policy == reference
    assert max(abs(h["rewards/margins"]) for h in dpo_train[1:]) > 1e-3
    assert len({round(h["loss"], 8) for h in dpo_train}) > 5

    for dpo, upo in zip(dpo_train + dpo_eval, upo_train + upo_eval, strict=True):
        keys = [k for k in dpo if not any(t in k for t in _TIMING)]
        assert {"rewards/margins", "logps/chosen"} <= set(keys) or {"eval_rewards/margins", "eval_logps/chosen"} <= set(
            keys
        )
        missing = [k for k in keys if k not in upo]
        assert not missing, f"UPO did not log {missing} at step {dpo.get('step')}"
        got = {k: upo[k] for k in keys}
        want = {k: dpo[k] for k in keys}
        # Exact: same operations, same order, one deterministic CPU process (see the module docstring).
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"step {dpo.get('step')}: {m}")

    # The variant really ran the path it claims to: head metrics iff there are heads.
    has_upo_metrics = any(k.startswith(("upo/", "eval_upo/")) for h in upo_logs for k in h)
    assert has_upo_metrics == with_heads
    if with_heads:
        assert all("upo/length/chosen" in h and "upo/avoid_very/rejected" in h for h in upo_train)
        assert not any("upo/aux_loss" in h for h in upo_train)  # alpha = 0: the term is off
        if with_eval:
            assert all("eval_upo/length/chosen" in h for h in upo_eval)


def _check(case, variant, tiny_model_path, tmp_path, tmp_path_factory, train_dataset, eval_dataset, score_cache):
    _, _, with_eval = CASES[case]
    dpo = _dpo_logs(case, tiny_model_path, tmp_path_factory, train_dataset, eval_dataset)
    upo = _upo_logs(case, variant, tiny_model_path, tmp_path, train_dataset, eval_dataset, score_cache)
    assert_logs_equal(dpo, upo, with_heads=variant != "no_heads", with_eval=with_eval)


@pytest.mark.parametrize(("case", "variant"), FAST, ids=[f"{c}-{v}" for c, v in FAST])
def test_upo_without_aux_term_equals_dpo(
    case, variant, tiny_model_path, tmp_path, tmp_path_factory, train_dataset, eval_dataset, score_cache
):
    _check(case, variant, tiny_model_path, tmp_path, tmp_path_factory, train_dataset, eval_dataset, score_cache)


def test_margin_mode_with_alpha0_equals_dpo_sigmoid(
    tiny_model_path, tmp_path, tmp_path_factory, train_dataset, eval_dataset, score_cache
):
    """``upo_combine="margin"`` is defined on the sigmoid loss; with alpha = 0 it is DPO sigmoid (LoRA here, the
    full fine-tuning twin is in the slow test)."""
    _check(
        "lora-sigmoid-gradaccum2",
        "margin_alpha0",
        tiny_model_path,
        tmp_path,
        tmp_path_factory,
        train_dataset,
        eval_dataset,
        score_cache,
    )


@pytest.mark.slow
@pytest.mark.parametrize(("case", "variant"), SLOW, ids=[f"{c}-{v}" for c, v in SLOW])
def test_upo_without_aux_term_equals_dpo_extended(
    case, variant, tiny_model_path, tmp_path, tmp_path_factory, train_dataset, eval_dataset, score_cache
):
    _check(case, variant, tiny_model_path, tmp_path, tmp_path_factory, train_dataset, eval_dataset, score_cache)
