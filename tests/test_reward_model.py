"""The ``reward_model`` head against a manual forward of a tiny saved one-label LlamaForSequenceClassification
(``tiny_reward_model_path``). The tiny tokenizer's chat template renders
``<|user|> {prompt} <|assistant|> {response} ``."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from trl_upo.heads import HeadSpec, RewardModelHead, build_head

PROMPTS = ["tell me about cats", "tell me about dogs"]
RESPONSES = [" cats purr very much", " dogs bark"]


@pytest.fixture(scope="module")
def reward(tiny_reward_model_path):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_path).eval()
    tok = AutoTokenizer.from_pretrained(tiny_reward_model_path)

    def run(text):
        with torch.no_grad():
            return model(**tok(text, return_tensors="pt")).logits[0, 0].item()

    return run


def _head(path, **params):
    return build_head(HeadSpec("reward_model", "reward_model", params={"model": path, "device": "cpu", **params}))


def test_standard_data_scores_prompt_plus_response(tiny_reward_model_path, reward):
    head = _head(tiny_reward_model_path, batch_size=1)
    got = head.score(PROMPTS, RESPONSES, role="chosen", columns={})
    assert got == pytest.approx([reward(p + r) for p, r in zip(PROMPTS, RESPONSES)], abs=1e-5)
    # the prompt matters: the same response after another prompt scores differently
    assert head.score(PROMPTS[::-1], RESPONSES, role="chosen", columns={}) != pytest.approx(got, abs=1e-5)


def test_conversational_data_uses_the_chat_template(tiny_reward_model_path, reward):
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    responses = [[{"role": "assistant", "content": r.strip()}] for r in RESPONSES]
    head = _head(tiny_reward_model_path)
    texts, templated = head.texts(prompts, responses)
    assert templated and texts[0] == "<|user|> tell me about cats <|assistant|> cats purr very much "
    got = head.score(prompts, responses, role="rejected", columns={})
    assert got == pytest.approx([reward(t) for t in texts], abs=1e-5)
    # without a chat template the message texts are joined with a newline
    head._tokenizer.chat_template = None
    texts, templated = head.texts(prompts, responses)
    assert not templated and texts[1] == "tell me about dogs\ndogs bark"
    assert head.score(prompts, responses, role="chosen", columns={}) == pytest.approx(
        [reward(t) for t in texts], abs=1e-5
    )


def test_truncation_keeps_the_response(tiny_reward_model_path, reward):
    """max_length 3 cuts from the left: 'tell me about cats purr' -> 'about cats purr'."""
    head = _head(tiny_reward_model_path, max_length=3)
    got = head.score(["tell me about cats"], [" purr"], role="chosen", columns={})
    assert got == pytest.approx([reward("about cats purr")], abs=1e-5)


def test_empty_prompt_and_response_is_finite(tiny_reward_model_path):
    (value,) = _head(tiny_reward_model_path).score([""], [""], role="chosen", columns={})
    assert value == value and abs(value) < 1e6


def test_classifier_with_several_labels_is_rejected(tiny_classifier_path):
    with pytest.raises(ValueError, match=r"has 3 labels, but a reward model has one.*'classifier' head"):
        _head(tiny_classifier_path).score(PROMPTS, RESPONSES, role="chosen", columns={})


def test_lazy_and_fingerprint(tiny_reward_model_path):
    head = RewardModelHead(model=tiny_reward_model_path)
    assert head._model is None
    assert "model=sha256:" in head.fingerprint() and tiny_reward_model_path not in head.fingerprint()
    assert head._model is None  # fingerprinting reads the files, it loads no model
    assert head.fingerprint() == RewardModelHead(model=tiny_reward_model_path, batch_size=1, device="cpu").fingerprint()
    assert head.fingerprint() != RewardModelHead(model=tiny_reward_model_path, max_length=16).fingerprint()
