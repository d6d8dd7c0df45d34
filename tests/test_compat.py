"""The TRL contract: which way the installed TRL computes log-probs, the check when a trainer is built (before any
scoring), and the message a TRL outside the range gets."""

from __future__ import annotations

import sys

import pytest
import torch
import trl

from tests.helpers import cpu_args
from trl_upo import UPOTrainer, compat
from trl_upo.compat import FUSED, LOGITS, TESTED_TRL, LogProbCapture, TRLContractError, check_trl, logprob_path
from trl_upo.quickstart_task import avoid_word_reward

HEADS = [{"name": "novery", "type": "function", "params": {"function": avoid_word_reward}}]
DPO_MODULE = sys.modules[trl.DPOTrainer.__module__]


def test_the_installed_trl_is_read_the_way_its_version_says():
    from packaging.version import Version

    expected = FUSED if Version(trl.__version__) >= Version("1.15.0") else LOGITS
    assert logprob_path() == expected
    assert check_trl() == expected


def _scoring_forbidden(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("scoring ran before the TRL check")

    monkeypatch.setattr("trl_upo.core.score_dataset", forbidden)


def test_unknown_trl_fails_before_scoring_naming_version_and_range(monkeypatch, tiny_model_path, tmp_path,
                                                                   train_dataset):
    """A DPOTrainer whose _compute_loss reads log-probs neither way (here: one that computes nothing) is refused
    when UPOTrainer is built, before any scoring, with the installed version and the tested range."""

    def _compute_loss(self, model, inputs, return_outputs):
        return model(**inputs)

    monkeypatch.setattr(trl.DPOTrainer, "_compute_loss", _compute_loss)
    _scoring_forbidden(monkeypatch)
    args = cpu_args(tmp_path, reward_heads=HEADS)
    with pytest.raises(TRLContractError) as e:
        UPOTrainer(model=tiny_model_path, args=args, train_dataset=train_dataset)
    msg = str(e.value)
    assert f"TRL {trl.__version__}" in msg and f"{TESTED_TRL[0]} to {TESTED_TRL[1]}" in msg


def test_missing_hook_points_fail_naming_them(monkeypatch):
    monkeypatch.delattr(trl.DPOTrainer, "compute_ref_log_probs")
    with pytest.raises(TRLContractError, match="compute_ref_log_probs"):
        check_trl()


def test_no_heads_checks_nothing(monkeypatch, tiny_model_path, tmp_path, train_dataset):
    """Without reward heads UPOTrainer is DPOTrainer: it trains on whatever TRL does, checked or not."""
    monkeypatch.setattr("trl_upo.core.check_trl", lambda *a, **k: pytest.fail("checked without heads"))
    trainer = UPOTrainer(model=tiny_model_path, args=cpu_args(tmp_path, max_steps=1), train_dataset=train_dataset)
    trainer.train()


def test_fused_head_without_triton_is_refused(monkeypatch):
    """TRL 1.15's fused head is None without Triton and fails at the first step; UPO refuses it up front."""
    if logprob_path() != FUSED:
        pytest.skip("the fused LM head exists from TRL 1.15")
    import trl.trainer.utils as trl_utils

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", None, raising=False)
    with pytest.raises(TRLContractError, match="needs Triton"):
        check_trl()


def test_liger_is_refused_on_the_logits_path(monkeypatch):
    monkeypatch.setattr(compat, "logprob_path", lambda: LOGITS)
    args = type("Args", (), {"use_liger_kernel": True})()
    with pytest.raises(TRLContractError, match="use_liger_kernel"):
        check_trl(args)


def test_a_newer_minor_release_warns(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "1.99.0")
    with pytest.warns(UserWarning, match="newer than the newest release"):
        check_trl()


def test_logits_capture_keeps_policy_and_reference_and_restores_the_functions():
    """On the logits path the wrappers return what TRL's functions return (the same tensor objects), keep the
    policy's (the first call, or the ``..._and_entropy`` one) and the reference's, and are gone afterwards."""
    if logprob_path() != LOGITS:
        pytest.skip("TRL 1.9-1.14 only")
    originals = {n: getattr(DPO_MODULE, n) for n in (compat.POLICY_FN, compat.SHARED_FN) if hasattr(DPO_MODULE, n)}
    logits, labels = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    capture = LogProbCapture(LOGITS)
    with capture.capturing():
        if compat.POLICY_FN in originals:
            policy, _ = getattr(DPO_MODULE, compat.POLICY_FN)(logits, labels)
        else:
            policy = getattr(DPO_MODULE, compat.SHARED_FN)(logits, labels)
        ref = getattr(DPO_MODULE, compat.SHARED_FN)(logits, labels)
        got_policy, got_ref = capture.logps(peft_reference=False)
        assert got_policy is policy and got_ref is ref
    assert {n: getattr(DPO_MODULE, n) for n in originals} == originals
    assert capture.logps(peft_reference=False) == (None, None)


def test_ktotrainer_is_read_the_same_way():
    """KTO's loss computes its log-probs like DPO's on every supported TRL; ``paused`` keeps a forward (KTO's
    KL-estimate forward) out of the capture, and the capture resumes after it."""
    import types

    import torch
    from packaging.version import Version

    expected = FUSED if Version(trl.__version__) >= Version("1.15.0") else LOGITS
    assert logprob_path(trl.KTOTrainer) == expected == check_trl(None, trl.KTOTrainer)

    class FusedHead(torch.nn.Module):
        def forward(self, x, fused_lm_head=False):
            return types.SimpleNamespace(log_probs=x * 2)

    capture = LogProbCapture(FUSED)
    module = FusedHead()
    capture.attach(module, capture.policy)
    with capture.capturing():
        with capture.paused():
            module(torch.ones(1, 2), fused_lm_head=True)  # the KL estimate: not kept
            assert not capture.armed
        assert capture.armed and capture.policy == []
        module(torch.ones(1, 3), fused_lm_head=True)  # the policy forward
        assert [t.shape[1] for t in capture.policy] == [3]
    capture.remove()


def test_adapter_hooks_are_checked_by_declaration_not_by_class_name():
    """The methods an adapter hooks beyond the common ones come from its ``upo_trl_hooks``: a KTO subclass with
    another name is checked for ``_compute_kl_logps`` as KTOTrainer is, and a TRL trainer lacking a declared hook
    fails with the method's name (no trainer special case keyed on a class name)."""
    from trl_upo import UPOKTOTrainer, UPOTrainer
    from trl_upo.compat import TRLContractError

    assert UPOKTOTrainer.upo_trl_hooks == ("_compute_kl_logps",) and UPOTrainer.upo_trl_hooks == ()

    class RenamedKTO(trl.KTOTrainer):
        pass

    assert check_trl(None, RenamedKTO, UPOKTOTrainer.upo_trl_hooks) == logprob_path(trl.KTOTrainer)
    with pytest.raises(TRLContractError, match="_compute_kl_logps"):
        check_trl(None, trl.DPOTrainer, UPOKTOTrainer.upo_trl_hooks)
