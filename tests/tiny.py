"""Tiny local models and data for the tests and the benchmarks: no hub, no network.

The synthetic task, its word-level tokenizer, its Llama and the one configuration every tiny model is built from are
the quickstart's (``trl_upo.quickstart_task``); this module saves models like hub models (loadable by path),
builds tiny classifiers and other architecture families, and wraps the task's rows in a ``datasets.Dataset``.
Import as ``from tests.tiny import ...`` (the repository root must be importable: pytest does it; scripts add it).
"""

from __future__ import annotations

import os

import torch

from trl_upo.quickstart_task import build_model, build_tokenizer, model_config, preference_rows

#: Model families ``build_causal_lm`` can build (``config.model_type`` of transformers), for tests that swap a
#: recipe's hub model for a tiny local one of the same architecture.
TINY_FAMILIES = ("llama", "qwen2", "mistral", "gemma2")


def _save(model, tokenizer, path: str) -> str:
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_model(path: str, seed: int = 0, **kwargs) -> str:
    """Build and save the quickstart's tiny Llama and its tokenizer to ``path`` (loadable by name, like a hub model);
    ``kwargs``: ``hidden_size`` or ``num_layers``."""
    tokenizer = build_tokenizer()
    return _save(build_model(tokenizer, seed=seed, **kwargs), tokenizer, path)


def save_tiny_classifier(path: str, labels: list[str] | None = None, seed: int = 0, hidden_size: int = 32) -> str:
    """Build and save a randomly initialised 2-layer ``LlamaForSequenceClassification`` with the tiny tokenizer:
    ``labels`` names its classes (``None``: one label, i.e. a scalar reward model)."""
    from transformers import LlamaForSequenceClassification

    tokenizer = build_tokenizer()
    labels = labels or ["reward"]
    config = model_config(
        tokenizer, hidden_size=hidden_size, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # a visible spread of scores: the classification layer starts near zero otherwise
        model.score.weight.normal_(0.0, 0.2)
    return _save(model, tokenizer, path)


def build_causal_lm(tokenizer, family: str = "llama", seed: int = 0, hidden_size: int = 32, num_layers: int = 2):
    """A randomly initialised causal LM of the given architecture family, sized for CPU tests.

    Args:
        tokenizer: The tokenizer whose vocabulary and special tokens the model uses (e.g. ``build_tokenizer()``).
        family: One of ``TINY_FAMILIES`` (a transformers ``model_type``).
        seed: Seed of the random initialisation.
        hidden_size: Hidden size (4 attention heads, 2 key-value heads).
        num_layers: Number of decoder layers.

    Returns:
        A ``transformers`` model of that family (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ...).
    """
    from transformers import AutoModelForCausalLM

    if family not in TINY_FAMILIES:
        raise ValueError(f"Unknown tiny model family {family!r}; choose one of {list(TINY_FAMILIES)}.")
    extra = {}
    if family == "gemma2":  # explicit head_dim and a sliding window shorter than the test sequences are long
        extra = dict(head_dim=hidden_size // 4, sliding_window=64, tie_word_embeddings=True)
    if family == "mistral":
        extra = dict(sliding_window=64)
    config = model_config(tokenizer, family, hidden_size, num_layers, max_position_embeddings=256, **extra)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def save_tiny_causal_lm(path: str, family: str = "llama", seed: int = 0, **kwargs) -> str:
    """Build and save a tiny causal LM of ``family`` (``build_causal_lm``; ``kwargs``: ``hidden_size`` or
    ``num_layers``) with the tiny tokenizer to ``path`` (loadable by name); returns ``path``."""
    tokenizer = build_tokenizer()
    return _save(build_causal_lm(tokenizer, family=family, seed=seed, **kwargs), tokenizer, path)


def preference_dataset(n: int = 64, seed: int = 0, conversational: bool = False, p_word: float = 0.5):
    """The quickstart task's ``preference_rows`` as a ``datasets.Dataset`` (prompt, chosen, rejected)."""
    from datasets import Dataset

    return Dataset.from_list(preference_rows(n, seed=seed, conversational=conversational, p_word=p_word))
