"""The synthetic task of the CPU quickstart, and the tiny model it starts from; built in-process, offline.

A prompt names a topic; the chosen answer is on-topic, the rejected one is about another topic (the preference).
Independently of that, about half of all answers contain the word "very" (the designer objective: avoid it, scored
by :func:`avoid_word_reward`). The model is a randomly initialised 2-layer Llama over a word-level tokenizer of the
task's vocabulary.

Used by ``python -m trl_upo.quickstart`` and by ``scripts/build_quickstart_assets.py``, which builds the packaged
model and data that ``trl-upo train`` runs on (``trl_upo/resources/``).
"""

from __future__ import annotations

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


def model_config(tokenizer, model_type: str = "llama", hidden_size: int = 32, num_layers: int = 2, **overrides):
    """The configuration of a small decoder over ``tokenizer``'s vocabulary and special tokens.

    Args:
        tokenizer: The tokenizer whose vocabulary size and pad/eos ids the model uses (``build_tokenizer()``).
        model_type: A transformers ``model_type`` (``"llama"``, ``"qwen2"``, ...).
        hidden_size: Hidden size; the MLP is twice as wide. 4 attention heads, 2 key-value heads.
        num_layers: Number of decoder layers.
        **overrides: Any other configuration field (``max_position_embeddings`` defaults to 128, untied embeddings).

    Returns:
        The ``transformers`` configuration of that model type.
    """
    from transformers import AutoConfig

    fields = dict(
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
    fields.update(overrides)
    return AutoConfig.for_model(model_type, **fields)


def build_model(tokenizer, seed: int = 0, hidden_size: int = 32, num_layers: int = 2):
    """A randomly initialised Llama (:func:`model_config`) sized for a CPU, seeded with ``seed``."""
    from transformers import LlamaForCausalLM

    config = model_config(tokenizer, hidden_size=hidden_size, num_layers=num_layers)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def topic_words(rng: random.Random, topic: str, n_words: int) -> list[str]:
    """``n_words`` words drawn from ``rng``: each a word of ``topic`` or a filler word, with probability 1/2."""
    return [rng.choice(TOPICS[topic]) if rng.random() < 0.5 else rng.choice(FILLER) for _ in range(n_words)]


def topic_answer(rng: random.Random, topic: str, with_word: bool, n_words: int) -> str:
    """An answer about ``topic``: ``n_words`` :func:`topic_words` starting with a topic word, plus the designer word
    at a random position after the first when ``with_word``."""
    words = topic_words(rng, topic, n_words)
    words[0] = rng.choice(TOPICS[topic])
    if with_word:
        words.insert(rng.randrange(1, len(words) + 1), DESIGNER_WORD)
    return " ".join(words)


def is_on_topic(words: list[str], topic: str) -> bool:
    """Whether ``topic`` has at least one word in ``words`` and at least as many as any other topic."""
    hits = {t: sum(w in ws for w in words) for t, ws in TOPICS.items()}
    return hits[topic] > 0 and hits[topic] == max(hits.values())


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
        chosen = topic_answer(rng, topic, rng.random() < p_word, rng.randint(3, 6))
        rejected = topic_answer(rng, other, rng.random() < p_word, rng.randint(3, 6))
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


def avoid_word_reward(prompts, completions, **kwargs):
    """A TRL-style reward function: 1.0 when the completion avoids the designer word, else 0.0."""
    out = []
    for c in completions:
        text = c if isinstance(c, str) else " ".join(m["content"] for m in c)
        out.append(0.0 if DESIGNER_WORD in text.split() else 1.0)
    return out
