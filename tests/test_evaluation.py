"""trl_upo.evaluation on the tiny model: generation shapes and batching, designer metrics, implicit-reward accuracy
checked against a hand computation, the PEFT (adapter-disabled) reference, and bad input."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

from trl_upo.evaluation import (
    designer_metrics,
    evaluate_policy,
    generate_responses,
    load_model,
    preference_metrics,
)
from tests.tiny import save_tiny_model
from trl_upo.quickstart import NOVERY_HEAD
from trl_upo.quickstart_task import build_tokenizer, preference_rows



@pytest.fixture(scope="module")
def policy_path(tmp_path_factory) -> str:
    return save_tiny_model(str(tmp_path_factory.mktemp("eval-policy")), seed=3)


@pytest.fixture(scope="module")
def policy(policy_path):
    return load_model(policy_path)


@pytest.fixture(scope="module")
def ref(tiny_model_path):
    return load_model(tiny_model_path)


PROMPTS = ["tell me about cats answer", "tell me about the rain and dogs please answer", "me answer"]


def test_generate_shapes_and_seed(policy, tokenizer):
    out = generate_responses(policy, tokenizer, PROMPTS, max_new_tokens=5, num_samples=3, batch_size=2, seed=1)
    assert len(out) == 3 and all(len(rs) == 3 for rs in out)
    assert all(isinstance(r, str) and 0 < len(r.split()) <= 5 for rs in out for r in rs)
    again = generate_responses(policy, tokenizer, PROMPTS, max_new_tokens=5, num_samples=3, batch_size=2, seed=1)
    assert out == again  # seeded
    other = generate_responses(policy, tokenizer, PROMPTS, max_new_tokens=5, num_samples=3, batch_size=2, seed=2)
    assert out != other  # actually sampled


def test_left_padding_batched_greedy_equals_one_by_one(policy, tokenizer):
    """Prompts of different lengths in one left-padded batch decode exactly as they do alone."""
    batched = generate_responses(policy, tokenizer, PROMPTS, max_new_tokens=6, do_sample=False, batch_size=3)
    alone = [generate_responses(policy, tokenizer, [p], max_new_tokens=6, do_sample=False)[0] for p in PROMPTS]
    assert batched == alone


def test_conversational_prompt_uses_chat_template_and_pad_fallback(policy):
    tok = build_tokenizer()
    chat = [[{"role": "user", "content": "tell me about cats"}]]
    rendered = ["<|user|> tell me about cats <|assistant|> "]  # the tiny chat template, with the generation prompt
    assert generate_responses(policy, tok, chat, max_new_tokens=6, do_sample=False) == generate_responses(
        policy, tok, rendered, max_new_tokens=6, do_sample=False
    )
    no_pad = copy.deepcopy(tok)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    assert generate_responses(policy, no_pad, PROMPTS, max_new_tokens=4, do_sample=False) == generate_responses(
        policy, tok, PROMPTS, max_new_tokens=4, do_sample=False
    )


def test_designer_metrics_raw_scores_by_hand():
    prompts = ["p1", "p2"]
    responses = [["a b c", "a very b"], ["x"]]
    heads = [NOVERY_HEAD, {"name": "words", "type": "length", "params": {"direction": "longer"}}]
    m = designer_metrics(prompts, responses, heads)
    # novery: 1, 0, 1 -> mean 2/3, population std sqrt(2/9); length: 3, 3, 1 -> mean 7/3, std sqrt(8/9)
    assert m["novery"]["n"] == 3 and m["novery"]["mean"] == pytest.approx(2 / 3)
    assert m["novery"]["std"] == pytest.approx(math.sqrt(2 / 9))
    assert m["words"]["mean"] == pytest.approx(7 / 3) and m["words"]["std"] == pytest.approx(math.sqrt(8 / 9))
    chat = designer_metrics([[{"role": "user", "content": "hi"}]], [["very good"]], [NOVERY_HEAD])
    assert chat["novery"]["mean"] == 0.0  # conversational: scored as an assistant message


#: Student's t two-sided 95% quantiles from a printed table (t_{0.975, df}).
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 5: 2.571, 10: 2.228, 30: 2.042, 100: 1.984, 5000: 1.960}


def test_the_confidence_interval_is_students_t_clipped_to_the_heads_range():
    """ci95 = mean -+ t_{0.975, n-1} * s / sqrt(n) (s with n - 1), by hand; clipped to a head's known range (a
    lexicon head that only avoids words scores at most 0), open where the range is not known (a function head)."""
    from trl_upo.evaluation.designer import mean_interval, score_range, t_quantile

    for df, t in T_TABLE.items():
        assert t_quantile(0.95, df) == pytest.approx(t, abs=5e-4), df
    responses = [["a b c", "a very b", "x very", "very"]]
    avoid = {"name": "avoid", "type": "lexicon", "params": {"avoid": ["very"], "mode": "presence"}}
    m = designer_metrics(["p"], responses, [NOVERY_HEAD, avoid])
    # novery (function): 1, 0, 0, 0 -> mean 1/4, s = 1/2; half width t_3 * 0.5 / 2 = 0.7956, not clipped
    assert m["novery"]["range"] is None
    assert m["novery"]["ci95"] == pytest.approx([0.25 - 3.182446 / 4, 0.25 + 3.182446 / 4], abs=1e-5)
    # avoid (lexicon presence): 0, -1, -1, -1 -> mean -3/4, same spread: [-1.5456, 0.0456] clipped to [-1, 0]
    assert m["avoid"]["range"] == [-1.0, 0.0] and m["avoid"]["ci95"] == [-1.0, 0.0]
    assert designer_metrics(["p"], [["one"]], [NOVERY_HEAD])["novery"]["ci95"] is None  # one response: no interval
    assert mean_interval(2.0, 1.0, 101) == pytest.approx([2 - 0.197413, 2 + 0.197413], abs=1e-5)  # t_100 / sqrt(101)

    def spec(kind, **params):
        return type("Spec", (), {"type": kind, "params": params})()

    assert score_range(spec("length")) == [None, 0.0] and score_range(spec("length", direction="longer")) == [0.0, None]
    assert score_range(spec("length", direction="longer", target=5)) == [None, 0.0]
    assert score_range(spec("similarity", exemplars=["x"])) == [-1.0, 1.0]
    assert score_range(spec("classifier", labels=["a", "b"])) == [0.0, 2.0]
    assert score_range(spec("classifier", labels="a", output="logit")) is None
    assert score_range(spec("lexicon", encourage="thanks", mode="count")) == [0.0, None]
    assert score_range(spec("reward_model", model="m")) is None


def test_designer_metrics_bad_heads():
    with pytest.raises(ValueError, match="did you mean 'weight'"):
        designer_metrics(["p"], [["r"]], [{"name": "length", "wieght": 1.0}])
    with pytest.raises(ValueError, match="reads dataset columns"):
        designer_metrics(["p"], [["r"]], [{"name": "c", "type": "column", "params": {"chosen": "a", "rejected": "b"}}])
    nan_head = {"name": "nan", "type": "function", "params": {"function": lambda prompts, completions, **kw: [None]}}
    with pytest.raises(ValueError, match="non-finite"):
        designer_metrics(["p"], [["r"]], [nan_head])
    with pytest.raises(ValueError, match="2 prompts but 1"):
        designer_metrics(["p", "q"], [["r"]], [NOVERY_HEAD])


def _logp_by_hand(model, tok, prompt: str, completion: str) -> float:
    """Sum of log p(token) over the completion (and EOS), one unpadded sequence at a time."""
    p = tok(prompt)["input_ids"]
    full = tok(prompt + completion + tok.eos_token)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full])).logits[0]
    lp = torch.log_softmax(logits.double(), -1)
    return sum(float(lp[t - 1, full[t]]) for t in range(len(p), len(full)))


def test_implicit_reward_accuracy_by_hand(policy, ref, tokenizer):
    rows = preference_rows(6, seed=5)
    got = preference_metrics(policy, tokenizer, rows, ref_model=ref, beta=0.5, batch_size=4)
    margins, hits = [], 0.0
    for r in rows:
        def reward(y: str) -> float:
            by_hand = _logp_by_hand(policy, tokenizer, r["prompt"], y) - _logp_by_hand(ref, tokenizer, r["prompt"], y)
            return 0.5 * by_hand

        rc, rr = reward(r["chosen"]), reward(r["rejected"])
        margins.append(rc - rr)
        hits += 1.0 if rc > rr else 0.5 if rc == rr else 0.0
    assert got["reference"] == "ref_model" and got["n"] == 6
    assert got["accuracy"] == pytest.approx(hits / 6)
    assert got["margin_mean"] == pytest.approx(sum(margins) / 6, abs=1e-4)
    assert got["margin_std"] == pytest.approx(float(torch.tensor(margins).std(unbiased=False)), abs=1e-4)
    assert 0 < got["accuracy"] < 1  # the hand case is not degenerate
    same = preference_metrics(policy, tokenizer, rows, ref_model=policy)
    assert same["accuracy"] == 0.5 and same["ties"] == 6 and same["margin_mean"] == 0.0  # ties count half


def test_no_reference_says_which_metric(policy, tokenizer, caplog):
    rows = preference_rows(4, seed=6)
    with caplog.at_level(logging.WARNING, logger="trl_upo.evaluation"):
        got = preference_metrics(policy, tokenizer, rows)
    assert got["reference"] == "none" and "policy log-prob accuracy" in got["metric"]
    assert got["accuracy"] == got["policy_logp_accuracy"]
    assert "no reference" in caplog.text


def test_peft_reference_is_the_adapter_disabled_model(tiny_model_path, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = load_model(tiny_model_path)
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ).eval()
    rows = preference_rows(5, seed=7)
    implicit = preference_metrics(peft_model, tokenizer, rows, batch_size=3)
    explicit = preference_metrics(peft_model, tokenizer, rows, ref_model=base)
    assert implicit["reference"] == "adapter_disabled"
    assert implicit["margin_mean"] != 0.0
    assert implicit["margin_mean"] == pytest.approx(explicit["margin_mean"], abs=1e-6)
    assert implicit["accuracy"] == explicit["accuracy"]
    # An adapter directory loads its base from the adapter config, and the tokenizer from there too.
    adapter_dir = str(tmp_path / "adapter")
    peft_model.save_pretrained(adapter_dir)
    from_path = preference_metrics(adapter_dir, None, rows)
    assert from_path["reference"] == "adapter_disabled"
    assert from_path["margin_mean"] == pytest.approx(implicit["margin_mean"], abs=1e-6)


def test_evaluate_policy_result_shape(policy_path, tiny_model_path):
    rows = preference_rows(4, seed=8, conversational=True)
    res = evaluate_policy(
        policy_path, prompts=[r["prompt"] for r in rows], heads=[NOVERY_HEAD], pairs=rows, ref_model=tiny_model_path,
        max_new_tokens=4, num_samples=2, num_examples=2, return_responses=True, temperature=0.7,
    )
    assert set(res) == {"designer", "preference", "generation", "samples", "responses"}
    assert res["designer"]["novery"]["n"] == 8
    assert res["preference"]["n"] == 4 and res["preference"]["reference"] == "ref_model"
    assert res["generation"]["temperature"] == 0.7 and res["generation"]["num_prompts"] == 4
    assert len(res["samples"]) == 2 and len(res["responses"]) == 4


def test_model_mode_is_restored(tiny_model_path, tokenizer):
    """A model in training mode is evaluated in eval mode (no dropout) and handed back in training mode."""
    model = load_model(tiny_model_path)
    model.config.attention_dropout = 0.5  # dropout would make the numbers differ if eval mode were not set
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    rows = preference_rows(4, seed=9)
    expected = preference_metrics(model, tokenizer, rows, ref_model=tiny_model_path)
    model.train()
    got = preference_metrics(model, tokenizer, rows, ref_model=tiny_model_path)
    assert model.training
    assert got["margin_mean"] == pytest.approx(expected["margin_mean"], abs=1e-9)
    generate_responses(model, tokenizer, ["a"], max_new_tokens=2)
    assert model.training


def test_bad_input(policy, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="neither a model"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match="identical greedy"):
        generate_responses(policy, tokenizer, ["a"], num_samples=2, do_sample=False)
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a string"):
        generate_responses(policy, tokenizer, ["a", 3])
    with pytest.raises(ValueError, match="missing \\['rejected'\\]"):
        preference_metrics(policy, tokenizer, [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(ValueError, match="Unknown reward head 'lenght'"):  # before any generation
        evaluate_policy(policy, tokenizer, prompts=["a"], heads=[{"name": "lenght"}])


def test_one_loader_for_dtypes_and_the_data_generator(tiny_model_path):
    """trl_upo.models is the one loader: dtype strings, and the data builders' generator loading through it."""
    from trl_upo.data.generation import GenerationSettings, TransformersGenerator
    from trl_upo.models import pretrained_kwargs, resolve_dtype

    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("auto") == "auto"
    assert resolve_dtype(None) is None
    assert pretrained_kwargs(dtype="float16", revision="main") == {"revision": "main", "dtype": torch.float16}
    assert pretrained_kwargs() == {}
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp16")
    generator = TransformersGenerator(GenerationSettings(model=tiny_model_path, dtype="bfloat16", device="cpu"))
    assert generator.model.dtype == torch.bfloat16 and not generator.model.training
    assert generator.tokenizer.padding_side == "left" and generator.tokenizer.pad_token is not None
