"""Scoring the preference dataset before training: score columns, the on-disk cache, errors, implicit prompts,
normalisation statistics, and the trainer's use of all of it."""

from __future__ import annotations

import logging
import math
import os

import pytest
from datasets import Dataset

from tests.helpers import cpu_args
from trl_upo import RewardHead, UPOTrainer
from trl_upo.heads import build_head, parse_head_specs
from trl_upo.scoring import fit_head_statistics, score_column, score_dataset


class CountingHead(RewardHead):
    """Score = number of words + ``offset``; counts its calls and the responses it saw."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset
        self.calls: list[tuple[str, int]] = []

    def score(self, prompts, completions, *, role, columns, tokenizer=None):
        self.calls.append((role, len(completions)))
        return [float(len(str(c).split())) + self.offset for c in completions]


class RecordingHead(RewardHead):
    """Records exactly what it is given."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def score(self, prompts, completions, *, role, columns, tokenizer=None):
        self.seen.append(
            {"role": role, "prompts": list(prompts), "completions": list(completions), "columns": columns}
        )
        return [0.0 for _ in completions]


class CharTokenizer:
    """A tokenizer with one token per character (a different tokenizer from the word-level test one)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(ch) for ch in text]}


def heads_for(*specs):
    """Parse specs as UPOConfig does and build the heads as UPOTrainer does."""
    parsed = parse_head_specs(list(specs))
    return [build_head(s) for s in parsed], parsed


def small_dataset(**extra) -> Dataset:
    return Dataset.from_dict(
        {
            "prompt": ["p0", "p1", "p2"],
            "chosen": ["a b", "a", "a b c d"],
            "rejected": ["a b c", "a b c d e", ""],
            **extra,
        }
    )


def score(dataset, heads, specs, cache, **kwargs):
    kwargs.setdefault("split", "train")
    return score_dataset(dataset, heads, specs, cache_dir=cache, **kwargs)


# ------------------------------------------------------------------------------------------------------------------
# Score columns
# ------------------------------------------------------------------------------------------------------------------


def test_score_columns_values(score_cache):
    """Words, shorter: chosen ['a b', 'a', 'a b c d'] -> [-2, -1, -4]; rejected ['a b c', 'a b c d e', ''] ->
    [-3, -5, 0]. Chars, longer: chosen [3, 1, 7]; rejected [5, 9, 0]."""
    heads, specs = heads_for(
        {"name": "length"}, {"name": "chars", "type": "length", "params": {"unit": "chars", "direction": "longer"}}
    )
    ds = small_dataset(topic=["x", "y", "z"])
    out, report = score(ds, heads, specs, score_cache)
    assert out[score_column("length", "chosen")] == [-2.0, -1.0, -4.0]
    assert out["upo_length_rejected"] == [-3.0, -5.0, 0.0]
    assert out["upo_chars_chosen"] == [3.0, 1.0, 7.0]
    assert out["upo_chars_rejected"] == [5.0, 9.0, 0.0]
    assert report.status == {"length": "scored", "chars": "scored"}
    # nothing else changed
    assert len(out) == 3
    for col in ("prompt", "chosen", "rejected", "topic"):
        assert out[col] == ds[col]
    assert set(out.column_names) == set(ds.column_names) | {
        "upo_length_chosen",
        "upo_length_rejected",
        "upo_chars_chosen",
        "upo_chars_rejected",
    }


def test_column_head_through_score_dataset(score_cache):
    heads, specs = heads_for({"name": "rm", "type": "column", "params": {"chosen": "sc", "rejected": "sr"}})
    out, _ = score(small_dataset(sc=[0.5, 1.5, 2.5], sr=[-1, -2, -3]), heads, specs, score_cache)
    assert out["upo_rm_chosen"] == [0.5, 1.5, 2.5]
    assert out["upo_rm_rejected"] == [-1.0, -2.0, -3.0]


def test_column_head_missing_column_error_names_head_and_split(score_cache):
    heads, specs = heads_for({"name": "rm", "type": "column", "params": {"chosen": "sc", "rejected": "sr"}})
    with pytest.raises(ValueError) as e:
        score(small_dataset(sc=[0.5, 1.5, 2.5]), heads, specs, score_cache, split="eval")
    msg = str(e.value)
    assert "'rm'" in msg and "['sr']" in msg and "eval" in msg


def test_rescoring_replaces_existing_score_columns(score_cache):
    """Scoring an already-scored dataset again replaces the columns (no duplicates, fresh values)."""
    heads, specs = heads_for({"name": "length"})
    once, _ = score(small_dataset(), heads, specs, score_cache)
    heads2, specs2 = heads_for({"name": "length", "params": {"direction": "longer"}})
    twice, _ = score(once, heads2, specs2, score_cache)
    assert twice.column_names.count("upo_length_chosen") == 1
    assert twice["upo_length_chosen"] == [2.0, 1.0, 4.0]


def test_no_heads_is_a_no_op(score_cache):
    ds = small_dataset()
    out, report = score(ds, [], [], score_cache)
    assert out.column_names == ds.column_names and report.status == {}


# ------------------------------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------------------------------


def test_second_identical_call_hits_the_cache(score_cache):
    heads, specs = heads_for({"name": "count", "type": "tests.test_scoring:CountingHead"})
    ds = small_dataset()
    first, r1 = score(ds, heads, specs, score_cache)
    assert heads[0].calls == [("chosen", 3), ("rejected", 3)]
    assert r1.status == {"count": "scored"}
    assert os.listdir(score_cache), "scores were not written to the cache"

    # a second identical call, with a freshly built head and a freshly built identical dataset
    heads2, specs2 = heads_for({"name": "count", "type": "tests.test_scoring:CountingHead"})
    second, r2 = score(small_dataset(), heads2, specs2, score_cache)
    assert heads2[0].calls == []
    assert r2.status == {"count": "cached"}
    assert second["upo_count_chosen"] == first["upo_count_chosen"] == [2.0, 1.0, 4.0]
    assert second["upo_count_rejected"] == first["upo_count_rejected"] == [3.0, 5.0, 0.0]


def test_changed_head_param_rescores(score_cache):
    ds = small_dataset()
    heads, specs = heads_for({"name": "count", "type": "tests.test_scoring:CountingHead", "params": {"offset": 1}})
    out1, _ = score(ds, heads, specs, score_cache)
    heads2, specs2 = heads_for({"name": "count", "type": "tests.test_scoring:CountingHead", "params": {"offset": 10}})
    out2, r2 = score(ds, heads2, specs2, score_cache)
    assert r2.status == {"count": "scored"}
    assert len(heads2[0].calls) == 2
    assert out1["upo_count_chosen"] == [3.0, 2.0, 5.0]
    assert out2["upo_count_chosen"] == [12.0, 11.0, 14.0]


def test_changed_dataset_rescores(score_cache):
    heads, specs = heads_for({"name": "count", "type": "tests.test_scoring:CountingHead"})
    score(small_dataset(), heads, specs, score_cache)
    other = Dataset.from_dict({"prompt": ["p0"], "chosen": ["x y z"], "rejected": ["x"]})
    out, report = score(other, heads, specs, score_cache)
    assert report.status == {"count": "scored"}
    assert out["upo_count_chosen"] == [3.0]


def test_adding_a_head_scores_only_that_head(score_cache):
    ds = small_dataset()
    h1, s1 = heads_for({"name": "count", "type": "tests.test_scoring:CountingHead"})
    score(ds, h1, s1, score_cache)
    h2, s2 = heads_for(
        {"name": "count", "type": "tests.test_scoring:CountingHead"},
        {"name": "more", "type": "tests.test_scoring:CountingHead", "params": {"offset": 0.5}},
    )
    _, report = score(ds, h2, s2, score_cache)
    assert report.status == {"count": "cached", "more": "scored"}
    assert h2[0].calls == [] and len(h2[1].calls) == 2


def test_use_cache_false_always_scores(score_cache):
    ds = small_dataset()
    heads, specs = heads_for({"name": "count", "type": "tests.test_scoring:CountingHead"})
    for _ in range(2):
        _, report = score(ds, heads, specs, score_cache, use_cache=False)
        assert report.status == {"count": "scored"}
    assert len(heads[0].calls) == 4
    assert not os.path.exists(score_cache) or not os.listdir(score_cache)
    # and a cached result is ignored too
    score(ds, heads, specs, score_cache)
    _, report = score(ds, heads, specs, score_cache, use_cache=False)
    assert report.status == {"count": "scored"}


def test_tokenizer_change_rescores(score_cache, tokenizer):
    """A tokens-length head gives different scores with a different tokenizer (word-level: 'cats purr' -> 2
    tokens; one token per character: 9), so a cached score from the other tokenizer must not be reused."""
    ds = Dataset.from_dict({"prompt": ["p"], "chosen": ["cats purr"], "rejected": ["dogs"]})
    heads, specs = heads_for({"name": "toks", "type": "length", "params": {"unit": "tokens", "direction": "longer"}})
    words, _ = score(ds, heads, specs, score_cache, tokenizer=tokenizer)
    chars, _ = score(ds, heads, specs, score_cache, tokenizer=CharTokenizer())
    assert words["upo_toks_chosen"] == [2.0]
    assert chars["upo_toks_chosen"] == [9.0]


# ------------------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------------------


def flaky_reward(completions, **kwargs):
    """None for ' BAD', inf for ' INF', else 1."""
    out = []
    for c in completions:
        out.append(None if c == " BAD" else math.inf if c == " INF" else 1.0)
    return out


@pytest.mark.parametrize(
    ("chosen", "rejected", "split", "expected"),
    [
        ([" ok", " BAD", " ok"], [" ok"] * 3, "train", "row 1 chosen=nan"),  # None is read as NaN
        ([" ok"] * 3, [" ok", " ok", " INF"], "eval", "row 2 rejected=inf"),
    ],
)
def test_non_finite_score_raises_naming_head_split_row_and_role(score_cache, chosen, rejected, split, expected):
    ds = Dataset.from_dict({"prompt": ["p0", "p1", "p2"], "chosen": chosen, "rejected": rejected})
    heads, specs = heads_for({"name": "flaky", "type": "function", "params": {"function": flaky_reward}})
    with pytest.raises(ValueError) as e:
        score(ds, heads, specs, score_cache, split=split)
    msg = str(e.value)
    assert "'flaky'" in msg and split in msg
    assert expected in msg


def test_non_finite_score_is_rejected_on_a_cache_hit_too(score_cache):
    ds = Dataset.from_dict({"prompt": ["p0"], "chosen": [" BAD"], "rejected": [" ok"]})
    heads, specs = heads_for({"name": "flaky", "type": "function", "params": {"function": flaky_reward}})
    for _ in range(2):
        with pytest.raises(ValueError, match="row 0 chosen=nan"):
            score(ds, heads, specs, score_cache)


def test_wrong_number_of_scores_is_an_error(score_cache):
    class Short(RewardHead):
        def score(self, prompts, completions, *, role, columns, tokenizer=None):
            return [0.0] * (len(completions) - 1)

    specs = parse_head_specs([{"name": "length"}])
    with pytest.raises(ValueError, match="'length' returned 2 scores for 3 chosen responses of the train dataset"):
        score(small_dataset(), [Short()], specs, score_cache)


def test_head_exception_names_head_and_split(score_cache):
    heads, specs = heads_for({"name": "toks", "type": "length", "params": {"unit": "tokens"}})
    with pytest.raises(ValueError) as e:
        score(small_dataset(), heads, specs, score_cache, tokenizer=None)
    assert "'toks'" in str(e.value) and "train" in str(e.value) and "tokenizer" in str(e.value)


@pytest.mark.parametrize("drop", ["chosen", "rejected"])
def test_missing_preference_columns(score_cache, drop):
    ds = small_dataset().remove_columns(drop)
    heads, specs = heads_for({"name": "length"})
    with pytest.raises(ValueError) as e:
        score(ds, heads, specs, score_cache)
    msg = str(e.value)
    assert f"['{drop}']" in msg and "'chosen' and 'rejected'" in msg


# ------------------------------------------------------------------------------------------------------------------
# Implicit prompts and batching
# ------------------------------------------------------------------------------------------------------------------


def test_implicit_prompt_is_extracted(score_cache):
    """No prompt column; chosen and rejected are whole conversations sharing the user turn. The prompt becomes
    that turn, and the heads score only the assistant turns: 'cats purr' -> -2 words, 'dogs bark loud' -> -3."""
    user = {"role": "user", "content": "tell me about cats"}
    ds = Dataset.from_list(
        [
            {
                "chosen": [user, {"role": "assistant", "content": "cats purr"}],
                "rejected": [user, {"role": "assistant", "content": "dogs bark loud"}],
            }
        ]
    )
    rec = RecordingHead()
    specs = parse_head_specs([{"name": "length"}, {"name": "rec", "type": "tests.test_scoring:RecordingHead"}])
    out, _ = score(ds, [build_head(specs[0]), rec], specs, score_cache)
    assert out["prompt"] == [[user]]
    assert out["chosen"] == [[{"role": "assistant", "content": "cats purr"}]]
    assert out["upo_length_chosen"] == [-2.0]
    assert out["upo_length_rejected"] == [-3.0]
    assert rec.seen[0]["prompts"] == [[user]]
    assert rec.seen[0]["completions"] == [[{"role": "assistant", "content": "cats purr"}]]
    # the extraction is deterministic, so the same implicit-prompt dataset hits the cache the second time
    heads2 = [build_head(specs[0]), RecordingHead()]
    _, report = score(ds, heads2, specs, score_cache)
    assert report.status == {"length": "cached", "rec": "cached"}
    assert heads2[1].seen == []


def test_heads_receive_other_columns_but_not_prompt_or_responses(score_cache):
    rec = RecordingHead()
    specs = parse_head_specs([{"name": "rec", "type": "tests.test_scoring:RecordingHead"}])
    score(small_dataset(topic=["a", "b", "c"]), [rec], specs, score_cache, batch_size=2)
    assert [(s["role"], s["prompts"]) for s in rec.seen] == [
        ("chosen", ["p0", "p1"]),
        ("rejected", ["p0", "p1"]),
        ("chosen", ["p2"]),
        ("rejected", ["p2"]),
    ]
    assert rec.seen[0]["columns"] == {"topic": ["a", "b"]}
    assert rec.seen[2]["columns"] == {"topic": ["c"]}
    assert rec.seen[1]["completions"] == ["a b c", "a b c d e"]


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_small_batches_give_the_same_scores(score_cache, batch_size):
    """5 rows in batches of 1, 2 or 4 -> ceil(5 / b) calls per role, same scores as one batch."""
    ds = Dataset.from_dict(
        {
            "prompt": [f"p{i}" for i in range(5)],
            "chosen": ["a", "a b", "a b c", "a b c d", "a b c d e"],
            "rejected": ["x y z", "x", "", "x y", "w x y z v u"],
        }
    )
    heads, specs = heads_for({"name": "count", "type": "tests.test_scoring:CountingHead"})
    ref, _ = score(ds, heads, specs, score_cache, use_cache=False)
    heads_b, _ = heads_for({"name": "count", "type": "tests.test_scoring:CountingHead"})
    out, _ = score(ds, heads_b, specs, score_cache, use_cache=False, batch_size=batch_size)
    assert out["upo_count_chosen"] == ref["upo_count_chosen"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert out["upo_count_rejected"] == ref["upo_count_rejected"] == [3.0, 1.0, 0.0, 2.0, 6.0]
    assert len(heads_b[0].calls) == 2 * math.ceil(5 / batch_size)


# ------------------------------------------------------------------------------------------------------------------
# Normalisation statistics
# ------------------------------------------------------------------------------------------------------------------


def test_fit_head_statistics_pools_chosen_and_rejected():
    """Head h: chosen [1, 2], rejected [3, 4] -> pooled [1, 2, 3, 4]: count 4, mean 2.5, std sqrt(1.25).
    (Chosen alone would give mean 1.5.) Head g asks for rank: quantiles of [10, 20, 30, 40]."""
    ds = Dataset.from_dict(
        {
            "upo_h_chosen": [1.0, 2.0],
            "upo_h_rejected": [3.0, 4.0],
            "upo_g_chosen": [40.0, 10.0],
            "upo_g_rejected": [30.0, 20.0],
        }
    )
    specs = parse_head_specs([{"name": "h", "type": "length"}, {"name": "g", "type": "length", "normalize": "rank"}])
    st_h, st_g = fit_head_statistics(ds, specs, "zscore")
    assert st_h["mode"] == "zscore" and st_h["count"] == 4
    assert st_h["mean"] == pytest.approx(2.5)
    assert st_h["std"] == pytest.approx(math.sqrt(1.25))
    assert st_g["mode"] == "rank" and st_g["count"] == 4
    assert st_g["quantiles"] == pytest.approx([10.0, 20.0, 30.0, 40.0])


def test_fit_head_statistics_default_mode_and_constant_head_warning(caplog):
    ds = Dataset.from_dict({"upo_c_chosen": [2.0, 2.0], "upo_c_rejected": [2.0, 2.0]})
    specs = parse_head_specs([{"name": "c", "type": "length"}])
    with caplog.at_level(logging.WARNING, logger="trl_upo.scoring"):
        (st,) = fit_head_statistics(ds, specs, "none")
    assert st["mode"] == "none" and st["std"] == 0.0
    assert any("'c'" in r.getMessage() and "same score" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------------------------
# Trainer level
# ------------------------------------------------------------------------------------------------------------------

TRAINER_CALLS: list[int] = []


def counted_reward(completions, **kwargs):
    """Number of words; records each call's batch size."""
    TRAINER_CALLS.append(len(completions))
    return [float(len(c.split())) for c in completions]


def test_trainer_scores_once_and_second_trainer_uses_cache(
    tiny_model_path, train_dataset, eval_dataset, tmp_path, score_cache
):
    TRAINER_CALLS.clear()
    args = cpu_args(
        tmp_path / "out",
        reward_heads=[{"name": "counted", "type": "function", "params": {"function": counted_reward}}],
        upo_score_cache_dir=score_cache,
    )
    t1 = UPOTrainer(model=tiny_model_path, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset)
    # train (32 rows) and eval (8 rows), each chosen + rejected, in one batch of <= 256
    assert TRAINER_CALLS == [32, 32, 8, 8]
    assert t1.upo.score_report == {"train": {"counted": "scored"}, "eval": {"counted": "scored"}}
    expected = [float(len(c.split())) for c in train_dataset["chosen"]]
    assert t1.train_dataset["upo_counted_chosen"] == expected
    (st,) = t1.upo.statistics
    pooled = expected + [float(len(r.split())) for r in train_dataset["rejected"]]
    assert st["count"] == 64 and st["mean"] == pytest.approx(sum(pooled) / 64)

    t2 = UPOTrainer(model=tiny_model_path, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset)
    assert TRAINER_CALLS == [32, 32, 8, 8], "the second identical trainer called the head again"
    assert t2.upo.score_report == {"train": {"counted": "cached"}, "eval": {"counted": "cached"}}
    assert t2.train_dataset["upo_counted_chosen"] == expected
    assert t2.upo.statistics == t1.upo.statistics


@pytest.mark.parametrize("head", [
    {"name": "length", "params": {"unit": "chars"}},
    {"name": "lexicon", "params": {"avoid": ["very"], "mode": "rate"}},
    {"name": "readability"},
])
def test_text_heads_score_the_same_in_worker_processes(head, tmp_path):
    """num_proc > 1 scores shards in worker processes (datasets.map); the scores equal the serial ones."""
    from trl_upo.heads import build_head, parse_head_specs
    from trl_upo.scoring import score_dataset
    from tests.tiny import preference_dataset

    ds = preference_dataset(300, seed=4)
    specs = parse_head_specs([head])
    heads = [build_head(s) for s in specs]
    assert heads[0].parallel_safe
    serial, _ = score_dataset(ds, heads, specs, split="train", batch_size=64, use_cache=False)
    parallel, _ = score_dataset(ds, heads, specs, split="train", batch_size=64, use_cache=False, num_proc=2)
    for role in ("chosen", "rejected"):
        col = f"upo_{specs[0].name}_{role}"
        assert parallel[col] == serial[col]


def test_parallel_scoring_reports_the_row_of_a_bad_score(tmp_path):
    from trl_upo.heads import parse_head_specs
    from trl_upo.heads.length import LengthHead
    from trl_upo.scoring import score_dataset
    from datasets import Dataset

    class Broken(LengthHead):
        def score(self, prompts, completions, **kw):
            return super().score(prompts, completions, **kw)[:-1]  # one score short

    ds = Dataset.from_dict({"prompt": ["p"] * 200, "chosen": [" a b"] * 200, "rejected": [" c"] * 200})
    specs = parse_head_specs([{"name": "length"}])
    with pytest.raises(ValueError, match=r"returned 63 scores for 64 chosen responses .*rows (0|64|128)\.\."):
        score_dataset(ds, [Broken()], specs, split="train", batch_size=64, use_cache=False, num_proc=2)
