"""A stream in two processes (``accelerate launch --multi_gpu --num_processes 2`` of a ``use_cpu=True`` script, gloo):
each rank scores only the rows it trains on (and the first ``batch x world`` rows, which accelerate may repeat to fill
a last batch), with one data file (every rank reads the whole stream).

The training script is this file: ``python tests/test_streaming_distributed.py MODEL OUT_DIR N_SHARDS``, with the
repository root on ``PYTHONPATH``; each rank writes ``OUT_DIR/rank<k>.json``: the rows its head scored during
training, and the rows its collator received (the batches it trained on, and the one accelerate reads ahead).

Until ``trl_upo.core`` passes :func:`~trl_upo.scoring.rank_share` to ``score_stream`` itself (the change asked of the
core for issue 25), the script adds it by wrapping the core's ``score_stream``; once the core does, the script trains
the plain ``UPOTrainer``."""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests.helpers import ROOT, cpu_args, end_distributed

#: Prompts this process's head scored (a module global: the head is a function head, called in this process).
SCORED: list[int] = []


def row_number(prompts, completions, **kwargs):
    """A function head whose score is the row's number (its prompt starts with it), recording the rows it scores."""
    numbers = [int(str(p).split(":", 1)[0]) for p in prompts]
    SCORED.extend(numbers)  # twice per row: the function is called for the chosen, then the rejected responses
    return [float(n) for n in numbers]


def _launch(tmp_path, model_path: str, n_shards: int) -> list[dict]:
    import shutil
    import subprocess

    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    assert accelerate, "accelerate's launcher is not installed"
    out = tmp_path / f"shards{n_shards}"
    out.mkdir()
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", str(ROOT / "tests" / "test_streaming_distributed.py"), model_path,
           str(out), str(n_shards)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{k}.json").read_text()) for k in range(2)]


@pytest.mark.slow
def test_each_rank_scores_only_the_rows_it_trains_on(tiny_model_path, tmp_path):
    """One data file, two processes: every rank reads the whole stream (accelerate's ``IterableDatasetShard``) but
    scores only its own rows. (More files than processes: each rank reads its own files, accelerate's behaviour,
    checked in process by tests/test_scoring_stream.py::test_each_rank_scores_only_the_rows_accelerate_gives_it.)"""
    ranks = _launch(tmp_path, tiny_model_path, n_shards=1)
    first_group = set(range(2 * 2))  # per-device batch 2, two processes
    for rank in ranks:
        assert rank["trained"], rank
        assert set(rank["scored"]) <= set(rank["trained"]) | first_group, rank
    assert not set(ranks[0]["trained"]) & set(ranks[1]["trained"]) - first_group  # each row trained on by one rank
    assert set(ranks[0]["trained"]) | set(ranks[1]["trained"]) == set(range(48))  # one epoch: every row


def train_and_record_rows(model_path: str, out_dir: str, n_shards: int) -> None:
    import tests.test_streaming_distributed as this  # the module the function head imports (this file is __main__)
    from tests.tiny import preference_dataset
    from trl_upo import UPOTrainer
    from trl_upo.collator import UPODataCollator

    rows = preference_dataset(48, seed=0)  # 12 steps of 2 x 2 rows: one epoch
    rows = rows.map(lambda r, i: {"prompt": f"{i}: {r['prompt']}"}, with_indices=True)  # every prompt distinct
    args = cpu_args(os.path.join(out_dir, "run"), per_device_train_batch_size=2, max_steps=12,
                    reward_heads=[{"name": "rows", "type": "function",
                                   "params": {"function": "tests.test_streaming_distributed:row_number"}}],
                    upo_stream_stats_rows=8, upo_use_score_cache=False, upo_score_batch_size=2)
    trainer = UPOTrainer(model=model_path, args=args, train_dataset=rows.to_iterable_dataset(num_shards=n_shards))
    this.SCORED.clear()  # the statistics' rows (scored at construction) are not training rows
    trained: list[int] = []
    collate = trainer.data_collator
    assert isinstance(collate, UPODataCollator)

    def recording(features):
        trained.extend(int(f["upo_rows_chosen"]) for f in features)
        return collate(features)

    trainer.data_collator = recording
    trainer.train()
    rank = trainer.accelerator.process_index
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "scored": this.SCORED, "trained": trained}, f)


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    train_and_record_rows(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    end_distributed()
