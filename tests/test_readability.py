"""The ``readability`` head: textstat's formulas, worked by hand on two sentences.

EASY = "The cat sat on the mat. It was happy."  9 words, 2 sentences, 10 syllables (only "hap-py" has two).
HARD = "Photosynthesis converts electromagnetic radiation into chemical energy."  7 words, 1 sentence,
       25 syllables (pho-to-syn-the-sis 5, con-verts 2, e-lec-tro-mag-net-ic 6, ra-di-a-tion 4, in-to 2,
       chem-i-cal 3, en-er-gy 3).

Flesch reading ease  = 206.835 - 1.015 * words/sentences - 84.6 * syllables/words
  EASY: 206.835 - 1.015 * 4.5 - 84.6 * 10/9 = 206.835 - 4.5675 - 94.0        = 108.2675
  HARD: 206.835 - 1.015 * 7   - 84.6 * 25/7 = 206.835 - 7.105  - 302.142857  = -102.412857
Flesch-Kincaid grade = 0.39 * words/sentences + 11.8 * syllables/words - 15.59
  EASY: 0.39 * 4.5 + 11.8 * 10/9 - 15.59 = 1.755 + 13.111111 - 15.59 = -0.723889
  HARD: 0.39 * 7   + 11.8 * 25/7 - 15.59 = 2.73  + 42.142857 - 15.59 = 29.282857
"""

from __future__ import annotations

import pickle

import pytest
import textstat

from trl_upo.heads import HeadSpec, ReadabilityHead, build_head
from trl_upo.heads.readability import METRICS

EASY = "The cat sat on the mat. It was happy."
HARD = "Photosynthesis converts electromagnetic radiation into chemical energy."


def _scores(texts, **params):
    head = build_head(HeadSpec("readability", "readability", params=params))
    return head.score(["q"] * len(texts), texts, role="chosen", columns={})


def test_flesch_reading_ease_by_hand():
    assert _scores([EASY, HARD]) == pytest.approx([108.2675, -102.412857], abs=1e-5)
    # the same numbers as textstat itself
    assert _scores([EASY, HARD]) == pytest.approx(
        [textstat.flesch_reading_ease(EASY), textstat.flesch_reading_ease(HARD)], abs=1e-9
    )


def test_grade_metric_is_negated_so_easier_scores_higher():
    """A grade is higher for harder text: the head returns -grade = [0.723889, -29.282857]."""
    scores = _scores([EASY, HARD], metric="flesch_kincaid_grade")
    assert scores == pytest.approx([0.723889, -29.282857], abs=1e-5)
    assert scores == pytest.approx([-textstat.flesch_kincaid_grade(EASY), -textstat.flesch_kincaid_grade(HARD)])
    assert scores[0] > scores[1]


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_every_listed_metric_calls_textstat_with_the_documented_sign(metric):
    raw = getattr(textstat, metric)(HARD)
    assert _scores([HARD], metric=metric) == pytest.approx([raw if METRICS[metric] else -raw])


def test_documented_directions():
    """Reading-ease indices rise for easier text, grades fall: on EASY vs HARD every metric's score (after the
    head's sign) prefers EASY, so the sign table cannot silently invert a metric."""
    other = ("fernandez_huerta", "szigriszt_pazos", "gutierrez_polini", "crawford", "gulpease_index", "mcalpine_eflaw")
    for metric in [m for m in METRICS if m not in other]:
        easy, hard = _scores([EASY, HARD], metric=metric)
        assert easy > hard, (metric, easy, hard)
    # McAlpine EFLAW = (words + mini-words of <= 3 letters) / sentences, lower is easier for learners of English. It
    # counts short words as flaws, so EASY (8 mini-words) is the worse one here: (9 + 8) / 2 = 8.5 vs (7 + 0) / 1 = 7.
    assert _scores([EASY, HARD], metric="mcalpine_eflaw") == [-8.5, -7.0]


def test_target_band():
    """Band [6, 8] on the grade: EASY -0.723889 is 6.723889 below, HARD 29.282857 is 21.282857 above; a grade
    inside the band scores 0. The band is on the metric's own scale, so no sign flip."""
    assert _scores([EASY, HARD], metric="flesch_kincaid_grade", target_min=6, target_max=8) == pytest.approx(
        [-6.723889, -21.282857], abs=1e-5
    )
    assert _scores([EASY], metric="flesch_kincaid_grade", target_min=-1, target_max=1) == [0.0]
    # one-sided: at most grade 8 -> EASY is fine, HARD is 21.28 too hard
    assert _scores([EASY, HARD], metric="flesch_kincaid_grade", target_max=8) == pytest.approx([0.0, -21.282857])
    # reading ease of at least 60: EASY is fine, HARD is 162.41 short
    assert _scores([EASY, HARD], target_min=60) == pytest.approx([0.0, -162.412857], abs=1e-5)


def test_empty_response_gets_empty_score():
    assert _scores(["", "   ", "!!!"]) == [0.0, 0.0, 0.0]
    assert _scores(["", EASY], empty_score=-50.0) == pytest.approx([-50.0, 108.2675])
    assert _scores([""], metric="flesch_kincaid_grade", target_min=6, target_max=8, empty_score=-3) == [-3.0]


def test_conversational_completion():
    comp = [[{"role": "assistant", "content": EASY}]]
    assert _scores(comp) == pytest.approx([108.2675])


@pytest.mark.parametrize(
    ("params", "pattern"),
    [
        ({"metric": "flesch"}, r"unknown metric 'flesch'.*'flesch_reading_ease'"),
        ({"target_min": 9, "target_max": 3}, "target_min .* must be <= target_max"),
        ({"target_min": float("nan")}, "target_min must be a finite number"),
        ({"empty_score": "low"}, "empty_score must be a finite number"),
    ],
)
def test_bad_params(params, pattern):
    with pytest.raises(ValueError, match=pattern):
        ReadabilityHead(**params)


def test_pickle_and_fingerprint():
    head = ReadabilityHead(metric="smog_index")
    before = head.score(["q"], [HARD], role="chosen", columns={})
    clone = pickle.loads(pickle.dumps(head))
    assert clone.score(["q"], [HARD], role="chosen", columns={}) == before
    assert "textstat=" in head.fingerprint()
    assert head.fingerprint() != ReadabilityHead().fingerprint()
