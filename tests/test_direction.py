"""Direction of the effect: a reward head moves the policy towards the kind of response it prefers, where DPO on
the same data (whose labels ignore that property) does not.

Task (``trl_upo.quickstart_task``): the chosen answer is on-topic, the rejected one off-topic (the preference);
independently, "very" appears in half of all answers. Head ``novery`` (the quickstart's) scores 1 when an answer
avoids "very" (the designer objective).

Setup. Both runs start from the same small language model of this data: the saved 2-layer Llama fine-tuned by
plain maximum likelihood on prompt -> answer pairs (chosen and rejected answers, so it knows the language but not the
preference, and says "very" as often as the data does). This is the usual place DPO starts from, and it makes the
comparison meaningful: trained from a random initialisation, DPO's own drift on rare tokens (it lowers the likelihood
of both responses and squeezes probability away from every non-argmax token) is of the same size as the effect and
flips its sign from seed to seed (see the numbers below).

Metric, after training, on held-out pairs that differ only in the designer property: an on-topic answer to a
held-out prompt without "very" vs the same answer with "very" inserted at a random position;
``very_gap = mean over pairs of [log p(answer without "very") - log p(answer with "very")]``, log p summed over the
completion tokens (the answer and EOS, tokenised as TRL does) under the trained model. Preference accuracy on held-out
on-topic vs off-topic pairs is DPO's implicit-reward accuracy (policy minus the starting model's log-ratio).

Measured (CPU, torch 2 threads, trl 1.16, transformers 5.x; 200 pairs, batch 8, 2 epochs = 50 steps, beta 0.1, UPO
alpha 1 (the default until the frontier sweep set 0.5; pinned here), tau 0.25, batch baseline, chosen only):
  starting model: very_gap 2.34
  full fine-tuning, lr 1e-3, seeds 0-7:
    DPO very_gap 2.62 2.60 2.73 2.53 2.45 2.67 2.64 2.48   (implicit accuracy 0.95-1.00)
    UPO very_gap 3.76 3.60 3.46 3.33 3.84 3.61 3.74 3.53   (implicit accuracy 0.94-1.00)
    UPO - DPO    1.13 1.01 0.73 0.80 1.39 0.93 1.10 1.05
    per-token-mean version of the gap, UPO - DPO: 0.12-0.23
    control, UPO with a constant head (all weights 1, i.e. DPO + likelihood of every chosen answer), seeds 1-4:
    very_gap 2.52 2.57 2.49 2.75 vs UPO 3.60 3.46 3.33 3.84: the effect comes from the head, not from the
    likelihood term itself (which, if anything, keeps "very" as likely as the data has it).
  LoRA (r 8, all linear layers), lr 2e-3, seeds 0-7:
    UPO - DPO    0.79 0.85 0.34 0.63 0.97 0.64 1.00 0.77   (implicit accuracy UPO 0.92-1.00, DPO 0.97-1.00)
  Settings where the comparison does not hold (not used in the tests):
    - from the random initialisation (lr 1e-2, 3-5 epochs): UPO - DPO from -1.4 to +2.1 over seeds; DPO's very_gap
      wanders between 3.3 and 8.0 by itself;
    - from the starting model with lr 5e-3 (full) or 1e-2 (LoRA): DPO's squeezing lowers "very" as much as or more
      than UPO (UPO - DPO -0.5 to +0.3 over seeds 0-2), while both reach accuracy ~1.0 within one epoch.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from trl_upo import UPOTrainer
from trl_upo.quickstart import NOVERY_HEAD
from trl_upo.quickstart_task import DESIGNER_WORD, preference_rows

from tests.helpers import cpu_args
from tests.tiny import preference_dataset

N_TRAIN = 200
TRAIN = dict(max_steps=-1, num_train_epochs=2, per_device_train_batch_size=8, logging_steps=10)
FULL_LR = 1e-3
LORA_LR = 2e-3
# Required advantage of UPO over DPO in very_gap (nats, summed log-probability). Measured 0.73-1.39 (full) and
# 0.34-1.00 (LoRA) over 8 seeds; seed 0 gives 1.13 and 0.79.
FULL_MARGIN = 0.4
LORA_MARGIN = 0.3
# Preference accuracy must stay well above chance (0.5) and within this of DPO's.
MIN_ACCURACY = 0.8
ACCURACY_TOLERANCE = 0.1


# ----------------------------------------------------------------------------------------------------------------
# The starting model: the tiny Llama fine-tuned by maximum likelihood on the answers (both kinds)
# ----------------------------------------------------------------------------------------------------------------


def _sft(base_path: str, out_path: str, n_rows=400, epochs=3, lr=3e-3, batch_size=16, seed=100) -> str:
    tok = AutoTokenizer.from_pretrained(base_path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_path)
    seqs = []
    for row in preference_rows(n_rows, seed=seed, p_word=0.5):
        prompt_ids = tok(row["prompt"])["input_ids"]
        for answer in (row["chosen"], row["rejected"]):
            full = tok(row["prompt"] + answer + tok.eos_token)["input_ids"]
            seqs.append((full, [-100] * len(prompt_ids) + full[len(prompt_ids) :]))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    model.train()
    for _ in range(epochs):
        rng.shuffle(seqs)
        for i in range(0, len(seqs), batch_size):
            batch = seqs[i : i + batch_size]
            width = max(len(x) for x, _ in batch)
            ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x, _ in batch])
            labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.save_pretrained(out_path)
    tok.save_pretrained(out_path)
    return out_path


@pytest.fixture(scope="module")
def start_model_path(tiny_model_path, tmp_path_factory) -> str:
    return _sft(tiny_model_path, str(tmp_path_factory.mktemp("start-model")))


# ----------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------


def heldout_very_pairs(n=64, seed=1234):
    """(prompt, answer without "very", the same answer with "very" inserted) for held-out on-topic answers."""
    rng = random.Random(seed)
    pairs = []
    for row in preference_rows(n, seed=seed, p_word=0.0):
        words = row["chosen"].split()
        assert DESIGNER_WORD not in words
        with_word = list(words)
        with_word.insert(rng.randrange(1, len(words) + 1), DESIGNER_WORD)
        pairs.append((row["prompt"], " " + " ".join(words), " " + " ".join(with_word)))
    return pairs


@torch.no_grad()
def completion_logprob(model, tok, prompt: str, completion: str) -> tuple[float, float]:
    """Sum and per-token mean log-probability of the completion (+ EOS) given the prompt, as TRL tokenises it."""
    prompt_ids = tok(prompt)["input_ids"]
    full = tok(prompt + completion + tok.eos_token)["input_ids"]
    assert full[: len(prompt_ids)] == prompt_ids
    ids = torch.tensor([full])
    logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    token_logps = logps.gather(-1, ids[0, 1:, None])[:, 0][len(prompt_ids) - 1 :]
    assert token_logps.numel() == len(full) - len(prompt_ids)
    return token_logps.sum().item(), token_logps.mean().item()


def measure(model, ref, tok) -> dict[str, float]:
    """very_gap (sum and per-token mean) and held-out preference accuracy; ``ref`` is the starting model."""
    model.eval()
    gap_sum, gap_mean = [], []
    for prompt, without, with_word in heldout_very_pairs():
        s0, m0 = completion_logprob(model, tok, prompt, without)
        s1, m1 = completion_logprob(model, tok, prompt, with_word)
        gap_sum.append(s0 - s1)
        gap_mean.append(m0 - m1)
    implicit, per_token = [], []
    for row in preference_rows(64, seed=4321, p_word=0.5):
        pc, pcm = completion_logprob(model, tok, row["prompt"], row["chosen"])
        pr, prm = completion_logprob(model, tok, row["prompt"], row["rejected"])
        if ref is not None:
            rc, _ = completion_logprob(ref, tok, row["prompt"], row["chosen"])
            rr, _ = completion_logprob(ref, tok, row["prompt"], row["rejected"])
            implicit.append((pc - rc) > (pr - rr))
        per_token.append(pcm > prm)

    def avg(x):
        return sum(x) / len(x)

    return {
        "very_gap": avg(gap_sum),
        "very_gap_per_token": avg(gap_mean),
        "accuracy": avg(implicit) if implicit else float("nan"),  # undefined for the starting model itself
        "accuracy_per_token_logp": avg(per_token),
    }


def _train(kind, model_path, output_dir, seed, score_cache, lora=False, heads=None):
    train_dataset = preference_dataset(N_TRAIN, seed=seed, p_word=0.5)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    kwargs = dict(TRAIN, learning_rate=LORA_LR if lora else FULL_LR, seed=seed)
    if kind == "dpo":
        args = cpu_args(output_dir, config_cls=DPOConfig, **kwargs)
        trainer = DPOTrainer(model=model_path, args=args, train_dataset=train_dataset, peft_config=peft_config)
    else:
        args = cpu_args(
            output_dir, reward_heads=heads or [NOVERY_HEAD], upo_score_cache_dir=score_cache, upo_alpha=1.0, **kwargs
        )
        trainer = UPOTrainer(model=model_path, args=args, train_dataset=train_dataset, peft_config=peft_config)
    trainer.train()
    assert trainer.state.global_step == 50
    return trainer.model


def compare(start_model_path, tmp_path, score_cache, seed, lora=False, extra_upo_heads=None):
    tok = AutoTokenizer.from_pretrained(start_model_path)
    ref = AutoModelForCausalLM.from_pretrained(start_model_path).eval()
    results = {"start": measure(ref, None, tok)}
    tag = "lora" if lora else "full"
    for kind in ("dpo", "upo"):
        model = _train(kind, start_model_path, tmp_path / f"{kind}-{tag}-{seed}", seed, score_cache, lora=lora)
        results[kind] = measure(model, ref, tok)
    if extra_upo_heads:
        model = _train(
            "upo", start_model_path, tmp_path / f"ctrl-{tag}-{seed}", seed, score_cache, lora=lora,
            heads=extra_upo_heads,
        )
        results["control"] = measure(model, ref, tok)
    for name, r in results.items():
        print(
            f"[{tag} seed {seed}] {name:8s} very_gap={r['very_gap']:.3f} "
            f"per_token={r['very_gap_per_token']:.3f} accuracy={r['accuracy']:.3f} "
            f"(per-token logp accuracy {r['accuracy_per_token_logp']:.3f})"
        )
    print(f"[{tag} seed {seed}] UPO - DPO very_gap = {results['upo']['very_gap'] - results['dpo']['very_gap']:.3f}")
    return results


def _check_accuracy(results):
    upo, dpo = results["upo"]["accuracy"], results["dpo"]["accuracy"]
    assert upo >= MIN_ACCURACY, f"UPO's preference accuracy {upo:.3f} is near chance"
    assert upo >= dpo - ACCURACY_TOLERANCE, f"UPO's preference accuracy {upo:.3f} vs DPO's {dpo:.3f}"


# ----------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------


def test_heldout_pairs_differ_only_in_the_designer_word():
    for _, without, with_word in heldout_very_pairs():
        a, b = without.split(), with_word.split()
        assert DESIGNER_WORD not in a and b.count(DESIGNER_WORD) == 1
        b.remove(DESIGNER_WORD)
        assert a == b


def test_upo_raises_likelihood_of_head_preferred_responses_full(start_model_path, tmp_path, score_cache):
    r = compare(start_model_path, tmp_path, score_cache, seed=0)
    gap = r["upo"]["very_gap"] - r["dpo"]["very_gap"]
    assert gap > FULL_MARGIN, r
    assert r["upo"]["very_gap_per_token"] > r["dpo"]["very_gap_per_token"], r
    _check_accuracy(r)


def test_upo_raises_likelihood_of_head_preferred_responses_lora(start_model_path, tmp_path, score_cache):
    r = compare(start_model_path, tmp_path, score_cache, seed=0, lora=True)
    gap = r["upo"]["very_gap"] - r["dpo"]["very_gap"]
    assert gap > LORA_MARGIN, r
    assert r["upo"]["very_gap_per_token"] > r["dpo"]["very_gap_per_token"], r
    _check_accuracy(r)


def _constant_reward(prompts, completions, **kwargs):
    return [1.0] * len(completions)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_upo_direction_over_seeds_with_control(start_model_path, tmp_path, score_cache, seed):
    """Several seeds, plus a control: UPO with an uninformative (constant) head, whose weights are all 1, so its
    auxiliary term is plain likelihood on the chosen answers. The effect must come from the head."""
    control = [{"name": "const", "type": "function", "params": {"function": _constant_reward}}]
    r = compare(start_model_path, tmp_path, score_cache, seed=seed, extra_upo_heads=control)
    assert r["upo"]["very_gap"] - r["dpo"]["very_gap"] > FULL_MARGIN, r
    assert r["upo"]["very_gap"] - r["control"]["very_gap"] > FULL_MARGIN, r
    _check_accuracy(r)
