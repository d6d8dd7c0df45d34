"""Bad head parameters fail when the config is built, with a message that names the head, the parameter and what
is allowed (each head's schema, declared once in its ``__init__`` signature); fingerprints follow what decides
the scores (a function's module source, ``version``) and leave out speed-only settings."""

from __future__ import annotations

import importlib
import re
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from tests.helpers import cpu_args
from trl_upo import registered_heads
from trl_upo.heads import FunctionHead, HeadSpec, LengthHead, build_head, weight_cap_warning
from trl_upo.heads.schema import head_schema, markdown_table, speed_only_params

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path, head):
    return cpu_args(tmp_path / "out", reward_heads=[head])


# ------------------------------------------------------------------------------------------------------------------
# Parameters validated when the config is built
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "pattern"),
    [
        pytest.param({"name": "length", "params": {"direction": "sideways"}},
                     r"reward_heads\[0\] \(length\): reward head 'length': parameter 'direction' must be one of "
                     r"\['shorter', 'longer'\], got 'sideways'", id="length-direction-sideways"),
        pytest.param({"name": "length", "params": {"unit": "word"}}, r"got 'word' \(did you mean 'words'\?\)",
                     id="length-unit-did-you-mean"),
        pytest.param({"name": "length", "params": {"diretion": "longer"}},
                     r"unknown 'diretion' \(did you mean 'direction'\?\)", id="length-unknown-param-did-you-mean"),
        pytest.param({"name": "length", "params": {"target": "forty"}},
                     r"parameter 'target' must be a number or null, got 'forty' \(str\)", id="length-target-string"),
        pytest.param({"name": "length", "params": {"target": True}}, r"parameter 'target' must be a number or null",
                     id="length-target-bool"),
        pytest.param({"name": "length", "params": {"target": -3}}, r"parameter 'target' must be >= 0, got -3",
                     id="length-target-negative"),
        pytest.param({"name": "lexicon", "params": {"avoid": ["x"], "regex": "yes"}},
                     r"parameter 'regex' must be true or false, got 'yes'", id="lexicon-regex-string"),
        pytest.param({"name": "lexicon", "params": {"avoid": [1, 2]}}, r"parameter 'avoid' must be a list of",
                     id="lexicon-avoid-numbers"),
        pytest.param({"name": "lexicon", "params": {"avoid": ["x"], "mode": "sum"}},
                     r"parameter 'mode' must be one of \['presence', 'count', 'rate'\]", id="lexicon-mode"),
        pytest.param({"name": "readability", "params": {"metric": "flesch"}},
                     r"parameter 'metric' must be one of .*did you mean", id="readability-metric"),
        pytest.param({"name": "readability", "params": {"empty_score": "low"}},
                     r"parameter 'empty_score' must be a number", id="readability-empty-score-string"),
        pytest.param({"name": "column", "params": {"chosen": "a"}},
                     r"needs both 'chosen' and 'rejected' column names .*or 'completion'", id="column-missing-required"),
        pytest.param({"name": "column", "params": {"chosen": "a", "rejected": 3}},
                     r"parameter 'rejected' must be a string or null, got 3", id="column-rejected-int"),
        pytest.param({"name": "f", "type": "function", "params": {"function": 3}},
                     r"parameter 'function' must be a callable or a string", id="function-not-callable"),
        pytest.param({"name": "f", "type": "function",
                      "params": {"function": "trl_upo.quickstart_task:avoid_word_reward", "batch_size": 0}},
                     r"parameter 'batch_size' must be >= 1, got 0", id="function-batch-size-zero"),
        pytest.param({"name": "c", "type": "classifier", "params": {"model": "x", "labels": True}},
                     r"parameter 'labels' must be", id="classifier-labels-bool"),
        pytest.param({"name": "c", "type": "classifier", "params": {"model": "x", "labels": "a", "output": "prob"}},
                     r"parameter 'output' must be one of \['probability', 'logit'\].*did you mean 'probability'",
                     id="classifier-output"),
        pytest.param({"name": "r", "type": "reward_model", "params": {"model": "x", "dtype": "fp16"}},
                     r"parameter 'dtype' must be one of \['auto', 'float32', 'float16', 'bfloat16'\]",
                     id="reward-model-dtype"),
        pytest.param({"name": "r", "type": "reward_model", "params": {"model": "x", "batch_size": 2.5}},
                     r"parameter 'batch_size' must be an integer, got 2.5", id="reward-model-batch-size-float"),
        pytest.param({"name": "s", "type": "similarity", "params": {"exemplars": ["a"], "aggregate": "min"}},
                     r"parameter 'aggregate' must be one of \['max', 'mean'\]", id="similarity-aggregate"),
        pytest.param({"name": "length", "weight": True}, r"weight must be a number, got True", id="weight-true"),
    ],
)
def test_bad_head_params_fail_at_config_time(tmp_path, head, pattern):
    """Before: ``direction: sideways`` was a traceback from the head's constructor at scoring time, ``weight: true``
    was taken as 1.0, and wrong types went through to the head."""
    with pytest.raises(ValueError, match=pattern):
        _config(tmp_path, head)


def test_every_head_declares_its_parameters():
    """Every parameter of every built-in head has a doc line in its schema (the docs' tables are made from it)."""
    for name, cls in registered_heads().items():
        if cls is None or not cls.__module__.startswith("trl_upo."):
            continue
        undocumented = [p for p, info in head_schema(cls).items() if not info.meta.doc]
        assert not undocumented, f"{name}: parameters without Param(doc=...): {undocumented}"


def test_speed_only_parameters_are_declared():
    heads = registered_heads()
    assert speed_only_params(heads["function"]) == {"batch_size"}
    assert {"batch_size", "device"} <= speed_only_params(heads["classifier"])
    assert {"batch_size", "device"} <= speed_only_params(heads["reward_model"])
    assert speed_only_params(heads["similarity"]) == {"batch_size", "device"}
    assert speed_only_params(heads["length"]) == set()


def _doc_table(page: str) -> str:
    text = (ROOT / "docs" / "heads" / f"{page}.md").read_text()
    section = text.split("## Parameters", 1)[1]
    return "\n".join(line for line in section.splitlines() if line.startswith("|"))


@pytest.mark.parametrize("name", ["classifier", "column", "function", "length", "lexicon", "readability",
                                  "reward_model", "similarity"])
def test_doc_parameter_tables_match_the_schema(name):
    """docs/heads/<name>.md shows exactly the table generated from the schema (trl_upo.heads.schema.markdown_table):
    names, defaults, meanings, speed-only marks. Regenerate with ``markdown_table(cls)`` after changing a head."""
    cls = registered_heads()[name]
    table = _doc_table(name)
    if name == "readability":  # its page has the metric table first
        table = table[table.index("| parameter |"):]
    assert table == markdown_table(cls)


# ------------------------------------------------------------------------------------------------------------------
# Fingerprints: content decides, speed does not
# ------------------------------------------------------------------------------------------------------------------


def _write_module(path: Path, helper_body: str, comment: str = "") -> None:
    path.write_text(textwrap.dedent(f"""\
        {comment}
        def helper(text):
            {helper_body}


        def reward(completions, **kwargs):
            return [helper(c) for c in completions]
        """))


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """A reward function in a module of its own (``upo_fp_mod``), rewritten by the test and re-imported."""
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "upo_fp_mod.py"

    def load(helper_body: str, comment: str = ""):
        _write_module(path, helper_body, comment)
        sys.modules.pop("upo_fp_mod", None)
        importlib.invalidate_caches()
        return importlib.import_module("upo_fp_mod").reward

    yield load
    sys.modules.pop("upo_fp_mod", None)


def test_function_fingerprint_follows_helpers_in_its_module(reward_module):
    """Before: only the top-level function's source was hashed, so editing ``helper`` reused stale scores."""
    fp = FunctionHead(reward_module("return float(len(text))")).fingerprint()
    assert FunctionHead(reward_module("return float(len(text))")).fingerprint() == fp  # stable
    edited = FunctionHead(reward_module("return float(len(text.split()))"))
    assert edited.score(["p"], ["a b"], role="chosen", columns={}) == [2.0]
    assert edited.fingerprint() != fp
    # By dotted path too.
    assert FunctionHead("upo_fp_mod:reward").fingerprint() == edited.fingerprint()


def test_function_fingerprint_ignores_comments_and_formatting(reward_module):
    fp = FunctionHead(reward_module("return float(len(text))")).fingerprint()
    commented = FunctionHead(reward_module("return float(len(text))  # the length", comment="# a new comment"))
    assert commented.fingerprint() == fp


def test_function_version_parameter_changes_the_fingerprint(tmp_path):
    path = "trl_upo.quickstart_task:avoid_word_reward"
    fps = {build_head(HeadSpec("f", "function", params={"function": path, **extra})).fingerprint()
           for extra in ({}, {"version": 2}, {"version": "2024-06-01"})}
    assert len(fps) == 3
    cfg = _config(tmp_path, {"name": "f", "type": "function", "params": {"function": path, "version": 3}})
    assert cfg.head_specs[0].params["version"] == 3


def test_speed_only_parameters_do_not_change_the_fingerprint():
    path = "trl_upo.quickstart_task:avoid_word_reward"
    assert FunctionHead(path, batch_size=2).fingerprint() == FunctionHead(path).fingerprint()
    # Defaults filled in: naming a default is the same head.
    assert LengthHead(unit="words").fingerprint() == LengthHead().fingerprint()
    assert LengthHead(unit="chars").fingerprint() != LengthHead().fingerprint()


def test_model_head_fingerprint_ignores_batch_size_and_device(tiny_reward_model_path):
    from trl_upo.heads import RewardModelHead

    a = RewardModelHead(tiny_reward_model_path, batch_size=2, device="cpu")
    b = RewardModelHead(tiny_reward_model_path, batch_size=16)
    assert a.fingerprint() == b.fingerprint()
    assert RewardModelHead(tiny_reward_model_path, max_length=64).fingerprint() != a.fingerprint()


# ------------------------------------------------------------------------------------------------------------------
# upo_weight_cap below 1
# ------------------------------------------------------------------------------------------------------------------


def test_weight_cap_below_one_warns():
    """With normalised weights, a cap below 1 cuts every weight below 1: the mean-1 normalisation no longer holds."""
    msg = weight_cap_warning(0.5, True)
    assert msg and "upo_weight_cap=0.5 is below 1" in msg and "upo_weight_cap >= 1" in msg
    assert weight_cap_warning(1.0, True) is None
    assert weight_cap_warning(0.5, False) is None  # unnormalised weights: a cap below 1 is a plain cap


def test_weight_cap_below_one_warns_at_config_time(tmp_path):
    """Needs the two-line patch to config.py (see the report); skipped until it is applied."""
    import inspect

    from trl_upo import config as config_module

    if "weight_cap_warning" not in inspect.getsource(config_module):
        pytest.skip("config.py does not call weight_cap_warning yet")
    with pytest.warns(UserWarning, match=re.escape("upo_weight_cap=0.5 is below 1")):
        cpu_args(tmp_path / "out", upo_weight_cap=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cpu_args(tmp_path / "out2", upo_weight_cap=1.0)
    assert not [w for w in caught if "upo_weight_cap" in str(w.message)]
