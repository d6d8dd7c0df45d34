"""UPO on KTO (``UPOKTOTrainer``): without an auxiliary term it is ``KTOTrainer``, bit for bit; with one it reads the
policy forward KTO already runs (not the KL-estimate forward, not the reference), and adds no forward.

Each equivalence case trains ``trl.KTOTrainer`` and ``UPOKTOTrainer`` from the same saved weights, data and seed and
compares every logged metric exactly (one CPU process: the same floating-point operations in the same order).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
import trl
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from tests.helpers import cpu_args
from tests.tiny import preference_dataset
from trl_upo import UPOKTOConfig, UPOKTOTrainer
from trl_upo.quickstart_task import avoid_word_reward
from trl_upo.scoring import score_column

MAX_STEPS = 4
HEADS = [
    {"name": "length", "weight": 1.0, "params": {"direction": "shorter"}},
    {"name": "novery", "type": "function", "weight": 2.0, "params": {"function": avoid_word_reward}},
]
_TIMING = ("runtime", "per_second")


def unpaired(n_pairs: int = 24, seed: int = 0, conversational: bool = False) -> Dataset:
    """The tiny task's pairs split into desirable and undesirable rows, shuffled so that every batch mixes both."""
    from trl.data_utils import unpair_preference_dataset

    return unpair_preference_dataset(preference_dataset(n_pairs, seed=seed, conversational=conversational)).shuffle(
        seed=seed
    )


def _lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")


def _train(cls, model_path, out, data, *, use_lora=False, eval_data=None, ref=False, **kw):
    transformers.set_seed(42)
    config_cls = kw.pop("config_cls", UPOKTOConfig)
    args = cpu_args(out, config_cls=config_cls, max_steps=kw.pop("max_steps", MAX_STEPS), **kw)
    trainer = cls(
        model=model_path,
        ref_model=AutoModelForCausalLM.from_pretrained(model_path) if ref else None,
        args=args,
        train_dataset=data,
        eval_dataset=eval_data,
        peft_config=_lora() if use_lora else None,
    )
    trainer.train()
    return trainer


def _steps(trainer) -> list[dict]:
    return [
        {k: v for k, v in h.items() if not k.startswith("upo/") and not k.startswith("eval_upo/")
         and not any(t in k for t in _TIMING)}
        for h in trainer.state.log_history
    ]


# case -> (config overrides, LoRA, with eval, explicit ref_model)
CASES = {
    "full-kto-eval": (dict(loss_type="kto", eval_strategy="steps", eval_steps=3), False, True, False),
    "lora-kto": (dict(loss_type="kto"), True, False, False),
    "full-apo": (dict(loss_type="apo_zero_unpaired"), False, False, False),
    "lora-apo-gradaccum2": (dict(loss_type="apo_zero_unpaired", gradient_accumulation_steps=2), True, False, False),
    "full-precompute-ref": (dict(loss_type="kto", precompute_ref_log_probs=True), False, False, False),
    "full-explicit-ref": (dict(loss_type="kto"), False, False, True),
}
FAST = [("full-kto-eval", "no_heads"), ("full-kto-eval", "heads_alpha0"), ("lora-kto", "heads_alpha0")]
SLOW = [("lora-kto", "no_heads"), ("full-apo", "heads_alpha0"), ("lora-apo-gradaccum2", "heads_alpha0"),
        ("full-precompute-ref", "heads_alpha0"), ("full-explicit-ref", "heads_alpha0"), ("full-apo", "no_heads")]


def _equivalence(case, variant, tiny_model_path, tmp_path, score_cache):
    overrides, use_lora, with_eval, ref = CASES[case]
    data, eval_data = unpaired(16), (unpaired(4, seed=1) if with_eval else None)
    common = dict(use_lora=use_lora, eval_data=eval_data, ref=ref, **overrides)
    kto = _train(trl.KTOTrainer, tiny_model_path, tmp_path / "kto", data, config_cls=trl.KTOConfig, **common)
    heads = dict(reward_heads=HEADS, upo_alpha=0.0, upo_score_cache_dir=score_cache) if variant == "heads_alpha0" else {}
    upo = _train(UPOKTOTrainer, tiny_model_path, tmp_path / "upo", data, **common, **heads)
    a, b = _steps(kto), _steps(upo)
    assert len(a) == len(b) >= MAX_STEPS
    assert a == b  # every logged KTO metric, exactly
    upo_logged = [h for h in upo.state.log_history if "loss" in h]
    assert all(("upo/length/completion" in h) == bool(heads) for h in upo_logged)
    assert all("upo/aux_loss" not in h for h in upo_logged)


@pytest.mark.parametrize(("case", "variant"), FAST, ids=[f"{c}-{v}" for c, v in FAST])
def test_no_term_is_kto_exactly(case, variant, tiny_model_path, tmp_path, score_cache):
    _equivalence(case, variant, tiny_model_path, tmp_path, score_cache)


@pytest.mark.slow
@pytest.mark.parametrize(("case", "variant"), SLOW, ids=[f"{c}-{v}" for c, v in SLOW])
def test_no_term_is_kto_exactly_more_cases(case, variant, tiny_model_path, tmp_path, score_cache):
    _equivalence(case, variant, tiny_model_path, tmp_path, score_cache)


class _ForwardCounter:
    """Counts the forward calls of modules by forward pre-hooks."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.handles = []

    def watch(self, name, module):
        def hook(module, args, kwargs):
            self.counts[name] = self.counts.get(name, 0) + 1

        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))


def _count_forwards(cls, config_cls, model_path, out, *, use_lora, **kw) -> dict[str, int]:
    transformers.set_seed(42)
    args = cpu_args(out, config_cls=config_cls, max_steps=3, **kw)
    ref = None if use_lora else AutoModelForCausalLM.from_pretrained(model_path)
    trainer = cls(model=model_path, ref_model=ref, args=args, train_dataset=unpaired(8),
                  peft_config=_lora() if use_lora else None)
    counter = _ForwardCounter()
    # The decoder stack runs once per forward of the policy, the KL estimate and the adapter-disabled reference.
    policy = trainer.model.get_base_model() if use_lora else trainer.model
    counter.watch("policy", policy.model)
    if ref is not None:
        counter.watch("reference", trainer.ref_model.model)
    trainer.train()
    return counter.counts


@pytest.mark.parametrize("use_lora", [False, True], ids=["explicit-ref", "lora"])
def test_forwards_per_step_equal_kto(use_lora, tiny_model_path, tmp_path, score_cache):
    kto = _count_forwards(trl.KTOTrainer, trl.KTOConfig, tiny_model_path, tmp_path / "kto", use_lora=use_lora)
    upo = _count_forwards(UPOKTOTrainer, UPOKTOConfig, tiny_model_path, tmp_path / "upo", use_lora=use_lora,
                          reward_heads=HEADS, upo_alpha=1.0, upo_score_cache_dir=score_cache)
    assert upo == kto
    # policy, KL estimate (policy), reference, KL estimate (reference): 2 on each model, or 4 on the LoRA policy
    assert kto == ({"policy": 12} if use_lora else {"policy": 6, "reference": 6})


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_term_reads_the_policy_forward_not_the_kl_one(use_lora, tiny_model_path, tmp_path, score_cache):
    """With ``upo_loglik="sum"`` the logged log-likelihoods of the desirable and undesirable completions are KTO's
    own ``logps/chosen`` and ``logps/rejected``: the policy forward's, not the KL-estimate forward's (mismatched
    completions) nor the reference's."""
    trainer = _train(UPOKTOTrainer, tiny_model_path, tmp_path, unpaired(8), use_lora=use_lora, max_steps=4,
                     reward_heads=HEADS, upo_alpha=1.0, upo_loglik="sum", upo_score_cache_dir=score_cache)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert any(h["kl"] > 0 for h in logs)  # the KL forward ran on other completions
    for h in logs:
        # a batch without undesirable rows logs neither side's value
        assert ("upo/loglik/undesirable" in h) == ("logps/rejected" in h)
        assert h["upo/loglik/desirable"] == pytest.approx(h["logps/chosen"], rel=1e-5)
        if "logps/rejected" in h:
            assert h["upo/loglik/undesirable"] == pytest.approx(h["logps/rejected"], rel=1e-5)
        assert h["loss"] > 1.0 and h["upo/weight/mean"] == pytest.approx(1.0)


def test_scores_statistics_and_state(tiny_model_path, tmp_path, score_cache):
    """Every completion is scored once (cached), the statistics pool the train split's completions, the state is
    saved; a paired dataset is unpaired as KTOTrainer unpairs it."""
    pairs = preference_dataset(12)
    args = cpu_args(tmp_path, config_cls=UPOKTOConfig, max_steps=1, reward_heads=HEADS[1:],
                    upo_score_cache_dir=score_cache)
    trainer = UPOKTOTrainer(model=tiny_model_path, args=args, train_dataset=pairs)
    kto = trl.KTOTrainer(model=tiny_model_path, args=cpu_args(tmp_path / "k", config_cls=trl.KTOConfig),
                         train_dataset=pairs)
    assert trainer.train_dataset["label"] == kto.train_dataset["label"]
    assert trainer.train_dataset["completion_ids"] == kto.train_dataset["completion_ids"]
    expected = [0.0 if "very" in c.split() else 1.0 for c in list(pairs["chosen"]) + list(pairs["rejected"])]
    assert trainer.train_dataset[score_column("novery", "completion")] == expected
    stats = trainer.upo.statistics[0]
    assert stats["count"] == 24 and stats["mean"] == pytest.approx(sum(expected) / 24)
    trainer.train()
    trainer.save_model()
    state = json.loads((tmp_path / "upo_state.json").read_text())
    assert state["statistics"] == [stats] and state["settings"]["upo_applies_to"] == "desirable"
    again = UPOKTOTrainer(model=tiny_model_path, args=args, train_dataset=pairs)
    assert again.upo.score_report["train"] == {"novery": "cached"}


def test_applies_to_all_trains_every_completion(tiny_model_path, tmp_path, score_cache):
    trainer = _train(UPOKTOTrainer, tiny_model_path, tmp_path, unpaired(8), max_steps=2, reward_heads=HEADS,
                     upo_alpha=1.0, upo_applies_to="all", upo_loglik="sum", upo_score_cache_dir=score_cache)
    for h in [h for h in trainer.state.log_history if "loss" in h]:
        # the weights average 1 over all completions of the batch: the advantage mean over them is 0
        assert h["upo/advantage/mean"] == pytest.approx(0.0, abs=1e-9)
        assert h["upo/weight/mean"] == pytest.approx(1.0)


def test_a_batch_without_desirable_rows_adds_nothing(tiny_model_path, tmp_path, score_cache):
    """KTO batches may hold no desirable completion: the term is zero there and its statistics are not logged (no
    NaN reaches the logs)."""
    rows = preference_dataset(8)
    data = Dataset.from_dict({"prompt": list(rows["prompt"]) * 2,
                              "completion": list(rows["rejected"]) + list(rows["chosen"]),
                              "label": [False] * 8 + [True] * 8})
    common = dict(max_steps=2, per_device_train_batch_size=8, loss_type="apo_zero_unpaired")
    kto = _train(trl.KTOTrainer, tiny_model_path, tmp_path / "kto", data, config_cls=trl.KTOConfig, **common)
    upo = _train(UPOKTOTrainer, tiny_model_path, tmp_path / "upo", data, reward_heads=HEADS, upo_alpha=1.0,
                 upo_score_cache_dir=score_cache, **common)
    kto_logs = [h for h in kto.state.log_history if "loss" in h]
    upo_logs = [h for h in upo.state.log_history if "loss" in h]
    without = [i for i, h in enumerate(kto_logs) if "logps/chosen" not in h]
    assert without, "no batch without desirable rows: the sampler changed"
    for i in without:
        assert "upo/aux_loss" not in upo_logs[i] and "upo/loglik/desirable" not in upo_logs[i]
        if i == 0:  # same weights before the first update: the loss is KTO's, the term adds exactly 0
            assert upo_logs[i]["loss"] == kto_logs[i]["loss"]
    for h in upo_logs:
        assert all(math.isfinite(v) for v in h.values() if isinstance(v, float)), h  # no NaN, no -inf max
        assert ("upo/aux_loss" in h) == ("logps/chosen" in h)


def _raising_head(prompts, completions, **kwargs):
    raise AssertionError("scored before the data was checked")


RAISING = [{"name": "boom", "type": "function", "params": {"function": _raising_head}}]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ({"prompt": ["a"], "completion": [" b"]}, "has no \\['label'\\]"),
        ({"prompt": ["a"], "answer": [" b"], "label": [True]}, "has no \\['completion'\\]"),
        ({"prompt": ["a", "c"], "completion": [" b", " d"], "label": [1, 0]}, "must be boolean"),
        ({"prompt": ["a", "c"], "completion": [" b", " d"], "label": ["good", "bad"]}, "must be boolean"),
        ({"prompt": ["a", "c"], "completion": [" b", " d"], "label": [True, None]}, "rows without a label"),
        ({"prompt": ["a", "c"], "completion": [" b", " d"], "label": [True, True]}, "Every row of the train"),
        ({"prompt": ["a", "c"], "completion": [" b", " d"], "label": [False, False]}, "imitate the undesirable answers only"),
    ],
    ids=["no-label", "no-completion", "int-label", "string-label", "missing-label", "only-desirable",
         "no-desirable"],
)
def test_bad_input_fails_before_scoring(rows, message, tiny_model_path, tmp_path, score_cache):
    args = cpu_args(tmp_path, config_cls=UPOKTOConfig, reward_heads=RAISING, upo_score_cache_dir=score_cache)
    with pytest.raises(ValueError, match=message):
        UPOKTOTrainer(model=tiny_model_path, args=args, train_dataset=Dataset.from_dict(rows))


def test_bad_eval_split_fails_before_the_train_split_is_scored(tiny_model_path, tmp_path, score_cache):
    args = cpu_args(tmp_path, config_cls=UPOKTOConfig, reward_heads=RAISING, upo_score_cache_dir=score_cache)
    bad = Dataset.from_dict({"prompt": ["a"], "completion": [" b"], "label": [1]})
    with pytest.raises(ValueError, match="'label' column of the eval dataset must be boolean"):
        UPOKTOTrainer(model=tiny_model_path, args=args, train_dataset=unpaired(4), eval_dataset=bad)


def test_config_choices_for_unpaired_data(tmp_path):
    for field, value in [("upo_applies_to", "chosen"), ("upo_baseline", "pair"), ("upo_combine", "margin")]:
        with pytest.raises(ValueError, match=f"{field} must be one of"):
            cpu_args(tmp_path, config_cls=UPOKTOConfig, **{field: value})
    args = cpu_args(tmp_path, config_cls=UPOKTOConfig)
    assert (args.upo_applies_to, args.upo_baseline, args.loss_type) == ("desirable", "batch", "kto")
    assert args.upo_alpha == 0.25  # the unpaired default (docs/evaluation.md); UPOConfig's is 0.5


def test_a_dpo_config_with_heads_is_refused(tiny_model_path, tmp_path):
    from trl_upo import UPOConfig

    args = cpu_args(tmp_path, config_cls=UPOConfig, reward_heads=HEADS)
    with pytest.raises(TypeError, match="needs a UPOKTOConfig"):
        UPOKTOTrainer(model=tiny_model_path, args=args, train_dataset=unpaired(4))


def test_a_kto_config_with_heads_is_refused_by_the_dpo_trainer_before_scoring(tiny_model_path, tmp_path, monkeypatch):
    """The other direction: UPOTrainer given a UPOKTOConfig with heads fails at once (it used to score the whole
    dataset and then fail inside DPOTrainer on a field KTOConfig lacks)."""
    import trl_upo.core as trainer_module
    from trl_upo import UPOTrainer

    monkeypatch.setattr(trainer_module, "score_dataset", lambda *a, **k: pytest.fail("scored before the check"))
    args = cpu_args(tmp_path, config_cls=UPOKTOConfig, reward_heads=HEADS)
    with pytest.raises(TypeError, match="UPOTrainer needs a UPOConfig"):
        UPOTrainer(model=tiny_model_path, args=args, train_dataset=preference_dataset(4))


def test_alpha_raised_after_construction(tiny_model_path, tmp_path, score_cache):
    """Issue 17: ``trainer.args.upo_alpha = 0.5`` after building with alpha 0 trains with the term; an invalid value
    set after construction fails at ``train()``, naming the field."""
    args = cpu_args(tmp_path, config_cls=UPOKTOConfig, max_steps=1, reward_heads=HEADS, upo_alpha=0.0,
                    upo_score_cache_dir=score_cache)
    trainer = UPOKTOTrainer(model=tiny_model_path, args=args, train_dataset=unpaired(8))
    trainer.args.upo_alpha = -1.0
    with pytest.raises(ValueError, match="upo_alpha must be >= 0"):
        trainer.train()
    trainer.args.upo_alpha = 0.5
    trainer.train()
    assert "upo/aux_loss" in [h for h in trainer.state.log_history if "loss" in h][0]


def test_conversational_data_with_lora(tiny_model_path, tmp_path, score_cache):
    data = unpaired(8, conversational=True)
    trainer = _train(UPOKTOTrainer, tiny_model_path, tmp_path, data, use_lora=True, max_steps=2,
                     reward_heads=HEADS[1:], upo_alpha=1.0, upo_score_cache_dir=score_cache)
    expected = [0.0 if "very" in row["completion"][0]["content"].split() else 1.0 for row in data]
    assert trainer.train_dataset[score_column("novery", "completion")] == expected
    assert all(torch.isfinite(torch.tensor(h["upo/aux_loss"])) for h in trainer.state.log_history if "loss" in h)


def test_upokto_is_the_kto_adapter_of_the_core_on_ktotrainer():
    """The DPO and KTO adapters are siblings on one core: neither is in the other's MRO."""
    from trl_upo import UPOKTOMixin, UPOMixin
    from trl_upo.core import UPOCore

    assert UPOKTOTrainer.__mro__[1:4] == (UPOKTOMixin, UPOCore, trl.KTOTrainer)
    assert UPOMixin not in UPOKTOTrainer.__mro__
    assert UPOKTOTrainer._tag_names == ["trl", "kto", "upo"]


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["precompute_ref_log_probs", "explicit_ref_model"])
def test_term_with_precomputed_or_explicit_reference(setup, tiny_model_path, tmp_path, score_cache):
    """With the term on: the reference read from the precomputed column or an explicit ref_model leaves the term on
    the policy forward (its log-likelihoods are KTO's logps), and evaluation logs the term too."""
    kw = {"precompute_ref_log_probs": True} if setup == "precompute_ref_log_probs" else {}
    trainer = _train(UPOKTOTrainer, tiny_model_path, tmp_path, unpaired(8), eval_data=unpaired(2, seed=1),
                     ref=setup == "explicit_ref_model", max_steps=2, reward_heads=HEADS, upo_alpha=1.0,
                     upo_loglik="sum", upo_score_cache_dir=score_cache, **kw)
    for h in [h for h in trainer.state.log_history if "loss" in h]:
        assert h["upo/loglik/desirable"] == pytest.approx(h["logps/chosen"], rel=1e-5)
    metrics = trainer.evaluate() if kw else trainer.evaluate(eval_dataset=unpaired(2, seed=3))
    assert metrics["eval_upo/loglik/desirable"] == pytest.approx(metrics["eval_logps/chosen"], rel=1e-5)
