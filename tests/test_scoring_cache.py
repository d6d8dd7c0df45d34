"""The score cache is written while a head scores: a run that dies (an error, a SIGKILL) keeps what it scored and a
rerun scores only the rest; a cache directory that cannot be written costs one warning, never the scores; datasets
that record their scores (``upo__scored_by``) are not scored again, in whatever format they were saved; the progress
bar and the per-head timings."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest
from datasets import Dataset, load_dataset

from tests.helpers import ROOT
from trl_upo import RewardHead
from trl_upo.heads import HeadSpec
from trl_upo.scoring import PROVENANCE_COLUMN, score_dataset
from trl_upo.scoring import cache as cache_module


class WordsHead(RewardHead):
    """Score = number of words; counts the responses it scored. The test settings (not parameters, so not part of
    the fingerprint): ``fail_after`` batches it raises, ``delay`` seconds per call."""

    def __init__(self) -> None:
        self.fail_after, self.delay, self.batches, self.responses = None, 0.0, 0, 0

    def set(self, **kwargs):
        self.__dict__.update(kwargs)
        return self

    def score(self, prompts, completions, *, role, columns, tokenizer=None):
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise RuntimeError("the scoring machine went away")
        time.sleep(self.delay)
        self.batches += 1
        self.responses += len(completions)
        return [float(len(str(c).split())) for c in completions]


def data(n: int = 40) -> Dataset:
    return Dataset.from_dict({
        "prompt": [f"p{i}" for i in range(n)],
        "chosen": [" ".join(["a"] * (i % 7)) for i in range(n)],
        "rejected": [" ".join(["b"] * (i % 5 + 1)) for i in range(n)],
    })


SPECS = [HeadSpec("words", "tests.test_scoring_cache.WordsHead")]


def expected(ds: Dataset) -> list[float]:
    return [float(len(c.split())) for c in ds["chosen"]]


def test_a_failed_run_keeps_its_blocks_and_the_rerun_scores_only_the_rest(score_cache):
    ds = data(40)
    with pytest.raises(RuntimeError, match="went away"):
        score_dataset(ds, [WordsHead().set(fail_after=6)], SPECS, split="train", batch_size=4, cache_dir=score_cache)
    # 6 calls = 3 blocks of 4 rows (chosen and rejected): 12 rows are in the cache.
    rerun = WordsHead()
    scored, report = score_dataset(ds, [rerun], SPECS, split="train", batch_size=4, cache_dir=score_cache)
    assert rerun.responses == 2 * (40 - 12) and report.responses == {"words": 2 * 28}
    assert report.status == {"words": "scored"}
    assert scored["upo_words_chosen"] == expected(ds)
    # Complete now: one .npy, no chunks left; a third run scores nothing.
    assert [n for n in os.listdir(score_cache) if n.endswith(".npy")] and not any(
        n.endswith(".parts") for n in os.listdir(score_cache))
    third = WordsHead()
    assert score_dataset(ds, [third], SPECS, split="train", batch_size=4, cache_dir=score_cache)[1].status == {
        "words": "cached"}
    assert third.responses == 0


KILL_SCRIPT = """
import sys
from datasets import Dataset
from tests.test_scoring_cache import SPECS, WordsHead, data
from trl_upo.scoring import score_dataset
score_dataset(data(200), [WordsHead().set(delay=0.05)], SPECS, split="train", batch_size=5, cache_dir=sys.argv[1])
"""


def test_a_killed_run_keeps_what_it_scored(score_cache, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, score_cache], env=env, cwd=tmp_path)
    deadline = time.time() + 120
    parts = []
    while time.time() < deadline and len(parts) < 4:
        time.sleep(0.1)
        parts = [n for d in (os.listdir(score_cache) if os.path.isdir(score_cache) else [])
                 if d.endswith(".parts") for n in os.listdir(os.path.join(score_cache, d))]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(parts) >= 4, "the subprocess wrote no chunk in time"
    rerun = WordsHead()
    scored, _ = score_dataset(data(200), [rerun], SPECS, split="train", batch_size=5, cache_dir=score_cache)
    assert 0 < rerun.responses <= 2 * (200 - 5 * len(parts))  # only what the killed run had not saved
    assert scored["upo_words_chosen"] == expected(data(200))


@pytest.mark.parametrize("kind", ["file", "disk-full", "read-only"])
def test_an_unwritable_cache_is_one_warning_and_no_lost_work(tmp_path, caplog, monkeypatch, kind):
    if kind == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    target = tmp_path / "cache"
    if kind == "file":
        target.write_text("not a directory")
    elif kind == "disk-full":
        def no_space(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(cache_module.np, "savez", no_space)
        monkeypatch.setattr(cache_module.np, "save", no_space)
    else:
        target.mkdir()
        target.chmod(0o500)
    cache_module._WARNED.clear()
    heads = [WordsHead(), WordsHead()]
    specs = [HeadSpec("a", "tests.test_scoring_cache.WordsHead"), HeadSpec("b", "tests.test_scoring_cache.WordsHead")]
    with caplog.at_level(logging.WARNING, logger="trl_upo.scoring.cache"):
        scored, report = score_dataset(data(30), heads, specs, split="train", batch_size=4, cache_dir=str(target))
    assert scored["upo_a_chosen"] == scored["upo_b_chosen"] == expected(data(30))
    assert report.status == {"a": "scored", "b": "scored"}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot be written" in warnings[0].getMessage()
    assert "upo_score_cache_dir" in warnings[0].getMessage()


def test_writable_dir_names_the_problem(tmp_path):
    (tmp_path / "f").write_text("x")
    assert cache_module.writable_dir(str(tmp_path / "f")) == "it is a file, not a directory"
    assert cache_module.writable_dir(str(tmp_path / "new" / "dir")) is None


class ExplodingHead(RewardHead):
    """A head that must never run (its scores are recorded in the dataset)."""

    def __init__(self, unit: str = "words") -> None:
        self.unit = unit

    def score(self, prompts, completions, *, role, columns, tokenizer=None):
        raise AssertionError("the head ran although the dataset records its scores")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "arrow"])
def test_recorded_scores_are_reused_after_saving_in_any_format(tmp_path, score_cache, fmt):
    ds = data(12)
    specs = [HeadSpec("w", "tests.test_scoring_cache.ExplodingHead")]
    scored, _ = score_dataset(ds, [WordsHead()], [HeadSpec("w", "tests.test_scoring_cache.WordsHead")],
                              split="train", cache_dir=score_cache, record=True)
    assert PROVENANCE_COLUMN in scored.column_names
    # Recorded by another head class: the exploding head must score (and explode).
    with pytest.raises(AssertionError, match="the head ran"):
        score_dataset(scored, [ExplodingHead()], specs, split="train", use_cache=False)
    path = tmp_path / f"scored.{fmt}"
    if fmt == "jsonl":
        scored.to_json(str(path), lines=True)
        loaded = load_dataset("json", data_files=str(path), split="train")
    elif fmt == "parquet":
        scored.to_parquet(str(path))
        loaded = load_dataset("parquet", data_files=str(path), split="train")
    else:
        scored.save_to_disk(str(path))
        loaded = Dataset.load_from_disk(str(path))
    # The same head (same class and parameters): its columns are taken as they are, nothing runs.
    again, report = score_dataset(loaded, [WordsHead()], [HeadSpec("w", "tests.test_scoring_cache.WordsHead")],
                                  split="train", use_cache=False)
    assert report.status == {"w": "recorded"} and report.responses == {"w": 0}
    assert again["upo_w_chosen"] == expected(ds)


def test_recorded_scores_of_an_edited_row_are_not_reused(score_cache):
    spec = [HeadSpec("w", "tests.test_scoring_cache.WordsHead")]
    scored, _ = score_dataset(data(6), [WordsHead()], spec, split="train", use_cache=False, record=True)
    edited = scored.map(lambda r, i: {"chosen": r["chosen"] + " extra words" if i == 2 else r["chosen"]},
                        with_indices=True)
    head = WordsHead()
    again, report = score_dataset(edited, [head], spec, split="train", use_cache=False)
    assert report.status == {"w": "scored"} and head.responses == 12
    assert again["upo_w_chosen"][2] == scored["upo_w_chosen"][2] + 2


def test_progress_bar_counts_responses_and_respects_tqdm_disable(score_cache, monkeypatch, capsys):
    import datasets
    import huggingface_hub.utils as hub_utils

    import trl_upo.scoring.shards as shards

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    # An earlier test in the same process (the CLI run in-process) may have turned HF's progress bars off.
    was_datasets, was_hub = datasets.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled()
    datasets.enable_progress_bars()
    hub_utils.enable_progress_bars()
    try:
        _check_progress_bar(shards, monkeypatch, capsys)
    finally:
        if not was_datasets:
            datasets.disable_progress_bars()
        if not was_hub:
            hub_utils.disable_progress_bars()


def _check_progress_bar(shards, monkeypatch, capsys):
    assert shards.progress_enabled()
    score_dataset(data(10), [WordsHead()], SPECS, split="train", batch_size=4, use_cache=False)
    err = capsys.readouterr().err
    assert "Scoring the train dataset with 'words'" in err and "20.0/20.0" in err and "responses/s" in err
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert not shards.progress_enabled()
    score_dataset(data(10), [WordsHead()], SPECS, split="train", batch_size=4, use_cache=False)
    assert "Scoring" not in capsys.readouterr().err


def test_each_head_logs_its_time(score_cache, caplog):
    with caplog.at_level(logging.INFO, logger="trl_upo.scoring"):
        _, report = score_dataset(data(10), [WordsHead()], SPECS, split="train", cache_dir=score_cache)
    assert report.seconds["words"] >= 0 and report.responses["words"] == 20
    assert "Reward head 'words' scored 20 responses of the train dataset in" in caplog.text
    assert "responses/s" in caplog.text
