"""The resume guard (``trl_upo.state``): it compares the heads' identity (type, weight, sign, normalisation, the
parameters that decide the scores, content fingerprints) and nothing else; a missing, truncated or partial
``upo_state.json`` is a clear error naming the file. The trainer-level cases are in tests/test_resume.py."""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from types import SimpleNamespace

import pytest

from trl_upo.heads import HeadSpec, build_head, parse_head_specs
from trl_upo.state import RESUME_WITHOUT_STATE_ENV, STATE_FILE, build_state, resume_statistics, save_state

STATS = [{"mode": "zscore", "mean": 0.5, "std": 1.0, "count": 8}]
ARGS = SimpleNamespace(upo_alpha=0.5)


def _state(heads: list[dict]) -> dict:
    specs = parse_head_specs(heads)
    return build_state(specs, [build_head(s) for s in specs], [dict(s) for s in STATS] * len(specs), ARGS)


def _checkpoint(tmp_path, heads: list[dict], name="checkpoint-3") -> str:
    ckpt = tmp_path / name
    save_state(str(ckpt), _state(heads))
    (ckpt / "trainer_state.json").write_text(json.dumps({"log_history": [{"loss": 1.0, "upo/x/chosen": 0.1}]}))
    return str(ckpt)


# ------------------------------------------------------------------------------------------------------------------
# Identical heads are accepted
# ------------------------------------------------------------------------------------------------------------------


def test_speed_setting_change_is_accepted(tmp_path):
    """Before: ``batch_size`` 4 -> 8 refused the resume, printing two head lists that differed only there."""
    path = "trl_upo.quickstart_task:avoid_word_reward"
    ckpt = _checkpoint(tmp_path, [{"name": "f", "type": "function", "params": {"function": path, "batch_size": 4}}])
    now = _state([{"name": "f", "type": "function", "params": {"function": path, "batch_size": 8}}])
    assert resume_statistics(ckpt, now) == STATS


def test_default_written_out_is_accepted(tmp_path):
    ckpt = _checkpoint(tmp_path, [{"name": "length"}])
    assert resume_statistics(ckpt, _state([{"name": "length", "params": {"unit": "words"}}])) == STATS


def test_touched_model_files_are_accepted(tmp_path, tiny_reward_model_path):
    """Before: the model head's fingerprint held the files' modification times, so touching them refused the
    resume. Now it follows their content (and batch_size/device are speed settings)."""
    heads = [{"name": "rm", "type": "reward_model", "params": {"model": tiny_reward_model_path, "batch_size": 2}}]
    ckpt = _checkpoint(tmp_path, heads)
    for root, _, files in os.walk(tiny_reward_model_path):
        for f in files:
            st = os.stat(os.path.join(root, f))
            os.utime(os.path.join(root, f), ns=(st.st_atime_ns + 10**9, st.st_mtime_ns + 10**9))
    now = [{"name": "rm", "type": "reward_model",
            "params": {"model": tiny_reward_model_path, "batch_size": 4, "device": "cpu"}}]
    assert resume_statistics(ckpt, _state(now)) == STATS


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """A reward function in a module of its own, rewritten by the test; returns the head list that names it."""
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "upo_resume_mod.py"

    def write(body: str) -> list[dict]:
        path.write_text(body)
        sys.modules.pop("upo_resume_mod", None)
        importlib.invalidate_caches()
        importlib.import_module("upo_resume_mod")
        return [{"name": "f", "type": "function", "params": {"function": "upo_resume_mod:reward"}}]

    yield write
    sys.modules.pop("upo_resume_mod", None)


CODE = "def reward(completions, **kw):\n    return [float(len(c)) for c in completions]\n"


def test_comment_in_the_function_module_is_accepted(tmp_path, reward_module):
    """Before: a comment added to the function refused the resume. The fingerprint reads the module's syntax tree,
    so comments and formatting do not count (the code does: next test)."""
    ckpt = _checkpoint(tmp_path, reward_module(CODE))
    now = _state(reward_module("# scores the length\n" + CODE.replace("\n    return", "\n    # chars\n    return")))
    assert resume_statistics(ckpt, now) == STATS


def test_code_change_in_the_function_module_is_refused_with_a_diff(tmp_path, reward_module):
    ckpt = _checkpoint(tmp_path, reward_module(CODE))
    now = _state(reward_module(CODE.replace("len(c)", "len(c.split())")))
    with pytest.raises(ValueError) as e:
        resume_statistics(ckpt, now)
    msg = str(e.value)
    assert "head 'f': same parameters, but its content changed" in msg and "module source" in msg
    assert msg.count("[{") == 0  # no raw head lists to compare by eye


def test_diff_names_each_difference(tmp_path):
    ckpt = _checkpoint(tmp_path, [{"name": "length"}, {"name": "lexicon", "params": {"avoid": ["very"]}}])
    now = _state([{"name": "length", "weight": 2.0, "params": {"unit": "chars"}},
                  {"name": "lexicon", "params": {"avoid": ["very"], "mode": "rate"}}])
    with pytest.raises(ValueError) as e:
        resume_statistics(ckpt, now)
    lines = [line for line in str(e.value).splitlines() if line.startswith("  - ")]
    assert lines == [
        "  - head 'length': weight 1.0 in the checkpoint, 2.0 now",
        "  - head 'length': params.unit 'words' in the checkpoint, 'chars' now",
        "  - head 'lexicon': params.mode 'count' in the checkpoint, 'rate' now",
    ]


def test_state_of_an_older_version_is_compared_by_parameters(tmp_path, caplog):
    """A format-1 state (no head identities): its heads are compared by parameters, with defaults filled in and
    speed settings left out; a warning says content fingerprints were not compared."""
    ckpt = _checkpoint(tmp_path, [{"name": "length"}])
    state = json.loads((tmp_path / "checkpoint-3" / STATE_FILE).read_text())
    del state["head_identity"]
    state["format"] = 1
    (tmp_path / "checkpoint-3" / STATE_FILE).write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING, logger="trl_upo"):
        assert resume_statistics(ckpt, _state([{"name": "length", "params": {"unit": "words"}}])) == STATS
    assert any("older trl-upo" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="params.unit 'words' in the checkpoint, 'chars' now"):
        resume_statistics(ckpt, _state([{"name": "length", "params": {"unit": "chars"}}]))


# ------------------------------------------------------------------------------------------------------------------
# Missing, truncated or partial upo_state.json
# ------------------------------------------------------------------------------------------------------------------


def test_missing_state_in_a_checkpoint_trained_with_heads_is_refused(tmp_path, monkeypatch, caplog):
    """Before: a warning, then training went on with whatever heads this run had."""
    monkeypatch.delenv(RESUME_WITHOUT_STATE_ENV, raising=False)
    ckpt = _checkpoint(tmp_path, [{"name": "length"}])
    os.remove(os.path.join(ckpt, STATE_FILE))
    now = _state([{"name": "lexicon", "params": {"avoid": ["x"]}}])
    with pytest.raises(ValueError) as e:
        resume_statistics(ckpt, now)
    msg = str(e.value)
    assert f"{ckpt} has no {STATE_FILE}" in msg and "trained with reward heads" in msg
    assert f"{RESUME_WITHOUT_STATE_ENV}=1" in msg  # the override
    monkeypatch.setenv(RESUME_WITHOUT_STATE_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="trl_upo"):
        assert resume_statistics(ckpt, now) is None
    assert any(RESUME_WITHOUT_STATE_ENV in r.getMessage() for r in caplog.records)


def test_missing_state_in_a_checkpoint_trained_without_heads_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(RESUME_WITHOUT_STATE_ENV, raising=False)
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"log_history": [{"loss": 1.0}]}))
    with pytest.raises(ValueError, match="trained without reward heads"):
        resume_statistics(str(ckpt), _state([{"name": "length"}]))


def test_checkpoint_that_is_not_a_directory(tmp_path):
    """Before: ``resume_from_checkpoint="true"`` (a string) said "Checkpoint true has no upo_state.json"."""
    with pytest.raises(ValueError, match=r"Checkpoint 'true' is not a directory. resume_from_checkpoint takes"):
        resume_statistics("true", _state([{"name": "length"}]))


def test_checkpoint_without_any_trainer_state(tmp_path, monkeypatch):
    monkeypatch.delenv(RESUME_WITHOUT_STATE_ENV, raising=False)
    with pytest.raises(ValueError, match="no readable trainer_state.json either, so it may not be a checkpoint"):
        resume_statistics(str(tmp_path), _state([{"name": "length"}]))


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        pytest.param(lambda text: text[: len(text) // 2], r"is not valid JSON \(.* at line \d+, column \d+.*truncated",
                     id="truncated"),
        pytest.param(lambda text: "", r"is not valid JSON", id="empty"),
        pytest.param(lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "statistics"}),
                     r"is not a complete UPO state: its 'statistics' entry is missing", id="no-statistics"),
        pytest.param(lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "heads"}),
                     r"is not a complete UPO state: its 'heads' entry is missing", id="no-heads"),
        pytest.param(lambda text: json.dumps({**json.loads(text), "statistics": []}),
                     r"1 heads but 0 statistics", id="statistics-short"),
        pytest.param(lambda text: json.dumps([1, 2]), r"it holds a list, not a mapping", id="a-list"),
        pytest.param(lambda text: json.dumps({**json.loads(text), "heads": [{"type": "length"}]}),
                     r"an entry of 'heads' is not a mapping with a 'name'", id="head-without-name"),
    ],
)
def test_damaged_state_names_the_file(tmp_path, damage, pattern):
    """Before: a raw JSONDecodeError or KeyError without the file's name."""
    ckpt = _checkpoint(tmp_path, [{"name": "length"}])
    path = os.path.join(ckpt, STATE_FILE)
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(damage(text))
    with pytest.raises(ValueError, match=pattern) as e:
        resume_statistics(ckpt, _state([{"name": "length"}]))
    assert path in str(e.value) and "Resume from another checkpoint" in str(e.value)


def test_state_is_written_atomically(tmp_path):
    save_state(str(tmp_path), _state([{"name": "length"}]))
    assert sorted(os.listdir(tmp_path)) == [STATE_FILE]  # no temporary file left behind
    spec = HeadSpec("length", "length")
    assert json.loads((tmp_path / STATE_FILE).read_text())["heads"] == [spec.to_dict()]
