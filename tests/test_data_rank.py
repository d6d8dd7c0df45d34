"""Reward-ranked pairs (``trl_upo.data.rank``): pairing math on hand values, candidates from columns and from a real
tiny model, scores UPOTrainer trains on without re-scoring, bad input rejected before generation, and resume."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from datasets import Dataset

from trl_upo import UPOTrainer
from trl_upo.data import (
    GenerationSettings,
    OutputSettings,
    RankConfig,
    build_rank_pairs,
    column_head_specs,
    select_pairs,
    within_prompt,
)
from trl_upo.data.generation import TransformersGenerator

from tests.helpers import cpu_args, prompt_dataset as _prompts

NOVERY = {"name": "novery", "type": "lexicon", "params": {"avoid": ["very"]}}
SHORT = {"name": "short", "type": "length", "weight": 0.5}


pytestmark = pytest.mark.usefixtures("one_torch_thread")




def _gen(model: str, **kw) -> GenerationSettings:
    return GenerationSettings(model=model, max_new_tokens=kw.pop("max_new_tokens", 6), **kw)


# ---------------------------------------------------------------------------------------------------------------
# Pairing and normalisation on hand-computed values
# ---------------------------------------------------------------------------------------------------------------


def test_within_prompt_scales():
    """[1, 3, 3, 5]: zscore = (x - 3) / sqrt(2) (mean 3, population std sqrt(2)); ranks 0, 1.5, 1.5, 3 over 3."""
    x = np.array([1.0, 3.0, 3.0, 5.0])
    assert within_prompt(x, "none").tolist() == [1.0, 3.0, 3.0, 5.0]
    np.testing.assert_allclose(within_prompt(x, "zscore"), (x - 3) / np.sqrt(2))
    np.testing.assert_allclose(within_prompt(x, "rank"), [0.0, 0.5, 0.5, 1.0])
    assert within_prompt(np.array([2.0, 2.0]), "zscore").tolist() == [0.0, 0.0]


def test_candidate_rank_is_not_the_training_rank():
    """The builder's "rank" (candidate_ranks: an order among one prompt's candidates, in [0, 1]) and training's "rank"
    (a quantile over the split, scaled to mean 0 and variance 1) share a name, not the maths."""
    from trl_upo.data.rank import candidate_ranks
    from trl_upo.objective import fit_normalization, normalize_scores

    x = np.array([1.0, 3.0, 3.0, 5.0])
    np.testing.assert_allclose(candidate_ranks(x), within_prompt(x, "rank"))
    stats = fit_normalization(x, "rank")
    training = normalize_scores(torch.tensor(x)[:, None], [stats])[:, 0].numpy()
    assert training.min() < 0 < training.max() and not np.allclose(training, candidate_ranks(x))


def test_select_pairs_hand_values():
    agg = np.array([1.0, 3.0, 3.0, 0.5])
    # best: first of the tied maxima (1); worst: the last minimum (3); gap 2.5.
    assert select_pairs(agg, "best_vs_worst", 0.0) == [(1, 3)]
    assert select_pairs(agg, "best_vs_worst", 2.5) == []  # the gap must exceed the margin
    # every ordered pair with a gap > 0.6: (1,0) 2.0, (0,3) 0.5 is not, (2,0), (1,3), (2,3); the tie (1,2) is not.
    assert select_pairs(agg, "all_above_margin", 0.6) == [(1, 0), (2, 0), (1, 3), (2, 3)]
    assert select_pairs(np.array([2.0, 2.0]), "best_vs_worst", 0.0) == []


def test_rank_from_candidates_column_exact_scores_and_columns(tmp_path):
    ds = Dataset.from_list(
        [
            {"prompt": "p0", "cands": [" a very long answer here", " short", " very very"], "src": "x"},
            {"prompt": "p1", "cands": [" one two", " one two three"], "src": "y"},
        ]
    )
    cfg = RankConfig(reward_heads=[NOVERY, SHORT], candidates_column="cands", batch_size=1)
    out = build_rank_pairs(ds, cfg, OutputSettings(str(tmp_path / "pairs.jsonl"), progress=False))
    # p0: novery = [-1, 0, -2], short (-words) = [-5, -1, -2]; agg = novery + 0.5 * short = [-3.5, -0.5, -3].
    # p1: novery = [0, 0], short = [-2, -3]; agg = [-1, -1.5].
    assert out.column_names == [
        "prompt", "chosen", "rejected", "score_chosen", "score_rejected", "score_novery_chosen",
        "score_novery_rejected", "score_short_chosen", "score_short_rejected", "src",
    ]  # fmt: skip
    rows = out.to_list()
    assert rows[0] | {} == {
        "prompt": "p0", "chosen": " short", "rejected": " a very long answer here", "score_chosen": -0.5,
        "score_rejected": -3.5, "score_novery_chosen": 0.0, "score_novery_rejected": -1.0,
        "score_short_chosen": -1.0, "score_short_rejected": -5.0, "src": "x",
    }  # fmt: skip
    assert (rows[1]["chosen"], rows[1]["rejected"], rows[1]["score_chosen"]) == (" one two", " one two three", -1.0)
    # The JSONL on disk is the same data, floats to the last digit.
    on_disk = [json.loads(line) for line in open(tmp_path / "pairs.jsonl")]
    assert on_disk == rows
    assert not (tmp_path / "pairs.jsonl.shards").exists()


def test_rank_candidate_columns_all_above_margin_and_keep_candidates():
    ds = Dataset.from_list([{"prompt": "p", "a": " x", "b": " x x x", "c": " x x"}])
    cfg = RankConfig(
        reward_heads=[{"name": "length"}],
        candidate_columns=["a", "b", "c"],
        pairing="all_above_margin",
        margin=0.5,
        keep_candidates=True,
    )
    out = build_rank_pairs(ds, cfg).to_list()
    # lengths 1, 3, 2 -> scores -1, -3, -2: a>b, a>c, c>b, each by >= 1.
    assert [(r["chosen"], r["rejected"]) for r in out] == [(" x", " x x x"), (" x", " x x"), (" x x", " x x x")]
    assert out[0]["candidates"] == [" x", " x x x", " x x"] and out[0]["candidate_scores"] == [-1.0, -3.0, -2.0]


def test_rank_normalization_and_direction_from_specs():
    """A spec's own normalize and higher_is_better apply per prompt: a 'cost' head flips the choice."""
    ds = Dataset.from_list([{"prompt": "p", "cands": [" a", " a b c"]}])
    longer = RankConfig(reward_heads=[{"name": "length", "higher_is_better": False}], candidates_column="cands")
    row = build_rank_pairs(ds, longer)[0]
    assert (row["chosen"], row["score_chosen"], row["score_length_chosen"]) == (" a b c", 3.0, -3.0)
    ranked = RankConfig(reward_heads=[{"name": "length", "normalize": "rank"}], candidates_column="cands")
    row = build_rank_pairs(ds, ranked)[0]
    assert (row["chosen"], row["score_chosen"], row["score_rejected"]) == (" a", 1.0, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# End to end with the tiny model, and training on the output with no conversion
# ---------------------------------------------------------------------------------------------------------------


def test_rank_generated_with_reward_model_trains_upo(tiny_model_path, tiny_reward_model_path, tmp_path, score_cache):
    heads = [NOVERY, {"name": "rm", "type": "reward_model", "params": {"model": tiny_reward_model_path}}]
    cfg = RankConfig(
        reward_heads=heads, generation=_gen(tiny_model_path), num_candidates=3, batch_size=4, seed=1
    )
    out = build_rank_pairs(_prompts(8), cfg, OutputSettings(str(tmp_path / "pairs.parquet"), progress=False))
    assert len(out) == 8  # the reward model's float scores never tie: one pair per prompt
    assert out["id"] == list(range(8))
    for row in out:
        assert row["prompt"].startswith("tell me about") and row["chosen"] != row["rejected"]
        # ranking score = novery + rm (raw, weight 1 each), stored per head and summed
        for role in ("chosen", "rejected"):
            assert row[f"score_{role}"] == pytest.approx(row[f"score_novery_{role}"] + row[f"score_rm_{role}"])
        assert row["score_chosen"] > row["score_rejected"]
    # The stored reward-model scores are the reward model's scores of prompt + response.
    from trl_upo.heads import RewardModelHead

    rm = RewardModelHead(model=tiny_reward_model_path)
    np.testing.assert_allclose(
        rm.score(out["prompt"][:2], out["chosen"][:2], role="chosen", columns={}), out["score_rm_chosen"][:2], rtol=1e-5
    )
    # The Parquet file trains UPOTrainer directly, on the stored scores (column heads), for 2 steps.
    from datasets import load_dataset

    train = load_dataset("parquet", data_files=str(tmp_path / "pairs.parquet"), split="train")
    args = cpu_args(
        tmp_path / "run", reward_heads=cfg.column_head_specs(), upo_score_cache_dir=score_cache, max_steps=2
    )
    trainer = UPOTrainer(model=tiny_model_path, args=args, train_dataset=train)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all("upo/rm/chosen" in h for h in logs)


def test_rank_conversational_generated(tiny_model_path, tmp_path, score_cache):
    cfg = RankConfig(
        reward_heads=[{"name": "length"}], generation=_gen(tiny_model_path), num_candidates=4, batch_size=4
    )
    out = build_rank_pairs(
        _prompts(4, conversational=True), cfg, OutputSettings(str(tmp_path / "conv"), progress=False)
    )
    assert len(out) >= 1
    for row in out:
        assert row["prompt"][0]["role"] == "user"
        assert row["chosen"][0]["role"] == "assistant" and row["rejected"][0]["role"] == "assistant"
        assert row["score_length_chosen"] > row["score_length_rejected"]
    from datasets import load_from_disk

    train = load_from_disk(str(tmp_path / "conv"))
    args = cpu_args(tmp_path / "run", reward_heads=column_head_specs([{"name": "length"}]),
                    upo_score_cache_dir=score_cache, max_steps=2, per_device_train_batch_size=2)
    UPOTrainer(model=tiny_model_path, args=args, train_dataset=train).train()


# ---------------------------------------------------------------------------------------------------------------
# Determinism, interrupt and resume
# ---------------------------------------------------------------------------------------------------------------


class Interrupt(Exception):
    pass


def _resume_cfg(model: str, seed: int = 3) -> RankConfig:
    return RankConfig(reward_heads=[NOVERY, SHORT], generation=_gen(model), num_candidates=3, batch_size=2,
                      seed=seed, keep_candidates=True)


@pytest.fixture(scope="module")
def full_run(tiny_model_path, tmp_path_factory):
    """An uninterrupted run over 6 prompts in 3 batches: (the output file, the dataset)."""
    path = tmp_path_factory.mktemp("rank-full") / "full.jsonl"
    out = build_rank_pairs(_prompts(6), _resume_cfg(tiny_model_path), OutputSettings(str(path), progress=False))
    return path, out


def test_interrupted_rank_resumes_to_the_same_dataset(tiny_model_path, full_run, tmp_path, monkeypatch):
    calls = []
    real = TransformersGenerator.generate

    def counting(self, prompts, n, seed):
        calls.append(seed)
        return real(self, prompts, n, seed)

    monkeypatch.setattr(TransformersGenerator, "generate", counting)

    def stop_after_two(b):
        if b == 1:
            raise Interrupt

    part = tmp_path / "part.jsonl"
    with pytest.raises(Interrupt):
        build_rank_pairs(_prompts(6), _resume_cfg(tiny_model_path), OutputSettings(str(part), progress=False),
                         on_batch=stop_after_two)
    assert not part.exists() and len(list((tmp_path / "part.jsonl.shards").glob("shard-*.jsonl"))) == 2
    calls.clear()
    build_rank_pairs(_prompts(6), _resume_cfg(tiny_model_path), OutputSettings(str(part), progress=False))
    assert len(calls) == 1  # only the missing batch was generated
    assert part.read_bytes() == full_run[0].read_bytes()


def test_rank_samples_per_seed_and_batch(tiny_model_path, full_run):
    """A batch's candidates depend only on the seed and the batch: the first batch alone, with the same seed,
    repeats the full run's first batch; another seed samples other candidates."""
    first_batch = full_run[1].filter(lambda r: r["id"] < 2)["candidates"]
    assert build_rank_pairs(_prompts(2), _resume_cfg(tiny_model_path))["candidates"] == first_batch
    assert build_rank_pairs(_prompts(2), _resume_cfg(tiny_model_path, seed=4))["candidates"] != first_batch


def test_resume_refuses_other_settings_unless_overwrite(tmp_path):
    ds = Dataset.from_list([{"prompt": f"p{i}", "cands": [" a", " a b"]} for i in range(4)])
    out = OutputSettings(str(tmp_path / "o.jsonl"), progress=False)

    def stop(b):
        raise Interrupt

    with pytest.raises(Interrupt):
        build_rank_pairs(ds, RankConfig(reward_heads=[{"name": "length"}], candidates_column="cands", batch_size=2),
                         out, on_batch=stop)
    other = RankConfig(reward_heads=[{"name": "length"}], candidates_column="cands", batch_size=2, margin=0.5)
    with pytest.raises(ValueError, match="unfinished run with different settings"):
        build_rank_pairs(ds, other, out)
    out.overwrite = True
    assert len(build_rank_pairs(ds, other, out)) == 4
    out.overwrite = False
    with pytest.raises(ValueError, match="already exists"):
        build_rank_pairs(ds, other, out)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear error before any generation
# ---------------------------------------------------------------------------------------------------------------


def test_no_prompt_column(tiny_model_path, no_generation):
    ds = Dataset.from_list([{"question": "tell me about cats"}])
    cfg = RankConfig(reward_heads=[{"name": "length"}], generation=_gen(tiny_model_path), num_candidates=2)
    with pytest.raises(ValueError, match="no prompt column 'prompt'.*prompt_column"):
        build_rank_pairs(ds, cfg)
    with pytest.raises(ValueError, match="Did you mean 'prompts'"):
        build_rank_pairs(Dataset.from_list([{"prompts": "x"}]), cfg)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_candidates=1), "num_candidates must be an integer >= 2"),
        (dict(num_candidates=None), "needs num_candidates"),
        (dict(num_candidates=2, reward_heads=[{"name": "lenght"}]), "Did you mean 'length'"),
        (dict(num_candidates=2, reward_heads=[]), "at least one reward head"),
        (dict(num_candidates=2, reward_heads=[{"name": "c", "type": "column",
                                               "params": {"chosen": "a", "rejected": "b"}}]),
         "reads scores of existing"),
        (dict(num_candidates=2, pairing="best"), "pairing must be one of"),
        (dict(num_candidates=2, margin=-1), "margin must be"),
        (dict(num_candidates=2, candidates_column="c"), "exactly one source"),
    ],
)
def test_bad_rank_config(tiny_model_path, kwargs, match):
    kwargs = {"reward_heads": [{"name": "length"}], "generation": _gen(tiny_model_path)} | kwargs
    with pytest.raises(ValueError, match=match):
        RankConfig(**kwargs)


def test_bad_generation_settings(tiny_model_path):
    with pytest.raises(ValueError, match="needs sampling"):
        RankConfig(reward_heads=[{"name": "length"}], generation=_gen(tiny_model_path, do_sample=False),
                   num_candidates=2)
    if importlib.util.find_spec("vllm") is None:  # the real vLLM path is the gpu test below
        with pytest.raises(ValueError, match="vllm package.*pip install vllm"):
            GenerationSettings(model=tiny_model_path, backend="vllm")
    with pytest.raises(ValueError, match="does not exist"):
        GenerationSettings(model="./no/such/model")


@pytest.mark.parametrize(
    "rows, cfg, match",
    [
        ([{"prompt": "p", "c": [" only one"]}], dict(candidates_column="c"), "1 candidate.*N >= 2"),
        ([{"prompt": "p", "c": [" a", " b"]}], dict(candidates_column="c", num_candidates=3), "num_candidates=3"),
        ([{"prompt": "p", "c": " a"}], dict(candidates_column="c"), "must hold a list"),
        ([{"prompt": "p", "a": " x", "b": " y"}], dict(candidate_columns=["a", "bb"]), "no candidate column 'bb'"),
        ([{"prompt": "p", "a": " x"}], dict(candidate_columns=["a"]), "N >= 2 columns"),
        ([{"prompt": "", "a": " x", "b": " y"}], dict(candidate_columns=["a", "b"]), "prompt is empty"),
        ([{"prompt": "p", "a": " x", "b": " y", "chosen": "z"}], dict(candidate_columns=["a", "b"]),
         r"\['chosen'\], which the output would overwrite"),
    ],
)
def test_bad_candidates(rows, cfg, match):
    with pytest.raises(ValueError, match=match):
        build_rank_pairs(Dataset.from_list(rows), RankConfig(reward_heads=[{"name": "length"}], **cfg))


@pytest.mark.gpu
def test_rank_with_vllm(tiny_model_path):
    """Needs a CUDA GPU and vllm: ``pytest -m gpu tests/test_data_rank.py``."""
    pytest.importorskip("vllm")
    cfg = RankConfig(reward_heads=[{"name": "length"}], generation=_gen(tiny_model_path, backend="vllm"),
                     num_candidates=3, batch_size=4, keep_candidates=True)
    out = build_rank_pairs(_prompts(4), cfg)
    assert all(len(c) == 3 for c in out["candidates"])


def test_reward_model_that_cannot_load_fails_before_generation(tiny_model_path, no_generation):
    heads = [{"name": "rm", "type": "reward_model", "params": {"model": "no-such-org/no-such-reward-model"}}]
    cfg = RankConfig(reward_heads=heads, generation=_gen(tiny_model_path), num_candidates=2)
    with pytest.raises(ValueError, match="cannot load 'no-such-org/no-such-reward-model'"):
        build_rank_pairs(_prompts(2), cfg)


def test_token_length_head_uses_the_given_tokenizer(tiny_model_path):
    ds = Dataset.from_list([{"prompt": "p", "a": " cats purr", "b": " cats purr very much"}])
    heads = [{"name": "tokens", "type": "length", "params": {"unit": "tokens"}}]
    with pytest.raises(ValueError, match="needs the trainer's tokenizer"):
        build_rank_pairs(ds, RankConfig(reward_heads=heads, candidate_columns=["a", "b"]))
    cfg = RankConfig(reward_heads=heads, candidate_columns=["a", "b"], tokenizer=tiny_model_path)
    row = build_rank_pairs(ds, cfg)[0]
    # word-level tokenizer: "much" is unknown but still one token -> 2 vs 4 tokens
    assert (row["chosen"], row["score_tokens_chosen"], row["score_tokens_rejected"]) == (" cats purr", -2.0, -4.0)
