"""``trl-upo eval --dataset_streaming true``: the first ``--num_prompts`` rows of a stream, and only those, give the
same ``eval.json`` as the map-style evaluation of the same rows."""

from __future__ import annotations

import json

import pytest
from datasets import IterableDataset, IterableDatasetDict

from trl_upo.cli import main as cli
from trl_upo.cli.common import UsageError
from trl_upo.quickstart import NOVERY_HEAD
from trl_upo.quickstart_task import preference_rows

HEADS = json.dumps([NOVERY_HEAD, {"name": "length", "params": {"direction": "shorter"}}])


def _eval(model: str, data: str, out, *extra: str) -> dict:
    code = cli(["eval", "--model_name_or_path", model, "--ref_model", model, "--dataset_name", data,
                "--dataset_test_split", "train", "--reward_heads", HEADS, "--num_prompts", "3", "--greedy",
                "--max_new_tokens", "4", "--no_plots", "--output_dir", str(out), *extra])
    assert code == 0
    return json.loads((out / "eval.json").read_text())


def test_streamed_eval_equals_map_style_eval_on_the_same_rows(tiny_model_path, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in preference_rows(7, seed=3)))
    mapped = _eval(tiny_model_path, str(data), tmp_path / "map")
    streamed = _eval(tiny_model_path, str(data), tmp_path / "stream", "--dataset_streaming", "true")
    err = capsys.readouterr().err
    assert "Read the first 3 rows of the 'train' stream (--num_prompts); it has more, not read." in err
    assert "streaming" not in mapped["dataset"] and streamed["dataset"].pop("streaming") is True
    assert streamed["dataset"]["rows"] == 3
    assert streamed == mapped  # designer, preference (with every margin), samples: all equal
    assert "(the first ones of the stream)" in (tmp_path / "stream" / "report.md").read_text()


def test_a_stream_is_read_only_as_far_as_the_evaluation_needs(monkeypatch):
    """num_prompts rows, and one more to say whether the stream goes on: never the rest of it."""
    from trl_upo.cli import eval_inputs
    from trl_upo.data import loading

    read = []

    def rows():
        for i in range(1000):
            read.append(i)
            yield {"prompt": f"p{i}", "chosen": "a", "rejected": "b"}

    stream = IterableDataset.from_generator(rows)
    monkeypatch.setattr(loading, "load_splits", lambda *a, **k: IterableDatasetDict({"test": stream}))
    messages = []
    data = eval_inputs.load_rows("anything", "test", config_name=None, num_prompts=5, streaming=True,
                                 log=messages.append)
    assert data["prompt"] == [f"p{i}" for i in range(5)]
    assert len(read) <= 6 + 1  # the generator may run one row ahead of what islice takes
    assert messages and "it has more, not read" in messages[0]


def test_a_sliced_split_cannot_be_streamed(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    from trl_upo.cli.eval_inputs import load_rows

    with pytest.raises(UsageError, match="slices the split, which a stream cannot do"):
        load_rows(str(data), "train[:2]", config_name=None, num_prompts=2, streaming=True)
