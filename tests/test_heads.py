"""Reward heads: contract tests generated from the registry, the built-in heads by hand, and the registry itself
(``@register_head``, dotted paths, entry points)."""

from __future__ import annotations

import functools
import math
import pickle
from types import SimpleNamespace

import pytest
import torch

import trl_upo
from tests.helpers import cpu_args
from trl_upo.heads import registry as heads_registry
from trl_upo.heads import (
    ColumnHead,
    FunctionHead,
    HeadSpec,
    LengthHead,
    RewardHead,
    build_head,
    register_head,
    resolve_head_class,
)
from trl_upo.quickstart_task import avoid_word_reward

# ------------------------------------------------------------------------------------------------------------------
# Contract tests, one per registered head
# ------------------------------------------------------------------------------------------------------------------

#: The documented default / required parameters of every registered head. A new head MUST be added here (the
#: contract test fails for a registered head without an entry). A value may also be a callable taking pytest's
#: ``request`` and returning the params, for heads that need fixtures (e.g. a model path).
HEAD_PARAMS = {
    "length": {},
    "column": {"chosen": "score_chosen", "rejected": "score_rejected"},
    "function": {"function": "trl_upo.quickstart_task:avoid_word_reward"},
    "readability": {},
    "lexicon": {"avoid": ["very"]},
    "classifier": lambda request: {
        "model": request.getfixturevalue("tiny_classifier_path"),
        "labels": "positive",
        "device": "cpu",
    },
    "reward_model": lambda request: {"model": request.getfixturevalue("tiny_reward_model_path"), "device": "cpu"},
    "similarity": lambda request: {
        "exemplars": ["cats purr"],
        "model": request.getfixturevalue("minilm_path"),
        "device": "cpu",
    },
}


def _contract_head_names() -> list[str]:
    """Registered heads (registry + entry points), except the ones that test modules define for themselves."""
    names = set()
    for name, cls in trl_upo.registered_heads().items():
        if cls is not None and cls.__module__.split(".")[0] == "tests":
            continue
        names.add(name)
    return sorted(names)


STRING_PROMPTS = ["tell me about cats", "tell me about dogs", "tell me about rain", "tell me about food"]
STRING_COMPLETIONS = [" cats purr", " dogs bark very loud", " very wet rain drops today", " soup"]
CHAT_PROMPTS = [
    [{"role": "user", "content": "tell me about cats"}],
    [{"role": "user", "content": "tell me about dogs"}],
]
CHAT_COMPLETIONS = [
    [{"role": "assistant", "content": "cats purr very much"}],
    [{"role": "assistant", "content": "dogs bark"}],
]


def _columns(n: int) -> dict[str, list]:
    return {
        "score_chosen": [float(i) + 0.5 for i in range(n)],
        "score_rejected": [-float(i) for i in range(n)],
        "topic": ["cats", "dogs", "rain", "food"][:n],
    }


def _params_for(name: str, request) -> dict:
    if name not in HEAD_PARAMS:
        pytest.fail(
            f"Reward head {name!r} is registered but has no entry in tests/test_heads.py::HEAD_PARAMS. Add its "
            f"documented default/required parameters there so that the contract tests cover it."
        )
    params = HEAD_PARAMS[name]
    return dict(params(request) if callable(params) else params)


def test_head_params_table_has_no_stale_entries():
    stale = sorted(set(HEAD_PARAMS) - set(_contract_head_names()))
    assert not stale, f"HEAD_PARAMS lists heads that are not registered: {stale}"


def test_builtin_heads_are_registered():
    heads = trl_upo.registered_heads()
    assert heads["length"] is LengthHead
    assert heads["column"] is ColumnHead
    assert heads["function"] is FunctionHead


@pytest.fixture(params=_contract_head_names())
def contract_head(request):
    name = request.param
    params = _params_for(name, request)
    cfg = cpu_args(request.getfixturevalue("tmp_path") / "out", reward_heads=[{"name": name, "params": params}])
    (spec,) = cfg.head_specs
    return name, spec, build_head(spec)


def _score_all(head, tokenizer):
    out = {}
    for role in ("chosen", "rejected"):
        out[("str", role)] = head.score(
            STRING_PROMPTS, STRING_COMPLETIONS, role=role, columns=_columns(4), tokenizer=tokenizer
        )
        out[("chat", role)] = head.score(
            CHAT_PROMPTS, CHAT_COMPLETIONS, role=role, columns=_columns(2), tokenizer=tokenizer
        )
    return out


def test_contract_scores_are_finite_floats(contract_head, tokenizer):
    name, spec, head = contract_head
    assert isinstance(head, RewardHead)
    for (kind, role), values in _score_all(head, tokenizer).items():
        n = 4 if kind == "str" else 2
        assert isinstance(values, list), f"{name}: {kind}/{role} returned {type(values).__name__}, not a list"
        assert len(values) == n, f"{name}: {kind}/{role} returned {len(values)} scores for {n} completions"
        assert all(type(v) is float for v in values), f"{name}: {kind}/{role} returned non-floats {values}"
        assert all(math.isfinite(v) for v in values), f"{name}: {kind}/{role} returned {values}"


def test_contract_pickles_and_scores_the_same(contract_head, tokenizer):
    name, spec, head = contract_head
    before = _score_all(head, tokenizer)
    clone = pickle.loads(pickle.dumps(head))
    assert type(clone) is type(head)
    assert _score_all(clone, tokenizer) == before
    assert clone.fingerprint() == head.fingerprint()


def test_contract_fingerprint_is_stable(contract_head):
    name, spec, head = contract_head
    fp = head.fingerprint()
    assert isinstance(fp, str) and fp
    assert head.fingerprint() == fp
    assert build_head(spec).fingerprint() == fp, "two heads built from the same spec must share a fingerprint"
    assert " at 0x" not in fp, f"fingerprint contains a memory address, so it changes between runs: {fp}"


def test_contract_scoring_is_deterministic(contract_head, tokenizer):
    name, spec, head = contract_head
    assert _score_all(head, tokenizer) == _score_all(head, tokenizer)


# ------------------------------------------------------------------------------------------------------------------
# length
# ------------------------------------------------------------------------------------------------------------------


def _length_scores(tokenizer=None, completions=None, **params):
    head = build_head(HeadSpec("length", "length", params=params))
    completions = completions if completions is not None else ["the cat  sat", "a", "", "one two three four five six"]
    return head.score(["p"] * len(completions), completions, role="chosen", columns={}, tokenizer=tokenizer)


def test_length_words_shorter_and_longer():
    """Whitespace words: 'the cat  sat' -> 3, 'a' -> 1, '' -> 0, six words -> 6.
    shorter (default) -> [-3, -1, 0, -6] (-0.0 == 0); longer -> [3, 1, 0, 6]."""
    assert _length_scores() == [-3.0, -1.0, 0.0, -6.0]
    assert _length_scores(direction="longer") == [3.0, 1.0, 0.0, 6.0]


def test_length_chars():
    """Characters: 'the cat  sat' -> 12 (two spaces), 'a' -> 1, '' -> 0, 'one two three four five six' -> 27."""
    assert _length_scores(unit="chars", direction="longer") == [12.0, 1.0, 0.0, 27.0]
    assert _length_scores(unit="chars") == [-12.0, -1.0, -0.0, -27.0]


def test_length_tokens_with_tokenizer(tokenizer):
    """The test tokenizer is word-level (whitespace split; unknown words -> one <unk> each), no special tokens
    added: 'cats purr very' -> 3 tokens, 'hello' -> 1, 'dogs bark fetch tail' -> 4. In chars the same texts
    are 14, 5 and 20 long, so tokens are really counted with the tokenizer."""
    completions = ["cats purr very", "hello", "dogs bark fetch tail"]
    assert [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions] == [3, 1, 4]
    assert _length_scores(tokenizer, completions, unit="tokens", direction="longer") == [3.0, 1.0, 4.0]
    assert _length_scores(tokenizer, completions, unit="chars", direction="longer") == [14.0, 5.0, 20.0]


def test_length_tokens_needs_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        _length_scores(None, ["a b"], unit="tokens")


def test_length_target():
    """target 4 words: lengths [3, 1, 0, 6] -> -|n - 4| = [-1, -3, -4, -2]; direction is ignored with a target.
    Scores are floats (the head contract) even though the target was given as an int (as YAML would)."""
    for direction in ("shorter", "longer"):
        values = _length_scores(target=4, direction=direction)
        assert values == [-1.0, -3.0, -4.0, -2.0]
        assert all(type(v) is float for v in values), values
    assert _length_scores(target=2.5) == [-0.5, -1.5, -2.5, -3.5]


def test_length_conversational():
    """Message-list completions: the contents are joined with newlines.
    [{'content': 'a b'}, {'content': 'c'}] -> 'a b\\nc' -> 3 words, 5 chars."""
    comp = [[{"role": "assistant", "content": "a b"}, {"role": "assistant", "content": "c"}]]
    assert _length_scores(completions=comp, direction="longer") == [3.0]
    assert _length_scores(completions=comp, unit="chars", direction="longer") == [5.0]


@pytest.mark.parametrize(
    ("params", "pattern"),
    [
        ({"unit": "lines"}, "unit must be one of"),
        ({"direction": "up"}, "direction must be one of"),
        ({"target": -1}, "target must be >= 0"),
    ],
)
def test_length_bad_params(params, pattern):
    with pytest.raises(ValueError, match=pattern):
        LengthHead(**params)


def test_length_fingerprint_depends_on_params():
    fps = {
        build_head(HeadSpec("length", "length", params=p)).fingerprint()
        for p in ({}, {"unit": "chars"}, {"direction": "longer"}, {"target": 3})
    }
    assert len(fps) == 4


def test_directly_constructed_head_fingerprint_depends_on_params():
    """score_dataset accepts any RewardHead instances, so a head built directly (not through build_head) must
    still fingerprint its parameters, or the score cache would hand back another configuration's scores."""
    assert LengthHead(unit="chars").fingerprint() != LengthHead(unit="words").fingerprint()
    assert ColumnHead("a", "b").fingerprint() != ColumnHead("c", "d").fingerprint()


# ------------------------------------------------------------------------------------------------------------------
# column
# ------------------------------------------------------------------------------------------------------------------


def test_column_reads_the_role_column():
    head = build_head(HeadSpec("rm", "column", params={"chosen": "rm_c", "rejected": "rm_r"}))
    cols = {"rm_c": [1, 2.5], "rm_r": [-1.0, None], "other": [9, 9]}
    assert head.score(["p", "q"], ["x", "y"], role="chosen", columns=cols) == [1.0, 2.5]
    rejected = head.score(["p", "q"], ["x", "y"], role="rejected", columns=cols)
    assert rejected[0] == -1.0 and math.isnan(rejected[1])  # None -> NaN, rejected later by the trainer
    assert head.required_columns() == ["rm_c", "rm_r"]
    assert ColumnHead.needs_text is False


def test_column_missing_column_error():
    head = ColumnHead(chosen="rm_c", rejected="rm_r")
    with pytest.raises(ValueError) as e:
        head.score(["p"], ["x"], role="rejected", columns={"rm_c": [1.0], "topic": ["a"]})
    msg = str(e.value)
    assert "'rm_r'" in msg and "rejected" in msg
    assert "['rm_c', 'topic']" in msg  # lists what is available
    assert "params.rejected" in msg  # and how to fix it


def test_column_needs_both_names():
    with pytest.raises(ValueError, match="both 'chosen' and 'rejected'"):
        ColumnHead(chosen="", rejected="r")


# ------------------------------------------------------------------------------------------------------------------
# function
# ------------------------------------------------------------------------------------------------------------------


def test_function_object_and_dotted_paths_agree():
    """avoid_word_reward: 1.0 without the word 'very', else 0.0.
    [' cats purr', ' dogs bark very loud', ' very wet rain drops today', ' soup'] -> [1, 0, 0, 1]."""
    expected = [1.0, 0.0, 0.0, 1.0]
    for fn in (avoid_word_reward, "trl_upo.quickstart_task:avoid_word_reward",
               "trl_upo.quickstart_task.avoid_word_reward"):
        head = build_head(HeadSpec("avoid", "function", params={"function": fn}))
        assert head.score(STRING_PROMPTS, STRING_COMPLETIONS, role="chosen", columns={}) == expected
    head = FunctionHead(function=avoid_word_reward)
    # conversational: 'cats purr very much' -> 0, 'dogs bark' -> 1
    assert head.score(CHAT_PROMPTS, CHAT_COMPLETIONS, role="chosen", columns={}) == [0.0, 1.0]


def test_function_gets_columns_and_grpo_kwargs(tokenizer):
    seen = {}

    def reward(prompts, completions, completion_ids, topic, trainer_state, log_extra, log_metric, **kwargs):
        seen.update(
            prompts=prompts,
            completions=completions,
            completion_ids=completion_ids,
            topic=topic,
            trainer_state=trainer_state,
            extra=kwargs,
        )
        log_extra("note", ["x"] * len(completions))  # must be callable like GRPOTrainer's
        log_metric("my_metric", 1.0)
        return [float(t == "cats") for t in topic]

    head = FunctionHead(function=reward)
    out = head.score(
        ["p1", "p2"], [" cats purr", " dogs"], role="chosen", columns={"topic": ["cats", "dogs"], "id": [7, 8]},
        tokenizer=tokenizer,
    )
    assert out == [1.0, 0.0]
    assert seen["prompts"] == ["p1", "p2"]
    assert seen["completions"] == [" cats purr", " dogs"]
    assert seen["topic"] == ["cats", "dogs"]
    assert seen["extra"] == {"id": [7, 8]}
    assert seen["trainer_state"] is None
    assert seen["completion_ids"] == [
        tokenizer(" cats purr", add_special_tokens=False)["input_ids"],
        tokenizer(" dogs", add_special_tokens=False)["input_ids"],
    ]
    assert len(seen["completion_ids"][0]) == 2


def test_function_trl_style_kwargs_only_signature():
    """The most common TRL reward-function form: ``def f(completions, **kwargs)``."""

    def reward(completions, **kwargs):
        assert {"prompts", "completion_ids", "trainer_state", "log_extra", "log_metric"} <= set(kwargs)
        return [float(len(c)) for c in completions]

    assert FunctionHead(function=reward).score(["p", "p"], ["ab", "abcd"], role="rejected", columns={}) == [2.0, 4.0]


def test_function_none_is_nan():
    head = FunctionHead(function=lambda completions, **kw: [None, 2, 0.5])
    out = head.score(["p"] * 3, ["a", "b", "c"], role="chosen", columns={})
    assert math.isnan(out[0]) and out[1:] == [2.0, 0.5]


def test_function_wrong_length_error():
    def reward(completions, **kwargs):
        return [1.0]

    with pytest.raises(ValueError) as e:
        FunctionHead(function=reward).score(["p"] * 4, ["a"] * 4, role="chosen", columns={})
    assert "'reward' returned 1 rewards for 4 completions" in str(e.value)


def test_function_non_list_return_error():
    with pytest.raises(ValueError, match="returned float"):
        FunctionHead(function=lambda completions, **kw: 1.0).score(["p"], ["a"], role="chosen", columns={})


def test_function_rejects_torch_module():
    with pytest.raises(ValueError, match="torch Module"):
        FunctionHead(function=torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="torch Module"):
        build_head(HeadSpec("f", "function", params={"function": torch.nn.Identity()}))


def test_function_rejects_non_callables_and_bad_paths():
    with pytest.raises(ValueError, match="not callable"):
        FunctionHead(function="trl_upo.quickstart_task:TOPICS")
    with pytest.raises(ValueError, match="Cannot import module 'no_such_module_xyz'"):
        FunctionHead(function="no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        FunctionHead(function="trl_upo.quickstart_task:nope")


def same_name_reward(completions, **kwargs):
    return [1.0 for _ in completions]


_SAME_NAME_V1 = same_name_reward


def same_name_reward(completions, **kwargs):  # noqa: F811 - deliberately redefined: same name, new code
    return [float(len(c)) for c in completions]


_SAME_NAME_V2 = same_name_reward


def test_function_fingerprint_changes_with_code():
    """Two functions with the same module and name but different code: the cache must not mix them up."""
    assert _SAME_NAME_V1.__qualname__ == _SAME_NAME_V2.__qualname__
    fp1 = build_head(HeadSpec("f", "function", params={"function": _SAME_NAME_V1})).fingerprint()
    fp2 = build_head(HeadSpec("f", "function", params={"function": _SAME_NAME_V2})).fingerprint()
    assert fp1 != fp2
    # and is stable for the same function
    assert fp1 == build_head(HeadSpec("f", "function", params={"function": _SAME_NAME_V1})).fingerprint()


def test_function_fingerprint_changes_with_code_without_source():
    """Functions without a source file (exec'd): the byte code and constants are fingerprinted instead."""
    ns1, ns2 = {"__name__": __name__}, {"__name__": __name__}
    exec("def reward(completions, **kw):\n    return [1.0] * len(completions)\n", ns1)
    exec("def reward(completions, **kw):\n    return [2.0] * len(completions)\n", ns2)
    assert FunctionHead(ns1["reward"]).fingerprint() != FunctionHead(ns2["reward"]).fingerprint()


def _make_word_reward(word):
    def word_reward(completions, **kwargs):
        return [float(word in c) for c in completions]

    return word_reward


def _word_reward(completions, word, **kwargs):
    return [float(word in c) for c in completions]


class WordReward:
    def __init__(self, word):
        self.word = word

    def __call__(self, completions, **kwargs):
        return [float(self.word in c) for c in completions]


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(_make_word_reward, id="closure"),
        pytest.param(lambda word: functools.partial(_word_reward, word=word), id="partial"),
        pytest.param(WordReward, id="callable-object"),
    ],
)
def test_function_fingerprint_changes_with_captured_state(make):
    """Reward functions configured by a closure, a functools.partial or a callable object's attributes give
    different scores for different settings, so their fingerprints (the score-cache key) must differ."""
    a, b = make("cats"), make("dogs")
    ha = build_head(HeadSpec("f", "function", params={"function": a}))
    hb = build_head(HeadSpec("f", "function", params={"function": b}))
    assert ha.score(["p"], ["cats"], role="chosen", columns={}) != hb.score(["p"], ["cats"], role="chosen", columns={})
    assert ha.fingerprint() != hb.fingerprint()


# ------------------------------------------------------------------------------------------------------------------
# Registry: @register_head, dotted paths, entry points
# ------------------------------------------------------------------------------------------------------------------


class MyHead(RewardHead):
    """A custom head used through its dotted path (not registered): scores the number of 'a' characters, times
    ``scale``."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def score(self, prompts, completions, *, role, columns, tokenizer=None):
        return [self.scale * str(c).count("a") for c in completions]


class NotAHead:
    pass


class EntryPointHead(RewardHead):
    def score(self, prompts, completions, *, role, columns, tokenizer=None):
        return [42.0 for _ in completions]


@pytest.fixture
def isolated_registry(monkeypatch):
    """A private copy of the registry, so heads registered by a test do not leak into others."""
    monkeypatch.setattr(heads_registry, "_REGISTRY", dict(heads_registry._REGISTRY))
    return heads_registry._REGISTRY


def test_register_head_makes_name_resolvable_and_usable(isolated_registry, tmp_path):
    @register_head("upo-test-vowels")
    class VowelHead(RewardHead):
        def __init__(self, vowels: str = "aeiou") -> None:
            self.vowels = vowels

        def score(self, prompts, completions, *, role, columns, tokenizer=None):
            return [float(sum(ch in self.vowels for ch in c)) for c in completions]

    assert VowelHead.name == "upo-test-vowels"
    assert resolve_head_class("upo-test-vowels") is VowelHead
    assert trl_upo.registered_heads()["upo-test-vowels"] is VowelHead
    cfg = cpu_args(tmp_path / "out", reward_heads=[{"name": "upo-test-vowels", "params": {"vowels": "a"}}])
    head = build_head(cfg.head_specs[0])
    assert head.score(["p"], ["banana", "xyz"], role="chosen", columns={}) == [3.0, 0.0]
    # its parameters are validated like the built-ins' (the message names the valid ones)
    with pytest.raises(ValueError, match=r"Valid parameters: \['vowels'\]"):
        cpu_args(tmp_path / "out", reward_heads=[{"name": "upo-test-vowels", "params": {"vowel": "a"}}])


def test_register_head_rejects_clashes_and_bad_input(isolated_registry):
    with pytest.raises(ValueError, match="already registered"):

        @register_head("length")
        class OtherLength(RewardHead):
            pass

    assert resolve_head_class("length") is LengthHead
    with pytest.raises(ValueError, match="must start with a letter"):
        register_head("9lives")
    with pytest.raises(TypeError, match="RewardHead subclass"):
        register_head("upo-test-plain")(NotAHead)


@pytest.mark.parametrize("path", ["tests.test_heads:MyHead", "tests.test_heads.MyHead"])
def test_dotted_path_in_config(tmp_path, path):
    cfg = cpu_args(tmp_path / "out", reward_heads=[{"name": "mine", "type": path, "params": {"scale": 2.0}}])
    (spec,) = cfg.head_specs
    assert (spec.name, spec.type) == ("mine", path)
    head = build_head(spec)
    assert isinstance(head, MyHead)
    assert head.score(["p", "p"], ["banana", "kiwi"], role="chosen", columns={}) == [6.0, 0.0]


def test_dotted_path_params_are_validated(tmp_path):
    with pytest.raises(ValueError, match=r"Invalid parameters \['scal'\].*Valid parameters: \['scale'\]"):
        cpu_args(
            tmp_path / "out", reward_heads=[{"name": "mine", "type": "tests.test_heads:MyHead", "params": {"scal": 2}}]
        )


@pytest.mark.parametrize(
    "path", ["trl_upo.quickstart_task:avoid_word_reward", "tests.test_heads:NotAHead", "collections:OrderedDict"]
)
def test_non_head_dotted_path_rejected(tmp_path, path):
    with pytest.raises(ValueError) as e:
        cpu_args(tmp_path / "out", reward_heads=[{"name": "x", "type": path}])
    msg = str(e.value)
    assert "not a RewardHead subclass" in msg
    assert "type 'function'" in msg  # points plain reward functions to the function head


def test_dotted_path_to_missing_module(tmp_path):
    with pytest.raises(ValueError, match="Cannot import module 'no_such_pkg_xyz.heads'"):
        cpu_args(tmp_path / "out", reward_heads=[{"name": "x", "type": "no_such_pkg_xyz.heads:Head"}])


class FakeEntryPoint:
    def __init__(self, name, value, obj):
        self.name, self.value, self._obj = name, value, obj
        self.loads = 0

    def load(self):
        self.loads += 1
        return self._obj


def test_entry_point_head(monkeypatch, tmp_path):
    ep = FakeEntryPoint("upo-test-ep", "some_pkg.heads:EntryPointHead", EntryPointHead)
    monkeypatch.setattr(heads_registry, "_entry_points", lambda: [ep])
    assert "upo-test-ep" in trl_upo.registered_heads()
    assert ep.loads == 0  # listed lazily, not imported
    assert resolve_head_class("upo-test-ep") is EntryPointHead
    cfg = cpu_args(tmp_path / "out", reward_heads=[{"name": "upo-test-ep", "weight": 0.5}])
    (spec,) = cfg.head_specs
    assert (spec.name, spec.type, spec.weight) == ("upo-test-ep", "upo-test-ep", 0.5)
    assert build_head(spec).score(["p"], ["c"], role="chosen", columns={}) == [42.0]


def test_entry_point_listed_in_unknown_head_message(monkeypatch, tmp_path):
    ep = FakeEntryPoint("upo-test-ep", "some_pkg.heads:EntryPointHead", EntryPointHead)
    monkeypatch.setattr(heads_registry, "_entry_points", lambda: [ep])
    with pytest.raises(ValueError, match=r"Did you mean 'upo-test-ep'\?.*'upo-test-ep'"):
        cpu_args(tmp_path / "out", reward_heads=[{"name": "upo-test-eq"}])


def test_entry_point_to_non_head_rejected(monkeypatch, tmp_path):
    ep = FakeEntryPoint("upo-test-bad", "some_pkg.rewards:fn", avoid_word_reward)
    monkeypatch.setattr(heads_registry, "_entry_points", lambda: [ep])
    with pytest.raises(ValueError, match=r"entry point 'some_pkg.rewards:fn'.*not a RewardHead subclass"):
        cpu_args(tmp_path / "out", reward_heads=[{"name": "upo-test-bad"}])


def test_registry_names_win_over_entry_points(monkeypatch):
    ep = FakeEntryPoint("length", "evil:Length", EntryPointHead)
    monkeypatch.setattr(heads_registry, "_entry_points", lambda: [ep])
    assert resolve_head_class("length") is LengthHead
    assert ep.loads == 0


def test_registered_head_without_contract_entry_fails(isolated_registry, request):
    """The contract's safety net itself: a newly registered head without a HEAD_PARAMS entry is reported."""

    @register_head("upo-test-uncovered")
    class Uncovered(RewardHead):
        pass

    Uncovered.__module__ = "some_plugin.heads"  # as if shipped outside the tests
    assert "upo-test-uncovered" in _contract_head_names()
    with pytest.raises(pytest.fail.Exception, match="no entry in tests/test_heads.py::HEAD_PARAMS"):
        _params_for("upo-test-uncovered", request)


def test_simple_namespace_entry_point_shape(monkeypatch):
    """Only ``.name``, ``.value`` and ``.load()`` of an entry point are used."""
    ep = SimpleNamespace(name="upo-test-ns", value="pkg:EntryPointHead", load=lambda: EntryPointHead)
    monkeypatch.setattr(heads_registry, "_entry_points", lambda: [ep])
    assert resolve_head_class("upo-test-ns") is EntryPointHead
