"""The ``lexicon`` head, worked by hand."""

from __future__ import annotations

import pickle

import pytest

from trl_upo.heads import HeadSpec, LexiconHead, build_head


def _scores(texts, **params):
    head = build_head(HeadSpec("lexicon", "lexicon", params=params))
    return head.score(["q"] * len(texts), texts, role="chosen", columns={})


TEXTS = [
    "Thank you, this is very good and very veryfine",  # thank you +1, very -1, good +1, very -1; not 'veryfine'
    "VERY very good",  # very -1 (case ignored), very -1, good +1
    "",
]
LEX = {"avoid": ["very"], "encourage": ["good", "thank you"]}


def test_count_mode():
    """count: [+1 -1 +1 -1, -1 -1 +1, nothing] = [0, -1, 0]."""
    assert _scores(TEXTS, **LEX) == [0.0, -1.0, 0.0]


def test_presence_mode():
    """presence: each term at most once: [thank you + very + good = +1 -1 +1, very + good = -1 +1, 0]."""
    assert _scores(TEXTS, mode="presence", **LEX) == [1.0, 0.0, 0.0]


def test_rate_mode():
    """rate: 100 * count / words: [100 * 0 / 9, 100 * -1 / 3, 0 (no words)]."""
    assert _scores(TEXTS, mode="rate", **LEX) == pytest.approx([0.0, -100 / 3, 0.0])


def test_case_sensitive():
    """Only the lower-case 'very' counts: 'VERY very good' -> -1 +1 = 0; 'Thank you' no longer matches."""
    assert _scores(TEXTS, case_sensitive=True, **LEX) == [-1.0, 0.0, 0.0]


def test_whole_words_phrases_and_punctuation_terms():
    # 'veryfine', 'avery' and 'very_' are other words; 'very.' and '(very)' are the word
    assert _scores(["veryfine avery very_ very. (very)"], avoid=["very"]) == [-2.0]
    # any whitespace inside a phrase; the longer phrase wins over the word it starts with
    assert _scores(["thank\n  you", "very good"], avoid=["very"], encourage=["thank you", "very good"]) == [1.0, 1.0]
    # terms starting or ending with punctuation still need a boundary on their word side
    assert _scores(["I like C++ and C, not C++x or xC++"], encourage=["C++"]) == [1.0]


def test_regex_mode():
    """Patterns are used as written; groups inside patterns do not confuse which term matched.
    'please pay 3 or 42' -> please +1, '3' -1, '42' -1 = -1; 'ababc xy xy' -> (ab)+c +1, x(y) -1 twice = -1."""
    params = {"avoid": [r"\d+", r"x(y)"], "encourage": [r"(?:please|thanks)", r"(ab)+c"], "regex": True}
    assert _scores(["please pay 3 or 42", "ababc xy xy"], **params) == [-1.0, -1.0]
    assert _scores(["please pay 3 or 42", "ababc xy xy"], mode="presence", **params) == [0.0, 0.0]
    # no implicit word boundaries with regex: 'very' inside 'everyone'
    assert _scores(["everyone"], avoid=["very"], regex=True) == [-1.0]


def test_single_string_is_one_term_and_conversational():
    comp = [[{"role": "assistant", "content": "as an AI, I cannot"}]]
    assert _scores(comp, avoid="as an AI") == [-1.0]


@pytest.mark.parametrize(
    ("params", "pattern"),
    [
        ({}, "the lexicon is empty"),
        ({"avoid": [], "encourage": []}, "the lexicon is empty"),
        ({"avoid": ["ok", ""]}, "non-empty string"),
        ({"avoid": [3]}, "non-empty string"),
        ({"avoid": ["Good"], "encourage": ["good"]}, "both avoid and encourage"),
        ({"avoid": ["(unclosed"], "regex": True}, "not a valid regular expression"),
        ({"avoid": ["a*"], "regex": True}, "matches the empty string"),
        ({"avoid": ["x"], "mode": "ratio"}, "mode must be one of"),
        ({"avoid": ["x"], "regex": "yes"}, "regex must be true or false"),
    ],
)
def test_bad_params(params, pattern):
    with pytest.raises(ValueError, match=pattern):
        LexiconHead(**params)


def test_pickle_and_fingerprint():
    head = LexiconHead(**LEX)
    clone = pickle.loads(pickle.dumps(head))
    assert clone.score(["q"] * 3, TEXTS, role="chosen", columns={}) == [0.0, -1.0, 0.0]
    assert clone.fingerprint() == head.fingerprint() != LexiconHead(avoid=["very"]).fingerprint()
