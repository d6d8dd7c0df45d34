"""Helpers shared by the tests (import as ``from tests.helpers import ...``)."""

from __future__ import annotations


def cpu_args(output_dir, **kwargs):
    """UPOConfig (or DPOConfig via ``config_cls``) settings for fast deterministic CPU runs."""
    from trl_upo import UPOConfig

    config_cls = kwargs.pop("config_cls", UPOConfig)
    defaults = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=42,
        dataloader_num_workers=0,
    )
    defaults.update(kwargs)
    return config_cls(**defaults)


def prompt_dataset(n: int, conversational: bool = False):
    """``n`` prompts about the synthetic topics (a string, or one user message), with an ``id`` column."""
    from datasets import Dataset

    from trl_upo.testing import TOPICS

    topics = list(TOPICS)
    rows = []
    for i in range(n):
        topic = topics[i % len(topics)]
        prompt = [{"role": "user", "content": f"tell me about {topic}"}] if conversational else f"tell me about {topic} answer"
        rows.append({"prompt": prompt, "id": i})
    return Dataset.from_list(rows)
