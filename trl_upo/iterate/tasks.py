"""The judge of the packaged default run (``trl_upo/resources/iterate.yaml``): on the quickstart's synthetic task the
preference is "on topic", so the judge accepts an answer whose words are mostly about the prompt's topic."""

from __future__ import annotations

from ..quickstart_task import TOPICS, is_on_topic


def on_topic(prompts, completions, **kwargs) -> list[float]:
    """A TRL-style reward function: 1.0 when the prompt's topic ("tell me about <topic> ...") has at least one word in
    the completion and at least as many as any other topic, else 0.0 (0.0 for a prompt that names no topic)."""
    out = []
    for prompt, completion in zip(prompts, completions, strict=True):
        text = completion if isinstance(completion, str) else " ".join(m["content"] for m in completion)
        prompt = prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)
        topic = next((t for t in TOPICS if f"about {t}" in prompt), None)
        out.append(float(topic is not None and is_on_topic(text.split(), topic)))
    return out
