"""Saving and resuming: ``upo_state.json`` in every checkpoint and the output dir, and a resumed run that continues
with the same normalisation statistics and the same losses as an uninterrupted one.

Run A (module fixture) trains 6 steps and checkpoints at steps 3 and 6. The other runs resume from copies of
A's checkpoints, so no test can modify A's files for another.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil

import pytest
import yaml
from transformers import TrainerCallback

from trl_upo import UPOTrainer
from trl_upo.checkpoints import mark_complete
from trl_upo.quickstart import NOVERY_HEAD

from tests.helpers import cpu_args
from tests.tiny import preference_dataset

HEADS = [
    {"name": "length"},
    NOVERY_HEAD,
]
STATE_FILE = "upo_state.json"

# Logged losses of a resumed run are compared with the uninterrupted run's at this relative tolerance. On CPU the
# two runs execute the same float32 kernels on the same weights (restored bit-exactly from safetensors), the same
# optimizer/scheduler state and the same batches, so in practice they agree exactly; the tolerance only leaves room
# for a different summation order in a threaded kernel, and is far below any change a wrong normalisation,
# a skipped/repeated batch or a reset optimizer would cause (those move the loss in the 3rd-4th digit or more).
LOSS_RTOL = 1e-5


def _args(output_dir, score_cache, **kwargs):
    defaults = dict(
        reward_heads=HEADS,
        upo_score_cache_dir=score_cache,
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
    )
    defaults.update(kwargs)
    return cpu_args(output_dir, **defaults)


def _loss_logs(trainer) -> dict[int, dict]:
    """Per-step training logs (the entries with a 'loss'), by step."""
    return {h["step"]: h for h in trainer.state.log_history if "loss" in h}


def _read_state(path) -> dict:
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


class _StepCounter(TrainerCallback):
    def __init__(self):
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@pytest.fixture(scope="module")
def run_a(tiny_model_path, tmp_path_factory):
    """The uninterrupted run: 6 steps, checkpoints at 3 and 6, then ``save_model()`` into the output dir."""
    root = tmp_path_factory.mktemp("resume")
    cache = str(root / "score-cache")
    out = root / "run-a"
    trainer = UPOTrainer(
        model=tiny_model_path, args=_args(out, cache), train_dataset=preference_dataset(32, seed=0)
    )
    trainer.train()
    trainer.save_model()
    return {"trainer": trainer, "out": out, "cache": cache, "model": tiny_model_path}


def _copy_checkpoint(run_a, name, dest_dir):
    os.makedirs(dest_dir, exist_ok=True)
    dst = os.path.join(dest_dir, name)
    shutil.copytree(os.path.join(run_a["out"], name), dst)
    return dst


# ----------------------------------------------------------------------------------------------------------------
# What is saved
# ----------------------------------------------------------------------------------------------------------------


def test_upo_state_saved_in_checkpoints_and_output_dir(run_a):
    trainer, out = run_a["trainer"], run_a["out"]
    assert trainer.state.global_step == 6
    expected_heads = [s.to_dict() for s in trainer.upo.specs]
    assert [h["name"] for h in expected_heads] == ["length", "novery"]
    assert [h["type"] for h in expected_heads] == ["length", "function"]
    assert expected_heads[1]["params"] == {"function": "trl_upo.quickstart_task:avoid_word_reward"}
    # Statistics fitted on the train split: one entry per head, z-scored by default, over 2 * 32 responses.
    assert len(trainer.upo.statistics) == 2
    for st in trainer.upo.statistics:
        assert st["mode"] == "zscore" and st["count"] == 64 and st["std"] > 0
    for where in (out / "checkpoint-3", out / "checkpoint-6", out):
        assert (where / STATE_FILE).is_file(), f"no {STATE_FILE} in {where}"
        state = _read_state(where)
        assert state["heads"] == expected_heads, where
        assert state["statistics"] == trainer.upo.statistics, where
        assert state["head_fingerprints"] == [h.fingerprint() for h in trainer.upo.heads]
        assert state["settings"]["upo_alpha"] == trainer.args.upo_alpha
        assert state["settings"]["upo_normalization"] == "zscore"


def test_model_card_and_tags(run_a):
    trainer, out = run_a["trainer"], run_a["out"]
    for tag in ("trl", "dpo", "upo"):
        assert tag in trainer.model.model_tags
    readme = (out / "README.md").read_text()
    assert "2405.17956" in readme
    assert "badrinath2025unified" in readme  # UPO's BibTeX entry, not only DPO's
    assert "Unified Preference Optimization" in readme
    assert readme.startswith("---")
    front_matter = yaml.safe_load(readme.split("---")[1])
    tags = front_matter["tags"]
    for tag in ("trl", "dpo", "upo"):
        assert tag in tags, tags


# ----------------------------------------------------------------------------------------------------------------
# Resuming
# ----------------------------------------------------------------------------------------------------------------


def _assert_same_step_logs(resumed: dict, original: dict, steps):
    for step in steps:
        a, b = original[step], resumed[step]
        print(f"step {step}: loss uninterrupted={a['loss']:.8f} resumed={b['loss']:.8f}")
        assert math.isclose(b["loss"], a["loss"], rel_tol=LOSS_RTOL), (step, a["loss"], b["loss"])
        for key in ("upo/aux_loss", "upo/length/chosen_norm", "upo/novery/chosen_norm", "upo/reward_aux/chosen"):
            assert math.isclose(b[key], a[key], rel_tol=LOSS_RTOL, abs_tol=1e-7), (step, key, a[key], b[key])


def test_resume_continues_with_same_losses(run_a, tmp_path, caplog):
    a_logs = _loss_logs(run_a["trainer"])
    assert sorted(a_logs) == [1, 2, 3, 4, 5, 6]
    out_b = tmp_path / "run-b"
    ckpt = _copy_checkpoint(run_a, "checkpoint-3", out_b)
    counter = _StepCounter()
    trainer = UPOTrainer(
        model=run_a["model"],
        args=_args(out_b, run_a["cache"]),
        train_dataset=preference_dataset(32, seed=0),
        callbacks=[counter],
    )
    with caplog.at_level(logging.WARNING, logger="trl_upo"):
        trainer.train(resume_from_checkpoint=ckpt)
    assert counter.steps == [4, 5, 6]  # trained steps 4-6 only
    # Same data, same statistics: nothing to warn about.
    assert not [r for r in caplog.records if r.name.startswith("trl_upo") and r.levelno >= logging.WARNING]
    assert trainer.upo.statistics == run_a["trainer"].upo.statistics
    _assert_same_step_logs(_loss_logs(trainer), a_logs, [4, 5, 6])
    # And the resumed run writes the same state in its own checkpoint.
    assert _read_state(out_b / "checkpoint-6") == _read_state(run_a["out"] / "checkpoint-6")


def test_resume_true_finds_last_checkpoint(run_a, tmp_path):
    """``resume_from_checkpoint=True`` resumes from the newest checkpoint, and the UPO state is read from it too."""
    out_c = tmp_path / "run-c"
    _copy_checkpoint(run_a, "checkpoint-3", out_c)
    ckpt6 = _copy_checkpoint(run_a, "checkpoint-6", out_c)
    # Mark checkpoint-6's statistics, so that we can tell which checkpoint's upo_state.json was adopted.
    state = _read_state(ckpt6)
    state["statistics"][0]["mean"] += 1.0
    with open(os.path.join(ckpt6, STATE_FILE), "w") as f:
        json.dump(state, f)
    mark_complete(ckpt6)  # the edited state is part of the checkpoint (else its marker says the save was cut short)
    counter = _StepCounter()
    trainer = UPOTrainer(
        model=run_a["model"],
        args=_args(out_c, run_a["cache"], max_steps=7),
        train_dataset=preference_dataset(32, seed=0),
        callbacks=[counter],
    )
    trainer.train(resume_from_checkpoint=True)
    assert counter.steps == [7]  # resumed after step 6, not step 3
    assert trainer.upo.statistics == state["statistics"]
    assert trainer.upo.statistics != run_a["trainer"].upo.statistics


def test_resume_with_other_data_adopts_checkpoint_statistics(run_a, tmp_path, caplog):
    out_d = tmp_path / "run-d"
    ckpt = _copy_checkpoint(run_a, "checkpoint-3", out_d)
    saved = _read_state(ckpt)["statistics"]
    # Most answers contain "very" here (the novery head's mean moves from ~0.5 to ~0.1), and lengths differ.
    other = preference_dataset(32, seed=7, p_word=0.9)
    trainer = UPOTrainer(
        model=run_a["model"],
        args=_args(out_d, run_a["cache"], max_steps=4),
        train_dataset=other,
    )
    fitted = trainer.upo.statistics
    assert fitted != saved  # otherwise this test would prove nothing
    assert abs(fitted[1]["mean"] - saved[1]["mean"]) > 0.2
    with caplog.at_level(logging.WARNING, logger="trl_upo"):
        trainer.train(resume_from_checkpoint=ckpt)
    assert trainer.state.global_step == 4
    assert trainer.upo.statistics == saved
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "statistics" in r.getMessage()]
    assert warnings, [r.getMessage() for r in caplog.records]
    assert "checkpoint" in warnings[0].getMessage()
    # The step trained after resuming normalised its scores with the checkpoint's statistics, not the fitted ones.
    step4 = _loss_logs(trainer)[4]
    for k, name in enumerate(["length", "novery"]):
        raw = step4[f"upo/{name}/chosen"]
        logged = step4[f"upo/{name}/chosen_norm"]
        with_saved = (raw - saved[k]["mean"]) / saved[k]["std"]
        with_fitted = (raw - fitted[k]["mean"]) / fitted[k]["std"]
        assert logged == pytest.approx(with_saved, rel=1e-5, abs=1e-6), (name, logged, with_saved)
        if name == "novery":
            assert abs(with_saved - with_fitted) > 0.1
            assert logged != pytest.approx(with_fitted, rel=1e-3, abs=1e-3)


@pytest.mark.parametrize(
    ("heads", "named"),
    [
        pytest.param(
            [{"name": "length"}, {"name": "words", "type": "length", "params": {"direction": "longer"}}],
            ["heads: ['length', 'novery'] in the checkpoint, ['length', 'words'] in this run"],
            id="other-names",
        ),
        pytest.param([HEADS[1], HEADS[0]], ["['novery', 'length'] in this run"], id="reordered"),
        pytest.param(
            [{"name": "length", "params": {"direction": "longer"}}, HEADS[1]],
            ["head 'length': params.direction 'shorter' in the checkpoint, 'longer' now"],
            id="other-params",
        ),
        # The same heads with another weight, sign or normalisation: a different objective (and, for the
        # normalisation, statistics of another kind), so a different head list too.
        pytest.param([HEADS[0], {**HEADS[1], "weight": 3.0}], ["head 'novery': weight 1.0 in the checkpoint, 3.0 now"],
                     id="other-weight"),
        pytest.param([HEADS[0], {**HEADS[1], "higher_is_better": False}],
                     ["head 'novery': higher_is_better True in the checkpoint, False now"], id="other-sign"),
        pytest.param([HEADS[0], {**HEADS[1], "normalize": "rank"}],
                     ["head 'novery': normalize None in the checkpoint, 'rank' now"], id="other-normalization"),
    ],
)
def test_resume_with_other_heads_raises(run_a, tmp_path, heads, named):
    out_e = tmp_path / "run-e"
    ckpt = _copy_checkpoint(run_a, "checkpoint-3", out_e)
    counter = _StepCounter()
    trainer = UPOTrainer(
        model=run_a["model"],
        args=_args(out_e, run_a["cache"], reward_heads=heads),
        train_dataset=preference_dataset(32, seed=0),
        callbacks=[counter],
    )
    with pytest.raises(ValueError) as exc:
        trainer.train(resume_from_checkpoint=ckpt)
    msg = str(exc.value)
    # The message names what differs (not two long head lists to compare by eye), and how to fix it.
    for line in named:
        assert line in msg, msg
    assert ckpt in msg and "start a new run" in msg
    assert counter.steps == []  # raised before training a step


def test_resume_with_only_a_speed_setting_changed(run_a, tmp_path):
    """The function head's batch_size only changes speed: the resume is accepted and continues bit-exactly (before:
    refused, with two head lists that differed only there)."""
    out = tmp_path / "run-speed"
    ckpt = _copy_checkpoint(run_a, "checkpoint-3", out)
    heads = [HEADS[0], {**HEADS[1], "params": {**HEADS[1]["params"], "batch_size": 5}}]
    trainer = UPOTrainer(
        model=run_a["model"],
        args=_args(out, run_a["cache"], reward_heads=heads, max_steps=4),
        train_dataset=preference_dataset(32, seed=0),
    )
    trainer.train(resume_from_checkpoint=ckpt)
    _assert_same_step_logs(_loss_logs(trainer), _loss_logs(run_a["trainer"]), [4])


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        pytest.param("remove", "has no upo_state.json: it was trained with reward heads", id="missing"),
        pytest.param("truncate", r"upo_state.json is not valid JSON", id="truncated"),
    ],
)
def test_resume_from_checkpoint_with_missing_or_damaged_state_raises(run_a, tmp_path, monkeypatch, damage, pattern):
    """Before: a missing file was a warning (any heads were accepted), a truncated one a raw JSONDecodeError."""
    from trl_upo.state import RESUME_WITHOUT_STATE_ENV

    monkeypatch.delenv(RESUME_WITHOUT_STATE_ENV, raising=False)
    out = tmp_path / "run-damaged"
    ckpt = _copy_checkpoint(run_a, "checkpoint-3", out)
    path = os.path.join(ckpt, STATE_FILE)
    if damage == "remove":
        os.remove(path)
    else:
        with open(path, "r+") as f:
            f.truncate(100)
    counter = _StepCounter()
    trainer = UPOTrainer(
        model=run_a["model"],
        args=_args(out, run_a["cache"], reward_heads=[{"name": "length", "params": {"direction": "longer"}}]),
        train_dataset=preference_dataset(32, seed=0),
        callbacks=[counter],
    )
    with pytest.raises(ValueError, match=pattern) as exc:
        trainer.train(resume_from_checkpoint=ckpt)
    assert ckpt in str(exc.value) and RESUME_WITHOUT_STATE_ENV in str(exc.value)
    assert counter.steps == []


def test_resume_with_lora_continues_with_same_losses(tiny_model_path, tmp_path, score_cache):
    """The same with a LoRA adapter (the reference is the adapter-disabled policy; the checkpoint holds the adapter)."""
    from peft import LoraConfig

    def run(out, resume=None):
        trainer = UPOTrainer(
            model=tiny_model_path,
            args=_args(out, score_cache, max_steps=4, save_steps=2, learning_rate=1e-2),
            train_dataset=preference_dataset(32, seed=0),
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    a = run(tmp_path / "lora-a")
    assert (tmp_path / "lora-a" / "checkpoint-2" / STATE_FILE).is_file()
    assert (tmp_path / "lora-a" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    out_b = tmp_path / "lora-b"
    os.makedirs(out_b)
    shutil.copytree(tmp_path / "lora-a" / "checkpoint-2", out_b / "checkpoint-2")
    b = run(out_b, resume=str(out_b / "checkpoint-2"))
    assert b.upo.statistics == a.upo.statistics
    _assert_same_step_logs(_loss_logs(b), _loss_logs(a), [3, 4])
