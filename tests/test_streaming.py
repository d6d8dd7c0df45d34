"""Streaming data with reward heads (issue 25): UPOTrainer and UPOKTOTrainer take an ``IterableDataset`` wherever
DPOTrainer and KTOTrainer do (TRL's own streaming scenarios: a stream as train set, as eval set, in a dict and in an
``IterableDatasetDict``), score it lazily batch by batch, and normalise with statistics fitted on the stream's first
rows, read from a score summary or from an earlier run's ``upo_state.json``."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, IterableDataset, IterableDatasetDict

from trl_upo import UPOKTOConfig, UPOKTOTrainer, UPOTrainer
from trl_upo.quickstart import NOVERY_HEAD as NOVERY
from trl_upo.state import STATE_FILE

from tests.helpers import cpu_args
from tests.tiny import preference_dataset

HEADS = [NOVERY, {"name": "length", "weight": 0.5}]


def _stream(ds: Dataset) -> IterableDataset:
    return ds.to_iterable_dataset(num_shards=1)


def _unpaired(n: int, seed: int = 0) -> Dataset:
    rows = preference_dataset(n, seed=seed)
    prompts, chosen, rejected = list(rows["prompt"]), list(rows["chosen"]), list(rows["rejected"])
    return Dataset.from_dict({
        "prompt": prompts * 2,
        "completion": chosen + rejected,
        "label": [True] * n + [False] * n,
    })


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _upo_metric(trainer, name: str) -> list[float]:
    return [h[name] for h in trainer.state.log_history if name in h]


def test_stream_as_train_set_trains_with_heads(tiny_model_path, tmp_path, score_cache):
    args = cpu_args(tmp_path, reward_heads=HEADS, upo_alpha=1.0, upo_score_cache_dir=score_cache, max_steps=3)
    trainer = UPOTrainer(model=tiny_model_path, args=args, train_dataset=_stream(preference_dataset(16)))
    trainer.train()
    assert len(_losses(trainer)) == 3
    assert len(_upo_metric(trainer, "upo/aux_loss")) == 3
    assert trainer.upo.statistics_source["source"] == "stream"


def test_stream_and_map_style_train_to_the_same_losses_with_the_same_statistics(tiny_model_path, tmp_path,
                                                                                 score_cache):
    """Statistics fitted on the stream's first N rows, N = the whole split, equal the map-style fit: the losses
    are then the same step for step (the rows come in the same order: sequential sampling on both)."""
    data = preference_dataset(12)
    common = dict(reward_heads=HEADS, upo_alpha=1.0, upo_score_cache_dir=score_cache, max_steps=3,
                  upo_stream_stats_rows=len(data))
    mapped = UPOTrainer(model=tiny_model_path, args=cpu_args(tmp_path / "map", **common), train_dataset=data)
    mapped._get_train_sampler = lambda *a, **k: None  # the stream's order: sequential
    mapped.train()
    streamed = UPOTrainer(model=tiny_model_path, args=cpu_args(tmp_path / "stream", **common),
                          train_dataset=_stream(data))
    streamed.train()
    assert streamed.upo.statistics == mapped.upo.statistics
    assert _losses(streamed) == pytest.approx(_losses(mapped), rel=1e-6)
    assert _upo_metric(streamed, "upo/aux_loss") == pytest.approx(_upo_metric(mapped, "upo/aux_loss"), rel=1e-6)


@pytest.mark.parametrize("form", ["stream", "dict", "iterable_dict"])
def test_stream_as_eval_set(form, tiny_model_path, tmp_path, score_cache):
    evals = _stream(preference_dataset(4, seed=1))
    eval_dataset = {"stream": evals, "dict": {"a": evals, "b": evals},
                    "iterable_dict": IterableDatasetDict({"a": evals})}[form]
    args = cpu_args(tmp_path, reward_heads=HEADS, upo_alpha=1.0, upo_score_cache_dir=score_cache, max_steps=1,
                    eval_strategy="steps", eval_steps=1)
    trainer = UPOTrainer(model=tiny_model_path, args=args, train_dataset=_stream(preference_dataset(8)),
                         eval_dataset=eval_dataset)
    trainer.train()
    evaluated = [k for h in trainer.state.log_history for k in h if k.endswith("upo/aux_loss") and "eval" in k]
    assert evaluated, "the stream eval set logged no UPO metric"


def test_statistics_read_from_an_earlier_runs_state(tiny_model_path, tmp_path, score_cache):
    first = UPOTrainer(model=tiny_model_path, train_dataset=preference_dataset(16),
                       args=cpu_args(tmp_path / "a", reward_heads=HEADS, upo_score_cache_dir=score_cache, max_steps=1))
    first.train()
    first.save_model()
    state_path = tmp_path / "a" / STATE_FILE
    args = cpu_args(tmp_path / "b", reward_heads=HEADS, upo_score_cache_dir=score_cache, max_steps=1,
                    upo_statistics_from=str(state_path))
    second = UPOTrainer(model=tiny_model_path, args=args, train_dataset=_stream(preference_dataset(16, seed=5)))
    assert second.upo.statistics == first.upo.statistics
    second.train()
    second.save_model()
    saved = json.loads((tmp_path / "b" / STATE_FILE).read_text())
    assert saved["statistics_source"]["source"] == "upo_state"


def test_kto_stream_trains_with_heads(tiny_model_path, tmp_path, score_cache):
    args = cpu_args(tmp_path, config_cls=UPOKTOConfig, reward_heads=HEADS, upo_alpha=1.0,
                    upo_score_cache_dir=score_cache, max_steps=2)
    trainer = UPOKTOTrainer(model=tiny_model_path, args=args, train_dataset=_stream(_unpaired(8)))
    trainer.train()
    assert len(_losses(trainer)) == 2
    assert _upo_metric(trainer, "upo/reward_aux/completion")


def test_a_stream_without_a_response_column_fails_before_training(tiny_model_path, tmp_path, score_cache):
    data = preference_dataset(8).remove_columns("rejected")
    args = cpu_args(tmp_path, reward_heads=HEADS, upo_score_cache_dir=score_cache, max_steps=1)
    with pytest.raises(ValueError, match="rejected"):
        UPOTrainer(model=tiny_model_path, args=args, train_dataset=_stream(data))


@pytest.mark.slow
def test_resume_in_a_streaming_run_gives_the_same_steps(tiny_model_path, tmp_path, score_cache):
    data = preference_dataset(24)
    common = dict(reward_heads=HEADS, upo_alpha=1.0, upo_score_cache_dir=score_cache, max_steps=4,
                  save_strategy="steps", save_steps=2, upo_stream_stats_rows=8)
    full = UPOTrainer(model=tiny_model_path, args=cpu_args(tmp_path / "full", **common), train_dataset=_stream(data))
    full.train()
    cut = UPOTrainer(model=tiny_model_path, args=cpu_args(tmp_path / "cut", **common), train_dataset=_stream(data))
    cut.train()
    resumed = UPOTrainer(model=tiny_model_path, args=cpu_args(tmp_path / "cut", **common),
                         train_dataset=_stream(data))
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
    assert resumed.upo.statistics == full.upo.statistics
    assert _losses(resumed)[-2:] == pytest.approx(_losses(full)[-2:], rel=1e-5)


def test_trl_upo_train_with_dataset_streaming(tmp_path, capsys):
    """`trl-upo train --dataset_streaming true` (the quickstart recipe, its data read as a stream): trains, records
    the stream's statistics, and the before/after report takes the first rows of the test stream."""
    from trl_upo.cli import train as cli_train

    out = tmp_path / "run"
    code = cli_train.main(["--dataset_streaming", "true", "--max_steps", "2", "--output_dir", str(out),
                           "--report_num_prompts", "4", "--report_num_samples", "1",
                           "--upo_stream_stats_rows", "16", "--upo_score_cache_dir", str(tmp_path / "cache")],
                          prog="trl-upo train")
    assert code == 0, capsys.readouterr().err
    state = json.loads((out / STATE_FILE).read_text())
    assert state["statistics_source"] == {"source": "stream", "rows": 16, "path": None}
    assert json.loads((out / "report.json").read_text())["after"]


def test_trl_upo_score_a_stream_to_output(tmp_path, capsys):
    """`trl-upo score --dataset_streaming true --output DIR`: every row written as it is read, the summary and the
    statistics a streaming run can adopt; they equal the map-style command's."""
    from trl_upo.cli import score as cli_score

    common = ["--dataset_name", "upo://quickstart-data", "--reward_heads", json.dumps(HEADS),
              "--upo_score_cache_dir", str(tmp_path / "cache")]
    assert cli_score.main([*common, "--output", str(tmp_path / "map")], prog="trl-upo score") == 0
    assert cli_score.main([*common, "--dataset_streaming", "true", "--output", str(tmp_path / "stream")],
                          prog="trl-upo score") == 0
    for name in ("train.jsonl", "test.jsonl"):
        mapped = [json.loads(line) for line in (tmp_path / "map" / name).open()]
        streamed = [json.loads(line) for line in (tmp_path / "stream" / name).open()]
        assert len(streamed) == len(mapped)
        for key in [k for k in mapped[0] if k.startswith("upo_") and not k.startswith("upo__")]:
            assert [r[key] for r in streamed] == pytest.approx([r[key] for r in mapped])
        assert [r["upo__scored_by"] for r in streamed] == [r["upo__scored_by"] for r in mapped]  # reusable alike
    stats = [json.loads((tmp_path / d / "upo_statistics.json").read_text())["statistics"] for d in ("map", "stream")]
    assert stats[0] == stats[1]
