"""The auxiliary term reads the log-likelihoods of the forward TRL already runs, and runs nothing else.

docs/objective.md (step 6): the per-response log-likelihood is "taken from the **same forward pass** DPO already
runs"; UPO never runs a second forward pass, or loads a second copy of the model, for the auxiliary term; and
``L = L_pref + alpha * L_aux`` (step 8).

(a) With ``upo_loglik="sum"`` the logged ``upo/loglik/*`` equal TRL's logged ``logps/*`` at every step (full
    fine-tuning, LoRA, an explicit ``ref_model``, precomputed reference log-probs); with ``"mean"`` they equal the
    per-response sums divided by the completion lengths, checked against a forward pass run here by hand.
(b) UPO (two heads, alpha 1) runs exactly as many forwards of the policy and of the reference as DPOTrainer, in
    training and in ``evaluate()``, counted by our own forward hooks.
(c) UPO holds no extra model: the same modules and parameters are reachable from the trainer as from DPOTrainer's,
    and constructing it creates no more models.
(d) The term reaches the loss: at step 1 (same weights, same batch) UPO's loss is DPO's plus ``alpha * aux_loss``.
"""

from __future__ import annotations

import gc
import sys
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
import transformers
import trl
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel

from tests.helpers import cpu_args
from trl_upo import UPOTrainer
from trl_upo.compat import FUSED, logprob_path
from trl_upo.quickstart_task import avoid_word_reward

HEADS = [
    {"name": "length", "weight": 1.0, "params": {"direction": "shorter"}},
    {"name": "avoid_very", "type": "function", "weight": 2.0, "params": {"function": avoid_word_reward}},
]
STEPS = 3
EVAL_BATCHES = 2  # 8 eval examples, per_device_eval_batch_size=4
SETUPS = ["full", "lora", "explicit_ref", "precompute"]


#: TRL 1.9-1.14 compute per-token log-probs from logits with these functions of ``trl.trainer.dpo_trainer``.
LOG_SOFTMAX_FUNCTIONS = ("selective_log_softmax", "selective_log_softmax_and_entropy")
FUSED_PATH = logprob_path() == FUSED


def _lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")


def _policy_module(trainer):
    """The module TRL's policy forward goes through by ``__call__`` (under PEFT: the tuner around the base model;
    PEFT 0.20 calls the base model's ``forward`` directly, past its hooks)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    return model.base_model if isinstance(model, PeftModel) else model


def _live_models() -> tuple[int, int]:
    """Number of live top-level PreTrainedModel objects (a LlamaForCausalLM, not also its inner LlamaModel) and the
    total elements of their distinct parameters, over the whole process."""
    gc.collect()
    models = [obj for obj in gc.get_objects() if isinstance(obj, PreTrainedModel)]
    inner = {id(sub) for m in models for sub in m.modules() if sub is not m}
    roots = [m for m in models if id(m) not in inner]
    seen: set[int] = set()
    numel = 0
    for m in roots:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                numel += p.numel()
    return len(roots), numel


@dataclass
class Run:
    """What a finished run leaves behind (facts only: trainers are not kept alive across tests)."""

    logs: list[dict]
    eval_metrics: dict
    # phase -> Counter of "policy", "policy_fused", "ref", "ref_fused" calls
    forwards: dict[str, Counter]
    ref_model_is_none: bool
    is_peft: bool
    policy_numel: int  # trainer.model (for PEFT: base + adapter)
    base_numel: int  # the module TRL calls (for PEFT: the base model)
    footprint: tuple[int, int]  # (distinct parameter storages, elements) reachable from the trainer
    reachable_models: list[str]  # class names of the PreTrainedModels reachable from the trainer
    # Top-level models / parameter elements alive in the process after train+evaluate minus before construction
    created: tuple[int, int] | None = None


class _ForwardCounter:
    def __init__(self) -> None:
        self.phase = "train"
        self.counts: dict[str, Counter] = {"train": Counter(), "eval": Counter()}

    def hook(self, role):
        def _hook(module, args, kwargs, output):
            self.counts[self.phase][role] += 1
            if kwargs.get("fused_lm_head"):
                self.counts[self.phase][f"{role}_fused"] += 1

        return _hook


def _build(kind, setup, model_path, out_dir, train_dataset, eval_dataset, score_cache, **overrides):
    transformers.set_seed(42)
    kw = {"max_steps": STEPS, "learning_rate": 1e-3, **overrides}
    if setup == "precompute":
        kw["precompute_ref_log_probs"] = True
    if kind == "dpo":
        kw["config_cls"] = trl.DPOConfig
    else:
        kw.setdefault("reward_heads", HEADS)
        kw.setdefault("upo_alpha", 1.0)
        kw.setdefault("upo_score_cache_dir", score_cache)
    args = cpu_args(out_dir, **kw)
    ref_model = AutoModelForCausalLM.from_pretrained(model_path) if setup == "explicit_ref" else None
    return (trl.DPOTrainer if kind == "dpo" else UPOTrainer)(
        model=model_path,
        ref_model=ref_model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=_lora() if setup == "lora" else None,
    )


def _train_and_count(trainer) -> tuple[list[dict], dict, dict[str, Counter]]:
    """Train and evaluate, counting the forwards of the policy module and the reference model and, on TRL's logits
    path (1.9-1.14), the full-vocabulary log-softmax calls of TRL's ``dpo_trainer`` module."""
    counter = _ForwardCounter()
    handles = [_policy_module(trainer).register_forward_hook(counter.hook("policy"), with_kwargs=True)]
    if trainer.ref_model is not None:
        ref = trainer.accelerator.unwrap_model(trainer.ref_model)
        handles.append(ref.register_forward_hook(counter.hook("ref"), with_kwargs=True))
    module = sys.modules[trl.DPOTrainer.__module__]
    originals = {name: getattr(module, name) for name in LOG_SOFTMAX_FUNCTIONS if hasattr(module, name)}

    def counting(fn):
        def wrapped(*args, **kwargs):
            counter.counts[counter.phase]["log_softmax"] += 1
            return fn(*args, **kwargs)

        return wrapped

    for name, fn in originals.items():
        setattr(module, name, counting(fn))
    try:
        trainer.train()
        counter.phase = "eval"
        eval_metrics = trainer.evaluate()
    finally:
        for h in handles:
            h.remove()
        for name, fn in originals.items():
            setattr(module, name, fn)
    return trainer.state.log_history, eval_metrics, counter.counts


_RUNS: dict[tuple[str, str], Run] = {}


@pytest.fixture
def run_setup(tiny_model_path, tmp_path_factory, train_dataset, eval_dataset, score_cache):
    """``run_setup(kind, setup)``: a DPO or UPO run of STEPS steps followed by ``evaluate()``, cached per module.

    UPO: two heads, ``upo_alpha=1``, ``upo_loglik="sum"``; DPO: the same arguments without the UPO fields.
    """

    def get(kind: str, setup: str) -> Run:
        key = (kind, setup)
        if key not in _RUNS:
            count_models = setup in ("full", "lora")
            before = _live_models() if count_models else None
            trainer = _build(
                kind,
                setup,
                tiny_model_path,
                tmp_path_factory.mktemp(f"{kind}-{setup}"),
                train_dataset,
                eval_dataset,
                score_cache,
                **({} if kind == "dpo" else {"upo_loglik": "sum"}),
            )
            logs, eval_metrics, counts = _train_and_count(trainer)
            created = None
            if count_models:
                after = _live_models()  # the trainer is still alive here
                created = (after[0] - before[0], after[1] - before[1])
            _RUNS[key] = Run(
                logs=logs,
                eval_metrics=eval_metrics,
                forwards=counts,
                ref_model_is_none=trainer.ref_model is None,
                is_peft=isinstance(trainer.model, PeftModel),
                policy_numel=sum(p.numel() for p in trainer.model.parameters()),
                base_numel=sum(p.numel() for p in _policy_module(trainer).parameters()),
                footprint=_param_footprint(trainer),
                reachable_models=sorted(
                    type(m).__name__ for m in _reachable_modules(trainer) if isinstance(m, (PreTrainedModel, PeftModel))
                ),
                created=created,
            )
            del trainer
        return _RUNS[key]

    return get


def _train_logs(logs):
    out = [h for h in logs if "loss" in h]
    assert len(out) == STEPS
    return out


# ---------------------------------------------------------------------------------------------------------------
# (a) The log-likelihoods of the auxiliary term are TRL's
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setup", SETUPS)
def test_sum_loglik_equals_trl_logged_logps_every_step(run_setup, setup):
    run = run_setup("upo", setup)
    logs = _train_logs(run.logs)
    if setup == "lora":
        assert run.ref_model_is_none
    got, want = [], []
    for h in logs:
        assert "upo/aux_loss" in h  # the term is on: alpha 1, two heads
        got.append((h["upo/loglik/chosen"], h["upo/loglik/rejected"]))
        want.append((h["logps/chosen"], h["logps/rejected"]))
    # Both are the batch mean of per-response sums of the very same per-token tensor (TRL's fused-head output is 0
    # where masked, UPO multiplies by the 0/1 completion mask), summed in the same order: equal exactly.
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # The policy moved away from the reference after step 1, so later steps compare trained log-probs.
    assert logs[0]["rewards/margins"] == 0.0
    assert all(abs(h["rewards/chosen"]) > 0 for h in logs[1:])
    # Evaluation reads the same forward too.
    m = run.eval_metrics
    torch.testing.assert_close(
        (m["eval_upo/loglik/chosen"], m["eval_upo/loglik/rejected"]),
        (m["eval_logps/chosen"], m["eval_logps/rejected"]),
        rtol=0,
        atol=0,
    )


def test_mean_loglik_is_sum_over_completion_length(tiny_model_path, tmp_path, train_dataset, score_cache):
    """``upo_loglik="mean"``: per response, the summed completion log-prob divided by the completion length.

    Checked (1) at every step from the per-token log-probs of TRL's own forward, captured by our hook, and (2) at
    step 1 against a plain forward (full logits, log_softmax) of a freshly loaded model run here by hand.
    """
    trainer = _build(
        "upo", "full", tiny_model_path, tmp_path / "out", train_dataset, None, score_cache, upo_loglik="mean"
    )
    seen, masks = [], []

    def hook(module, args, kwargs, output):
        # TRL 1.15+: the fused LM head's log-probs; TRL 1.9-1.14: computed here from the logits TRL reads them from.
        if kwargs.get("fused_lm_head"):
            log_probs = output.log_probs
        elif torch.is_grad_enabled() and getattr(output, "logits", None) is not None:
            targets = kwargs["input_ids"][:, 1:]
            log_probs = torch.log_softmax(output.logits[:, :-1].float(), -1).gather(-1, targets[..., None])[..., 0]
        else:
            return
        seen.append(
            {
                "input_ids": kwargs["input_ids"].detach().clone(),
                "attention_mask": kwargs["attention_mask"].detach().clone(),
                "log_probs": log_probs.detach().clone(),
            }
        )

    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, *args, **kwargs):
        masks.append(inputs["completion_mask"].detach().clone())
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording_compute_loss
    handle = _policy_module(trainer).register_forward_hook(hook, with_kwargs=True)
    try:
        trainer.train()
    finally:
        handle.remove()
    logs = _train_logs(trainer.state.log_history)
    assert len(seen) == len(masks) == STEPS  # one policy forward per step (the reference is a separate module)
    for batch, mask in zip(seen, masks, strict=True):
        batch["labels"] = batch["input_ids"].masked_fill(mask == 0, -100)

    def per_response(log_probs, labels):
        mask = (labels[:, 1:] != -100).to(log_probs.dtype)
        per_token = log_probs[:, -mask.size(1) :]
        sums = (per_token * mask).sum(dim=1)
        lengths = mask.sum(dim=1)
        assert (lengths > 0).all()
        return sums.double(), lengths.double()

    lengths_vary = False
    for step, (h, batch) in enumerate(zip(logs, seen, strict=True), start=1):
        sums, lengths = per_response(batch["log_probs"], batch["labels"])
        (sum_c, sum_r), (len_c, len_r) = sums.chunk(2), lengths.chunk(2)
        lengths_vary |= len(set(lengths.tolist())) > 1
        # The captured forward is the one TRL logs (sums agree with logps/*) ...
        assert h["logps/chosen"] == pytest.approx(sum_c.mean().item(), rel=1e-6)
        assert h["logps/rejected"] == pytest.approx(sum_r.mean().item(), rel=1e-6)
        # ... and the mean log-likelihood divides each response's sum by its own completion length. rel 1e-6, not
        # exact: here the division and the batch mean run in float64, UPO's in float32.
        assert h["upo/loglik/chosen"] == pytest.approx((sum_c / len_c).mean().item(), rel=1e-6), step
        assert h["upo/loglik/rejected"] == pytest.approx((sum_r / len_r).mean().item(), rel=1e-6), step
        # Not the sum, and not the batch sum over the batch's total tokens.
        assert h["upo/loglik/chosen"] != pytest.approx(h["logps/chosen"], rel=1e-3)
        assert h["upo/loglik/chosen"] != pytest.approx((sum_c.sum() / len_c.sum()).item(), rel=1e-4)
    assert lengths_vary, "completion lengths must differ within a batch for this test to tell the reductions apart"

    # By hand at step 1: the initial weights, the first batch, an ordinary forward with full logits.
    first = seen[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    with torch.no_grad():
        logits = model(input_ids=first["input_ids"], attention_mask=first["attention_mask"]).logits
    logps = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    targets = first["input_ids"][:, 1:]
    token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = (first["labels"][:, 1:] != -100).double()
    hand_c, hand_r = ((token_logps * mask).sum(1) / mask.sum(1)).chunk(2)
    hand_sum_c, _ = (token_logps * mask).sum(1).chunk(2)
    # The fused LM head computes the same log-probs in tiles, in float32: agreement to float32 rounding.
    assert logs[0]["logps/chosen"] == pytest.approx(hand_sum_c.mean().item(), rel=1e-5)
    assert logs[0]["upo/loglik/chosen"] == pytest.approx(hand_c.mean().item(), rel=1e-5)
    assert logs[0]["upo/loglik/rejected"] == pytest.approx(hand_r.mean().item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# (b) No extra forward
# ---------------------------------------------------------------------------------------------------------------

# Per optimizer step (and per eval batch): calls of the policy module and of the separate reference model.
EXPECTED_FORWARDS = {
    "full": {"policy": 1, "ref": 1},  # reference loaded from the model path
    "lora": {"policy": 2},  # the policy, then the adapter-disabled policy as the reference
    "explicit_ref": {"policy": 1, "ref": 1},
    "precompute": {"policy": 1},  # reference log-probs computed at construction
}


@pytest.mark.parametrize("setup", SETUPS)
def test_upo_runs_exactly_as_many_forwards_as_dpo(run_setup, setup):
    dpo, upo = run_setup("dpo", setup), run_setup("upo", setup)
    assert any("upo/aux_loss" in h for h in upo.logs)  # the auxiliary term was computed

    for phase, n in (("train", STEPS), ("eval", EVAL_BATCHES)):
        assert upo.forwards[phase] == dpo.forwards[phase], phase
        expected = Counter()
        for role, per in EXPECTED_FORWARDS[setup].items():
            expected[role] = per * n
            if FUSED_PATH:
                expected[f"{role}_fused"] = per * n  # every forward is TRL's fused-head forward
            else:  # one log-softmax over the vocabulary per forward, and no other
                expected["log_softmax"] += per * n
        assert dpo.forwards[phase] == expected, (phase, dpo.forwards[phase])
        assert upo.forwards[phase] == expected, (phase, upo.forwards[phase])


# ---------------------------------------------------------------------------------------------------------------
# (c) No second copy of the model
# ---------------------------------------------------------------------------------------------------------------


def _reachable_modules(trainer) -> list[torch.nn.Module]:
    """Every nn.Module reachable from the trainer's attributes (through containers and plain objects)."""
    found: dict[int, torch.nn.Module] = {}
    seen: set[int] = set()
    stack = [(v, 0) for v in vars(trainer).values()]
    skip_types = (str, bytes, int, float, bool, type(None), torch.Tensor)
    while stack:
        obj, depth = stack.pop()
        if id(obj) in seen or isinstance(obj, skip_types) or depth > 4:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            found[id(obj)] = obj
            continue  # its parameters cover its submodules
        if isinstance(obj, dict):
            stack.extend((v, depth + 1) for v in obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend((v, depth + 1) for v in obj)
        elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in (
            "trl",
            "trl_upo",
            "transformers",
            "accelerate",
            "peft",
            "torch",
        ):
            stack.extend((v, depth + 1) for v in vars(obj).values())
    return list(found.values())


def _param_footprint(trainer) -> tuple[int, int]:
    """(distinct parameter storages, their total elements) over every module reachable from the trainer."""
    storages: dict[int, int] = {}
    for module in _reachable_modules(trainer):
        for p in module.parameters():
            storages[p.untyped_storage().data_ptr()] = p.numel()
    return len(storages), sum(storages.values())


@pytest.mark.parametrize("setup", ["full", "lora"])
def test_upo_holds_no_second_copy_of_the_model(run_setup, setup):
    dpo, upo = run_setup("dpo", setup), run_setup("upo", setup)
    assert any("upo/aux_loss" in h for h in upo.logs)  # the auxiliary term was on

    if setup == "lora":
        assert upo.ref_model_is_none and dpo.ref_model_is_none
        assert upo.is_peft
        # One copy of the base weights: everything reachable from the trainer is the policy (base + adapter).
        assert upo.footprint[1] == upo.policy_numel
        assert upo.reachable_models == ["PeftModelForCausalLM"]  # wraps the one LlamaForCausalLM
    else:
        # Full fine-tuning: the policy and the reference DPOTrainer loads from the same path, nothing more.
        assert not upo.ref_model_is_none
        assert upo.footprint[1] == 2 * upo.base_numel
        assert upo.reachable_models == ["LlamaForCausalLM", "LlamaForCausalLM"]

    assert upo.footprint == dpo.footprint
    assert upo.reachable_models == dpo.reachable_models
    # Over the whole process: building, training and evaluating UPO (scoring, statistics, hooks included) left no
    # more models alive than DPOTrainer's run did.
    assert upo.created == dpo.created
    assert upo.created[0] == (1 if setup == "lora" else 2)


# ---------------------------------------------------------------------------------------------------------------
# (d) The auxiliary term reaches the loss and the gradient
# ---------------------------------------------------------------------------------------------------------------


def test_aux_term_adds_alpha_times_aux_loss(run_setup, tiny_model_path, tmp_path, train_dataset, score_cache):
    dpo = _train_logs(run_setup("dpo", "full").logs)
    alpha = 0.5
    trainer = _build(
        "upo", "full", tiny_model_path, tmp_path / "out", train_dataset, None, score_cache, upo_alpha=alpha
    )
    trainer.train()
    upo = _train_logs(trainer.state.log_history)

    # Step 1: same weights, same batch, so TRL's part is identical ...
    for key in ("logps/chosen", "logps/rejected", "rewards/margins"):
        assert upo[0][key] == dpo[0][key], key
    aux = upo[0]["upo/aux_loss"]
    assert aux > 0.1  # a weighted negative log-likelihood: clearly positive
    # ... and the loss is DPO's plus alpha * L_aux.
    assert abs(upo[0]["loss"] - (dpo[0]["loss"] + alpha * aux)) < 1e-5
    # The gradient changed too: a different gradient norm at step 1, so different weights after it.
    assert abs(upo[0]["grad_norm"] - dpo[0]["grad_norm"]) > 1e-3 * dpo[0]["grad_norm"]
    assert upo[1]["logps/chosen"] != pytest.approx(dpo[1]["logps/chosen"], rel=1e-6)


def test_margin_mode_adds_its_correction(run_setup, tiny_model_path, tmp_path, train_dataset, score_cache):
    dpo = _train_logs(run_setup("dpo", "full").logs)
    trainer = _build(
        "upo",
        "full",
        tiny_model_path,
        tmp_path / "out",
        train_dataset,
        None,
        score_cache,
        upo_alpha=1.0,
        upo_combine="margin",
    )
    trainer.train()
    upo = _train_logs(trainer.state.log_history)
    for key in ("logps/chosen", "logps/rejected", "rewards/margins"):
        assert upo[0][key] == dpo[0][key], key
    correction = upo[0]["upo/margin_correction"]
    assert abs(correction) > 1e-3
    assert abs(upo[0]["loss"] - (dpo[0]["loss"] + correction)) < 1e-5
    assert upo[1]["logps/chosen"] != pytest.approx(dpo[1]["logps/chosen"], rel=1e-6)


@pytest.mark.parametrize("setup", ["lora", "explicit_ref", "precompute"])
def test_margin_mode_reads_the_reference_trl_uses(tiny_model_path, tmp_path, train_dataset, score_cache, setup):
    """The margin mode needs the reference log-probs too: the adapter-disabled second forward (LoRA), the separate
    ``ref_model``'s forward, or the precomputed columns. With one pair per batch the logged ``rewards/margins`` is
    TRL's ``beta * delta`` for that pair, so the correction ``-log sig(beta*delta - alpha*m) + log sig(beta*delta)``
    can be recomputed from logged values at every step, including after the policy has moved."""
    alpha = 1.0
    trainer = _build(
        "upo",
        setup,
        tiny_model_path,
        tmp_path / "out",
        train_dataset,
        None,
        score_cache,
        max_steps=4,
        per_device_train_batch_size=1,
        upo_alpha=alpha,
        upo_combine="margin",
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    assert logs[0]["rewards/margins"] == 0.0
    assert any(abs(h["rewards/margins"]) > 1e-5 for h in logs[1:])  # the policy left the reference
    logsig = torch.nn.functional.logsigmoid
    for h in logs:
        bd = torch.tensor(h["rewards/margins"], dtype=torch.float64)
        m = torch.tensor(h["upo/reward_margin"], dtype=torch.float64)
        want = (-logsig(bd - alpha * m) + logsig(bd)).item()
        # rel 1e-5: the trainer computes in float32, the logged margin is a float32 value recomputed here in float64.
        assert h["upo/margin_correction"] == pytest.approx(want, rel=1e-5, abs=1e-6), h["step"]
