"""Scoring a stream (``IterableDataset``) lazily, the three sources of normalisation statistics without a pass over
the split, and the same-rows check of a distributed run made from a sample (two gloo processes)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from datasets import Dataset, IterableDataset

from tests.tiny import preference_dataset
from trl_upo import RewardHead
from trl_upo.formats import DataError
from trl_upo.heads import build_head, parse_head_specs
from trl_upo.scoring import (
    UNPAIRED_ROLES,
    fit_head_statistics,
    load_statistics,
    score_column,
    score_dataset,
    score_stream,
    statistics_summary,
    stream_statistics,
    write_statistics_summary,
)

TEXT_HEADS = [
    {"name": "len", "type": "length"},
    {"name": "lex", "type": "lexicon", "params": {"encourage": ["good", "clear"], "avoid": ["very"]}},
    {"name": "read", "type": "readability"},
]


def _heads(entries=TEXT_HEADS):
    specs = parse_head_specs(entries)
    return [build_head(s) for s in specs], specs


def _columns(rows, specs, roles=("chosen", "rejected")):
    return {score_column(s.name, r): [row[score_column(s.name, r)] for row in rows] for s in specs for r in roles}


class CountingHead(RewardHead):
    """Words per response; counts the responses it scored (not ``parallel_safe``: the stream cache applies)."""

    def __init__(self) -> None:
        self.scored = 0

    def score(self, prompts, completions, *, role, columns, tokenizer=None):
        self.scored += len(completions)
        return [float(len(str(c).split())) for c in completions]


@pytest.mark.parametrize("conversational", [False, True])
def test_a_stream_and_the_same_rows_map_style_give_identical_scores(conversational, score_cache):
    data = preference_dataset(30, seed=4, conversational=conversational)
    if conversational:  # an implicit prompt: extracted from the messages, for the stream as for the dataset
        data = data.map(lambda r: {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]},
                        remove_columns=["prompt"])
    heads, specs = _heads()
    mapped, _ = score_dataset(data, heads, specs, split="train", use_cache=False)
    stream = score_stream(data.to_iterable_dataset(num_shards=3), heads, specs, batch_size=7, cache_dir=score_cache)
    assert isinstance(stream, IterableDataset)
    rows = list(stream)
    assert [r["prompt"] for r in rows] == mapped["prompt"]
    for col, values in _columns(rows, specs).items():
        assert values == mapped[col], col


def test_unpaired_stream_and_a_model_head(tiny_classifier_path, score_cache):
    rows = [{"prompt": f"q{i}", "completion": f"answer number {i} " * (i % 4 + 1), "label": i % 2 == 0}
            for i in range(12)]
    entries = [{"name": "cls", "type": "classifier",
                "params": {"model": tiny_classifier_path, "labels": "positive", "device": "cpu"}},
               {"name": "len", "type": "length"}]
    heads, specs = _heads(entries)
    mapped, _ = score_dataset(Dataset.from_list(rows), heads, specs, split="train", use_cache=False,
                              roles=UNPAIRED_ROLES)
    stream = score_stream(Dataset.from_list(rows).to_iterable_dataset(), heads, specs, batch_size=5,
                          roles=UNPAIRED_ROLES, cache_dir=score_cache)
    got = _columns(list(stream), specs, UNPAIRED_ROLES)
    assert got["upo_len_completion"] == mapped["upo_len_completion"]
    # Another batch composition than the map-style pass: float32 noise at most.
    assert np.allclose(got["upo_cls_completion"], mapped["upo_cls_completion"], rtol=0, atol=1e-5)


def test_the_stream_cache_serves_a_second_read_without_running_the_head(score_cache):
    head, specs = CountingHead(), parse_head_specs([{"name": "words", "type": "length"}])
    stream = preference_dataset(20, seed=2).to_iterable_dataset()
    first = list(score_stream(stream, [head], specs, batch_size=8, cache_dir=score_cache))
    assert head.scored == 40
    again = list(score_stream(stream, [head], specs, batch_size=8, cache_dir=score_cache))
    assert head.scored == 40 and again == first
    list(score_stream(stream, [head], specs, batch_size=8, cache_dir=score_cache, use_cache=False))
    assert head.scored == 80


def test_nothing_is_scored_before_the_stream_is_read():
    head, specs = CountingHead(), parse_head_specs([{"name": "words", "type": "length"}])
    stream = score_stream(preference_dataset(50).to_iterable_dataset(), [head], specs, batch_size=10,
                          use_cache=False)
    assert head.scored == 0
    next(iter(stream))
    assert head.scored == 20  # one batch of 10 pairs


def test_a_non_finite_score_in_a_stream_names_the_row():
    class NoneOnRowSeven(RewardHead):
        def score(self, prompts, completions, *, role, columns, tokenizer=None):
            return [None if "#7 " in f"{c} " and role == "rejected" else 1.0 for c in completions]

    rows = [{"prompt": f"p{i}", "chosen": f"good #{i}", "rejected": f"bad #{i}"} for i in range(12)]
    specs = parse_head_specs([{"name": "flaky", "type": "length"}])
    stream = score_stream(Dataset.from_list(rows).to_iterable_dataset(), [NoneOnRowSeven()], specs, batch_size=5,
                          use_cache=False)
    with pytest.raises(DataError, match=r"'flaky' gave 1 non-finite score\(s\) on the train stream \(row 7 rejected"):
        list(stream)


def test_missing_columns_are_refused_before_anything_is_read():
    heads, specs = _heads()
    stream = Dataset.from_list([{"prompt": "p", "completion": "c", "label": True}]).to_iterable_dataset()
    with pytest.raises(DataError, match="UPOKTOTrainer"):
        score_stream(stream, heads, specs)


def test_statistics_of_the_first_rows_equal_fit_head_statistics_on_those_rows():
    data = preference_dataset(40, seed=5)
    heads, specs = _heads()
    mapped, _ = score_dataset(data, heads, specs, split="train", use_cache=False)
    for mode in ("zscore", "rank"):
        stats, source = stream_statistics(data.to_iterable_dataset(num_shards=2), heads, specs, mode, rows=25,
                                          batch_size=6, use_cache=False)
        assert stats == fit_head_statistics(mapped.select(range(25)), specs, mode)
        assert source.to_dict() == {"source": "stream", "rows": 25, "path": None}
    # A stream shorter than the rows asked for: all of it.
    _, source = stream_statistics(data.to_iterable_dataset(), heads, specs, "zscore", rows=1000, use_cache=False)
    assert source.rows == 40


def test_statistics_from_a_score_summary_equal_the_originals(tmp_path, tokenizer):
    data = preference_dataset(30, seed=6)
    heads, specs = _heads()
    mapped, _ = score_dataset(data, heads, specs, split="train", use_cache=False, tokenizer=tokenizer)
    original = fit_head_statistics(mapped, specs, "rank")
    write_statistics_summary(str(tmp_path), statistics_summary(mapped, heads, specs, "rank", tokenizer=tokenizer))
    stats, source = load_statistics(str(tmp_path), heads, specs, "rank", tokenizer=tokenizer)
    assert stats == original
    assert source.to_dict() == {"source": "score_summary", "rows": 30,
                                "path": os.path.abspath(tmp_path / "upo_statistics.json")}
    other_heads, other_specs = _heads([{**TEXT_HEADS[0], "params": {"unit": "chars"}}, *TEXT_HEADS[1:]])
    with pytest.raises(ValueError, match="other reward heads.*head 'len'"):
        load_statistics(str(tmp_path), other_heads, other_specs, "rank", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="normalised with 'rank' there, this run uses 'zscore'"):
        load_statistics(str(tmp_path), heads, specs, "zscore", tokenizer=tokenizer)


def test_trl_upo_score_output_writes_the_statistics(tmp_path, score_cache, capsys):
    from tests.test_cli_train import CPU, write_data, write_recipe
    from trl_upo.cli import score as cli_score

    entries = [{"name": "words", "type": "length", "params": {"unit": "words"}}]
    recipe = write_recipe(tmp_path / "r.yaml", dataset_name=str(write_data(tmp_path / "data", n_train=12, n_test=4)),
                          output_dir=str(tmp_path / "unused"), **CPU, reward_heads=entries,
                          upo_score_cache_dir=score_cache, upo_normalization="rank")
    assert cli_score.main(["--config", recipe, "--output", str(tmp_path / "scored")]) == 0
    capsys.readouterr()
    rows = [json.loads(line) for line in (tmp_path / "scored" / "train.jsonl").read_text().splitlines()]
    heads, specs = _heads(entries)
    stats, source = load_statistics(str(tmp_path / "scored"), heads, specs, "rank")
    assert stats == fit_head_statistics(Dataset.from_list(rows), specs, "rank")
    assert (source.source, source.rows) == ("score_summary", 12)


def test_statistics_from_an_earlier_runs_state_equal_the_originals(tmp_path):
    from types import SimpleNamespace

    from trl_upo.state import build_state, save_state

    data = preference_dataset(20, seed=7)
    heads, specs = _heads()
    mapped, _ = score_dataset(data, heads, specs, split="train", use_cache=False)
    original = fit_head_statistics(mapped, specs, "zscore")
    args = SimpleNamespace()  # the UPO settings recorded beside the statistics: not read here
    save_state(str(tmp_path / "checkpoint-5"), build_state(specs, heads, original, args))
    stats, source = load_statistics(str(tmp_path / "checkpoint-5"), heads, specs, "zscore")
    assert stats == original
    assert source.to_dict() == {"source": "upo_state", "rows": 20,
                                "path": os.path.abspath(tmp_path / "checkpoint-5" / "upo_state.json")}
    # Another weight does not change the raw scores; another parameter does.
    reweighted = parse_head_specs([{**TEXT_HEADS[0], "weight": 3.0}, *TEXT_HEADS[1:]])
    assert load_statistics(str(tmp_path / "checkpoint-5"), heads, reweighted, "zscore")[0] == original
    other_heads, other_specs = _heads([{**TEXT_HEADS[0], "params": {"unit": "chars"}}, *TEXT_HEADS[1:]])
    with pytest.raises(ValueError, match="(?s)other reward heads.*params.unit"):
        load_statistics(str(tmp_path / "checkpoint-5"), other_heads, other_specs, "zscore")
    with pytest.raises(ValueError, match="neither upo_statistics.json"):
        load_statistics(str(tmp_path), heads, specs, "zscore")


def _two_ranks(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from trl_upo.scoring.provenance import row_digests
    from trl_upo.scoring.rows import check_same_rows, sharded_digests
    from trl_upo.scoring.shards import World

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    world, roles, result = World(rank, 2), ("chosen", "rejected"), {}
    data = preference_dataset(600, seed=1)
    check_same_rows(world, data, roles, "train")  # the same rows: no error
    result["digests_match"] = sharded_digests(data, ("prompt", *roles), world) == row_digests(
        data, ("prompt", *roles))
    heads, specs = _heads(TEXT_HEADS[:2])
    stats, source = stream_statistics(data.to_iterable_dataset(), heads, specs, "zscore", rows=101, batch_size=16,
                                      use_cache=False, distributed=True)  # each rank scores half of the 101 rows
    mapped, _ = score_dataset(data.select(range(101)), heads, specs, split="train", use_cache=False)
    result["stream_statistics_match"] = stats == fit_head_statistics(mapped, specs, "zscore") and source.rows == 101
    cases = {"order": data.shuffle(seed=rank), "rows": data.select(range(rank, 600 - 1 + rank)),
             "size": data.select(range(600 - rank))}
    for name, mine in cases.items():
        try:
            check_same_rows(world, mine, roles, "train")
            result[name] = "passed"
        except ValueError as e:
            result[name] = str(e)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_the_sampled_same_rows_check_catches_different_rows(tmp_path):
    """Two gloo processes (torch.multiprocessing): the same rows pass; another order, a one-row shift of the rows
    and another size fail on both ranks; the provenance digests built from the two shares equal one process's; the
    statistics of the first rows of a stream, scored half by each rank, equal one process's on every rank."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_ranks, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["digests_match"] is True and result["stream_statistics_match"] is True
        for name in ("order", "rows", "size"):
            assert result[name].startswith("The processes were given different train datasets"), (name, result)


def test_scores_recorded_by_trl_upo_score_are_reused_by_a_stream_without_calling_the_head(tmp_path, score_cache,
                                                                                         capsys):
    """A ``trl-upo score --output`` dataset read as a stream: every batch whose rows record the same head takes its
    scores from the columns (the head is never called); a changed row, or a head with other parameters, is scored."""
    from datasets import load_dataset

    from tests.test_cli_train import CPU, write_data, write_recipe
    from trl_upo.cli import score as cli_score

    entries = [{"name": "words", "type": "length", "params": {"unit": "words"}},
               {"name": "lex", "type": "lexicon", "params": {"encourage": ["good"], "avoid": ["very"]}}]
    recipe = write_recipe(tmp_path / "r.yaml", dataset_name=str(write_data(tmp_path / "data", n_train=12, n_test=4)),
                          output_dir=str(tmp_path / "unused"), **CPU, reward_heads=entries,
                          upo_score_cache_dir=score_cache)
    assert cli_score.main(["--config", recipe, "--output", str(tmp_path / "scored")]) == 0
    capsys.readouterr()
    path = str(tmp_path / "scored" / "train.jsonl")
    written = [json.loads(line) for line in open(path)]
    heads, specs = _heads(entries)
    calls = []
    for head in heads:
        score = head.score
        head.score = lambda *a, _score=score, **k: calls.append(k["role"]) or _score(*a, **k)
    stream = load_dataset("json", data_files=path, split="train", streaming=True)
    rows = list(score_stream(stream, heads, specs, batch_size=5))
    assert calls == []  # recorded: no head was called for any batch
    assert rows == written

    changed = stream.map(lambda r, i: {"chosen": r["chosen"] + " very" if i == 7 else r["chosen"]}, with_indices=True)
    rows = list(score_stream(changed, heads, specs, batch_size=5))
    assert len(calls) == 2 * 2  # the batch of rows 5..9 only, both heads, both roles
    words = score_column("words", "chosen")
    assert abs(rows[7][words]) == abs(written[7][words]) + 1  # one word more, scored by the head

    other, other_specs = _heads([{**entries[0], "params": {"unit": "chars"}}])
    rows = list(score_stream(stream, other, other_specs, batch_size=5))
    assert abs(rows[0][words]) == len(written[0]["chosen"]) != abs(written[0][words])  # other parameters: rescored


def test_a_stream_scored_with_record_writes_the_provenance_map_style_scoring_writes(tmp_path, score_cache):
    """``score_stream(record=True)`` (``trl-upo score --dataset_streaming true --output``) records the same
    ``upo__scored_by`` as ``score_dataset(record=True)``, and a stream of its output is not scored again."""
    from datasets import load_dataset

    from trl_upo.scoring.provenance import PROVENANCE_COLUMN

    data = preference_dataset(12, seed=5)
    heads, specs = _heads()
    streamed = list(score_stream(data.to_iterable_dataset(), heads, specs, batch_size=5, record=True))
    mapped, _ = score_dataset(data, heads, specs, split="train", cache_dir=score_cache, record=True)
    assert [r[PROVENANCE_COLUMN] for r in streamed] == mapped[PROVENANCE_COLUMN]
    path = tmp_path / "scored.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in streamed))
    calls = []
    for head in heads:
        score = head.score
        head.score = lambda *a, _score=score, **k: calls.append(k["role"]) or _score(*a, **k)
    again = list(score_stream(load_dataset("json", data_files=str(path), split="train", streaming=True), heads, specs,
                              batch_size=5))
    assert calls == [] and again == streamed


@pytest.mark.parametrize("n_shards,split_batches", [(1, False), (2, False), (3, False), (1, True), (4, True)])
def test_each_rank_scores_only_the_rows_accelerate_gives_it(n_shards, split_batches):
    """A stream shared out by accelerate's own ``prepare_data_loader`` (two processes, rank by rank, in this process):
    with ``rank_share`` each rank scores the rows it receives, and of the others only the first batch x world rows
    (which accelerate may repeat to fill the last batch); no NaN placeholder reaches its batches."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    from trl_upo.scoring import rank_share
    from trl_upo.scoring.stream import accelerate_shards_files_at

    data = preference_dataset(23, seed=1).map(lambda r, i: {"prompt": f"{i}: {r['prompt']}"}, with_indices=True)
    stream = data.to_iterable_dataset(num_shards=n_shards)
    batch, world = 4, 2
    received, scored = [], []
    for rank in range(world):
        head, specs = CountingHead(), parse_head_specs([{"name": "words", "type": "length"}])
        share = rank_share(stream, world_size=world, rank=rank, batch_size=batch, split_batches=split_batches)
        by_files = n_shards > world or (n_shards == world and accelerate_shards_files_at(world))
        assert (share is None) == (by_files and not split_batches)
        scored_stream = score_stream(stream, [head], specs, batch_size=3, share=share, use_cache=False)
        loader = prepare_data_loader(DataLoader(scored_stream, batch_size=batch, collate_fn=list), num_processes=world,
                                     process_index=rank, split_batches=split_batches, dispatch_batches=False,
                                     put_on_device=False)
        rows = [row for b in loader for row in b]
        assert all(np.isfinite(row["upo_words_chosen"]) for row in rows)  # every row a rank receives is scored
        mine = {int(row["prompt"].split(":")[0]) for row in rows}
        received.append(mine)
        scored.append(head.scored // 2)
        group = batch * world if not split_batches else batch
        if share is not None:
            assert head.scored // 2 <= len(mine | set(range(group)))  # its own rows and the first group only
        else:
            assert head.scored // 2 == len(mine)  # its own files: everything it reads is its own
    assert set.union(*received) == set(range(23))  # every row is trained on by some rank
    assert sum(scored) < 2 * 23  # not every rank scores every row


def test_accelerate_file_sharding_rule_is_read_from_accelerate_itself():
    """accelerate gives each process its own files from ``n_shards >= num_processes`` in 1.14 and later, ``>`` before
    (1.10-1.13): rank_share asks ``prepare_data_loader`` on a probe stream, so both rules are followed."""
    import accelerate
    from packaging.version import Version

    from trl_upo.scoring.stream import accelerate_shards_files_at

    assert accelerate_shards_files_at(2) == (Version(accelerate.__version__) >= Version("1.14.0"))
    assert accelerate_shards_files_at(3) == accelerate_shards_files_at(2)


def test_a_row_with_non_finite_values_fails_its_batch_loudly():
    """A streamed row this process did not score (its score columns NaN) must never train silently: the collator
    refuses a batch with non-finite UPO values, naming the row."""
    import torch

    from trl_upo.collator import VALUES_COLUMN, UPODataCollator

    from trl_upo.layout import ValueLayout

    collator = UPODataCollator(lambda rows: {"n": len(rows)}, ["words"], ("chosen", "rejected"))
    width = ValueLayout.of(["words"], ("chosen", "rejected")).width
    rows = [{VALUES_COLUMN: [0.5] * width}, {VALUES_COLUMN: [0.5] * (width - 1) + [float("nan")]}]
    assert torch.equal(collator(rows[:1])["upo_values"], torch.full((1, width), 0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="Row 1 of a batch has non-finite UPO values"):
        collator(rows)
