"""UPO next to DPO on CPU, in about a minute, on any machine, offline.

    python -m trl_upo.quickstart [--output-dir outputs/quickstart] [--steps 150] [--seed 0]

(The main quickstart is ``trl-upo train`` with no arguments: UPO alone, on the model and data packaged under
``trl_upo/resources/``, which ``scripts/build_quickstart_assets.py`` builds with :func:`sft_warmup`. This module
trains DPO and UPO from the same fresh start and compares them.)

1. Builds a tiny Llama and a word-level tokenizer locally and warms it up with TRL's SFTTrainer on a synthetic task
   (``trl_upo.quickstart_task``): a prompt names a topic; answers are on-topic or off-topic, and half of them contain
   the word "very".
2. Trains it on preference pairs (chosen = on-topic) twice from the same start and seed: with plain DPO
   (``UPOTrainer`` with no heads, which is DPOTrainer) and with UPO and one designer head that prefers answers
   without "very" (a TRL-style reward function). The labels ignore "very".
3. Samples answers to held-out prompts and prints, for the start, DPO and UPO: the "very" rate of the sampled
   answers (designer objective, lower is better), their on-topic rate, and the held-out preference accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch

from .cli.console import checkpointing_off, silence_upstream_deprecations
from .quickstart_task import DESIGNER_WORD, TOPICS, build_model, build_tokenizer, is_on_topic, preference_rows

# Settings that make every run of the quickstart CPU-only, quiet and checkpoint-free.
CPU_RUN = dict(use_cpu=True, bf16=False, **checkpointing_off(), report_to=[], save_strategy="no",
               disable_tqdm=True)
NOVERY_HEAD = {"name": "novery", "type": "function",
               "params": {"function": "trl_upo.quickstart_task:avoid_word_reward"}}


def sft_warmup(out_dir: str, seed: int, steps: int, rows: list[dict] | None = None) -> str:
    """Build a tiny Llama (hidden size 64) and warm it up with TRL's SFTTrainer on both answers of 400 synthetic
    pairs; save it with its tokenizer to ``<out_dir>/sft`` and return that path.

    Args:
        out_dir: Directory for the SFT run and the saved model.
        seed: Seed of the initialisation, the data and the trainer.
        steps: SFT steps (batch 32).
        rows: Preference pairs whose prompts and answers (chosen and rejected) to train on, instead of the 400 pairs
            of ``preference_rows(400, seed=seed + 1000)``.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed, hidden_size=64)
    if rows is None:
        rows = preference_rows(400, seed=seed + 1000)
    data = Dataset.from_list(
        [{"prompt": r["prompt"], "completion": r[k]} for r in rows for k in ("chosen", "rejected")]
    )
    args = SFTConfig(
        output_dir=os.path.join(out_dir, "sft-run"),
        per_device_train_batch_size=32,
        max_steps=steps,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=max(1, steps // 4),
        seed=seed,
        **CPU_RUN,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    path = os.path.join(out_dir, "sft")
    trainer.save_model(path)
    tokenizer.save_pretrained(path)
    return path


def _preference_run(base: str, out_dir: str, name: str, heads: list, seed: int, steps: int, alpha: float) -> str:
    from datasets import Dataset

    from . import UPOConfig, UPOTrainer

    train = Dataset.from_list(preference_rows(400, seed=seed + 2000))
    args = UPOConfig(
        output_dir=os.path.join(out_dir, name),
        per_device_train_batch_size=16,
        max_steps=steps,
        learning_rate=2e-3,
        beta=0.1,
        logging_steps=max(1, steps // 5),
        seed=seed,
        reward_heads=heads,
        **CPU_RUN,
        upo_alpha=alpha,
    )
    trainer = UPOTrainer(model=base, args=args, train_dataset=train)
    trainer.train()
    trainer.save_model()
    return args.output_dir


@torch.no_grad()
def measure_task(path: str, ref_path: str, seed: int, n_prompts: int = 64, samples: int = 4) -> dict:
    """The quickstart's table row for one model: the "very" rate and the on-topic rate of answers sampled for
    ``n_prompts`` held-out prompts (``samples`` each), and the implicit-reward preference accuracy against
    ``ref_path`` on 128 held-out pairs. (The general evaluation, with reward heads, is
    ``trl_upo.evaluation.evaluate_policy``.)"""
    from transformers import AutoModelForCausalLM

    from .objective import sequence_loglik

    tok = build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ref = AutoModelForCausalLM.from_pretrained(ref_path).eval()
    rng = random.Random(seed + 3000)
    topics = list(TOPICS)
    very = on_topic = total = 0
    torch.manual_seed(seed)
    prompt_topics = [rng.choice(topics) for _ in range(n_prompts)]
    tok.padding_side = "left"  # one batched generate call for every prompt
    enc = tok([f"tell me about {t} answer" for t in prompt_topics], return_tensors="pt", padding=True)
    gen = model.generate(
        **enc, do_sample=True, temperature=1.0, max_new_tokens=10, num_return_sequences=samples,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )
    for i, seq in enumerate(gen[:, enc["input_ids"].shape[1] :]):
        topic = prompt_topics[i // samples]
        words = tok.decode(seq, skip_special_tokens=True).split()
        total += 1
        very += DESIGNER_WORD in words
        on_topic += is_on_topic(words, topic)

    def seq_logps(m, prompts, completions):
        ids, masks = [], []
        for p, c in zip(prompts, completions):
            p_ids = tok(p)["input_ids"]
            c_ids = tok(c)["input_ids"] + [tok.eos_token_id]
            ids.append(p_ids + c_ids)
            masks.append([0] * len(p_ids) + [1] * len(c_ids))
        width = max(map(len, ids))
        x = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in ids])
        mask = torch.tensor([s + [0] * (width - len(s)) for s in masks])
        attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids])
        logits = m(input_ids=x, attention_mask=attn).logits[:, :-1]
        lp = torch.log_softmax(logits.float(), -1).gather(-1, x[:, 1:, None]).squeeze(-1)
        return sequence_loglik(lp, mask[:, 1:], "sum")

    pairs = preference_rows(128, seed=seed + 4000)
    prompts = [r["prompt"] for r in pairs]
    margins = (
        seq_logps(model, prompts, [r["chosen"] for r in pairs])
        - seq_logps(ref, prompts, [r["chosen"] for r in pairs])
        - seq_logps(model, prompts, [r["rejected"] for r in pairs])
        + seq_logps(ref, prompts, [r["rejected"] for r in pairs])
    )
    return {
        "very_rate": very / total,
        "on_topic_rate": on_topic / total,
        "preference_accuracy": float(((margins > 0).float() + 0.5 * (margins == 0).float()).mean()),  # ties count half
        "samples": total,
    }


def run(output_dir: str = "outputs/quickstart", steps: int = 150, sft_steps: int = 150, seed: int = 0,
        alpha: float = 1.0) -> dict:
    """Run the quickstart and return the measured table (also written to ``<output_dir>/results.json``)."""
    t0 = time.time()
    torch.set_num_threads(1)  # a model this small gains nothing from more threads, which stall on a busy machine
    os.makedirs(output_dir, exist_ok=True)
    base = sft_warmup(output_dir, seed, sft_steps)
    dpo = _preference_run(base, output_dir, "dpo", [], seed, steps, alpha)
    upo = _preference_run(base, output_dir, "upo", [NOVERY_HEAD], seed, steps, alpha)
    results = {
        "start (SFT)": measure_task(base, base, seed),
        "DPO": measure_task(dpo, base, seed),
        "UPO (novery head)": measure_task(upo, base, seed),
    }
    results["_seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def format_table(results: dict) -> str:
    """The comparison table of :func:`run`'s results."""
    lines = [
        f"{'policy':<20} {'very rate (lower=better)':>25} {'on-topic rate':>14} {'pref. accuracy':>15}",
    ]
    for name, r in results.items():
        if name.startswith("_"):
            continue
        lines.append(
            f"{name:<20} {r['very_rate']:>25.3f} {r['on_topic_rate']:>14.3f} {r['preference_accuracy']:>15.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point of ``python -m trl_upo.quickstart``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/quickstart")
    parser.add_argument("--steps", type=int, default=150, help="preference-optimisation steps per run")
    parser.add_argument("--sft-steps", type=int, default=150, help="warm-up steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=1.0, help="UPO auxiliary coefficient")
    a = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    silence_upstream_deprecations()
    results = run(a.output_dir, a.steps, a.sft_steps, a.seed, a.alpha)
    print()
    print(format_table(results))
    print(f"\n({results['_seconds']} s; results in {os.path.join(a.output_dir, 'results.json')})")


if __name__ == "__main__":
    main()
