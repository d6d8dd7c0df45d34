"""Tiny, local, offline building blocks: a word-level tokenizer trained in-process, a 2-layer Llama, and a
synthetic preference dataset whose designer objective is independent of the preference labels.

Used by the tests and the CPU quickstart; nothing here touches the network.

The synthetic task: a prompt names a topic; the chosen answer is on-topic, the rejected one is about another topic
(the preference). Independently of that, half of all answers contain the word "very" (the designer objective:
avoid it).
"""

from __future__ import annotations

import os
import random

import torch

TOPICS = {
    "cats": ["cats", "purr", "whiskers", "fur", "kitten", "meow"],
    "dogs": ["dogs", "bark", "puppy", "leash", "fetch", "tail"],
    "rain": ["rain", "clouds", "umbrella", "storm", "wet", "drops"],
    "food": ["bread", "soup", "apples", "cheese", "dinner", "taste"],
}
FILLER = ["the", "a", "is", "are", "and", "they", "it", "so", "with", "good", "nice", "often", "we", "like"]
DESIGNER_WORD = "very"
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def vocabulary() -> list[str]:
    """Every word the synthetic task uses (fillers, topic words, the designer word), sorted: the tiny vocabulary."""
    words = set(FILLER) | {DESIGNER_WORD, "tell", "me", "about", "please", "answer", "short", "long"}
    for topic, ws in TOPICS.items():
        words.add(topic)
        words.update(ws)
    return sorted(words)


def build_tokenizer():
    """A word-level fast tokenizer over the synthetic vocabulary, with pad/eos tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", bos_token="<eos>"
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_model(tokenizer, seed: int = 0, hidden_size: int = 32, num_layers: int = 2):
    """A randomly initialised 2-layer Llama sized for CPU tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_tiny_model(path: str, seed: int = 0, **kwargs) -> str:
    """Build and save a tiny model and its tokenizer to ``path`` (loadable by name, like a hub model)."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed, **kwargs)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_classifier(path: str, labels: list[str] | None = None, seed: int = 0, hidden_size: int = 32) -> str:
    """Build and save a randomly initialised 2-layer ``LlamaForSequenceClassification`` with the tiny tokenizer:
    ``labels`` names its classes (``None``: one label, i.e. a scalar reward model)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = build_tokenizer()
    labels = labels or ["reward"]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # a visible spread of scores: the classification layer starts near zero otherwise
        model.score.weight.normal_(0.0, 0.2)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _answer(rng: random.Random, topic: str, with_word: bool, n_words: int) -> str:
    words = [rng.choice(TOPICS[topic]) if rng.random() < 0.5 else rng.choice(FILLER) for _ in range(n_words)]
    words[0] = rng.choice(TOPICS[topic])
    if with_word:
        words.insert(rng.randrange(1, len(words) + 1), DESIGNER_WORD)
    return " ".join(words)


def preference_rows(n: int, seed: int = 0, conversational: bool = False, p_word: float = 0.5) -> list[dict]:
    """``n`` preference pairs: chosen on-topic, rejected off-topic; "very" in each answer with probability
    ``p_word``, independently of the label."""
    rng = random.Random(seed)
    topics = list(TOPICS)
    rows = []
    for _ in range(n):
        topic = rng.choice(topics)
        other = rng.choice([t for t in topics if t != topic])
        prompt = f"tell me about {topic}"
        chosen = _answer(rng, topic, rng.random() < p_word, rng.randint(3, 6))
        rejected = _answer(rng, other, rng.random() < p_word, rng.randint(3, 6))
        if conversational:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
        else:
            rows.append({"prompt": prompt + " answer", "chosen": " " + chosen, "rejected": " " + rejected})
    return rows


def preference_dataset(n: int = 64, seed: int = 0, conversational: bool = False, p_word: float = 0.5):
    """``preference_rows`` as a ``datasets.Dataset`` (prompt, chosen, rejected)."""
    from datasets import Dataset

    rows = preference_rows(n, seed=seed, conversational=conversational, p_word=p_word)
    return Dataset.from_list(rows)


def avoid_word_reward(prompts, completions, **kwargs):
    """A TRL-style reward function: 1.0 when the completion avoids the designer word, else 0.0."""
    out = []
    for c in completions:
        text = c if isinstance(c, str) else " ".join(m["content"] for m in c)
        out.append(0.0 if DESIGNER_WORD in text.split() else 1.0)
    return out


#: Model families ``build_causal_lm`` can build (``config.model_type`` of transformers), for tests that swap a
#: recipe's hub model for a tiny local one of the same architecture.
TINY_FAMILIES = ("llama", "qwen2", "mistral", "gemma2")


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
    from transformers import AutoConfig, AutoModelForCausalLM

    if family not in TINY_FAMILIES:
        raise ValueError(f"Unknown tiny model family {family!r}; choose one of {list(TINY_FAMILIES)}.")
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    if family == "gemma2":  # explicit head_dim and a sliding window shorter than the test sequences are long
        common.update(head_dim=hidden_size // 4, sliding_window=64, tie_word_embeddings=True)
    if family == "mistral":
        common.update(sliding_window=64)
    config = AutoConfig.for_model(family, **common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def save_tiny_causal_lm(path: str, family: str = "llama", seed: int = 0, **kwargs) -> str:
    """Build and save a tiny causal LM of ``family`` with the tiny tokenizer to ``path`` (loadable by name).

    Args:
        path: Directory to write (created if missing).
        family: One of ``TINY_FAMILIES``.
        seed: Seed of the random initialisation.
        **kwargs: ``hidden_size`` or ``num_layers`` for ``build_causal_lm``.

    Returns:
        ``path``.
    """
    tokenizer = build_tokenizer()
    model = build_causal_lm(tokenizer, family=family, seed=seed, **kwargs)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
