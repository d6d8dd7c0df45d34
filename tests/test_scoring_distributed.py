"""Scoring split across two processes (`accelerate launch --multi_gpu --num_processes 2` running a CPU script: two
processes over gloo): each scores about half of the responses, every rank returns the same complete scores, equal to
one process's; ranks whose caches are on different disks agree on what is cached; an error on one rank stops both.

The script is this file: ``python tests/test_scoring_distributed.py CLASSIFIER OUT_DIR CACHE MODE`` (the repository
root on ``PYTHONPATH``) writes ``rank<r>.json`` per process. ``CACHE`` may contain ``{rank}``.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT

N_ROWS = 40


def _launch(args, tmp_path, processes=2, check=True):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    script = str(ROOT / "tests" / "test_scoring_distributed.py")
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, script, *args] if processes == 1 else [
        accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", script, *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _read(out_dir, rank):
    return json.loads((out_dir / f"rank{rank}.json").read_text())


@pytest.mark.slow
def test_two_processes_score_half_each_and_match_one_process(tmp_path, tiny_classifier_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _launch([tiny_classifier_path, str(one), str(tmp_path / "cache1"), "score"], tmp_path, processes=1)
    _launch([tiny_classifier_path, str(two), str(tmp_path / "cache2-{rank}"), "score"], tmp_path)
    single, r0, r1 = _read(one, 0), _read(two, 0), _read(two, 1)
    assert (single["world"], r0["world"], r1["world"]) == (1, 2, 2)
    for name in ("cls", "words"):
        assert single["responses"][name] == 2 * N_ROWS
        assert r0["responses"][name] == r1["responses"][name] == N_ROWS  # each rank scored half of the responses
        assert r0["scores"][name] == r1["scores"][name]  # every rank returns the same, complete scores
    assert r0["scores"]["words"] == single["scores"]["words"]
    # Other batch compositions: float32 noise at most.
    assert np.allclose(r0["scores"]["cls"], single["scores"]["cls"], rtol=0, atol=1e-5)
    # Rank 0's cache (a disk of its own) holds everything, rank 1's nothing: nobody scores, rank 1 gets it all.
    shutil.rmtree(tmp_path / "cache2-1")
    three = tmp_path / "three"
    _launch([tiny_classifier_path, str(three), str(tmp_path / "cache2-{rank}"), "score"], tmp_path)
    t0, t1 = _read(three, 0), _read(three, 1)
    assert t0["responses"] == t1["responses"] == {"cls": 0, "words": 0}
    assert t1["scores"] == r0["scores"] and t1["status"] == {"cls": "cached", "words": "cached"}


@pytest.mark.slow
def test_an_error_on_one_rank_stops_every_rank(tmp_path, tiny_classifier_path):
    proc = _launch([tiny_classifier_path, str(tmp_path / "out"), str(tmp_path / "c-{rank}"), "fail"], tmp_path,
                   check=False)
    assert proc.returncode != 0
    assert "failed on rank 1" in proc.stderr and "rank 1 refuses row" in proc.stderr


@pytest.mark.slow
def test_ranks_with_different_rows_fail_together_before_scoring(tmp_path, tiny_classifier_path):
    """Shares are put together by row index: ranks given different rows (an unseeded shuffle) would get scores on the
    wrong rows. Every rank raises the same clear error instead, before any scoring."""
    proc = _launch([tiny_classifier_path, str(tmp_path / "out"), str(tmp_path / "c-{rank}"), "differ"], tmp_path,
                   check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("The processes were given different train datasets") >= 2, proc.stderr[-4000:]
    assert not (tmp_path / "out").exists()


def score_and_write(classifier: str, out_dir: str, cache: str, mode: str) -> None:
    from accelerate import PartialState

    from tests.tiny import preference_dataset
    from trl_upo import RewardHead
    from trl_upo.heads import build_head, parse_head_specs
    from trl_upo.scoring import score_dataset

    state = PartialState(cpu=True)

    class FailsOnRankOne(RewardHead):
        def score(self, prompts, completions, *, role, columns, tokenizer=None):
            if state.process_index == 1:
                raise ValueError("rank 1 refuses row")
            return [0.0] * len(completions)

    specs = parse_head_specs([
        {"name": "cls", "type": "classifier", "params": {"model": classifier, "labels": "positive", "device": "cpu"}},
        {"name": "words", "type": "length"},
    ])
    heads = [build_head(s) for s in specs]
    if mode == "fail":
        specs, heads = parse_head_specs([{"name": "bad", "type": "length"}]), [FailsOnRankOne()]
    data = preference_dataset(N_ROWS, seed=3)
    if mode == "differ":  # rank 1's rows in another order
        data = data.shuffle(seed=state.process_index)
    scored, report = score_dataset(data, heads, specs, split="train", batch_size=8, distributed=True,
                                   cache_dir=cache.format(rank=state.process_index))
    scores = {s.name: [list(scored[f"upo_{s.name}_{r}"]) for r in ("chosen", "rejected")] for s in specs}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"rank{state.process_index}.json"), "w") as f:
        json.dump({"world": state.num_processes, "responses": report.responses, "status": report.status,
                   "scores": scores}, f)
    state.destroy_process_group() if hasattr(state, "destroy_process_group") else None


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    score_and_write(*sys.argv[1:5])
