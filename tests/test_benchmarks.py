"""The step-overhead benchmark (benchmarks/step_overhead.py) runs, and UPO runs exactly DPO's forwards per step.

CI runs the short mode here; the full numbers are produced by hand (docs/benchmarks.md). No timing thresholds: the
machine is shared and noisy, so a timing is a measurement, not a test. What is asserted: the script works end to end,
the forward counts per step are equal (one policy and one reference forward, through TRL's fused LM head on 1.15+), the
UPO term was computed, and every ratio is reported.
"""

from __future__ import annotations

import json
import math
import sys

import pytest

from tests.helpers import load_script

from trl_upo.compat import FUSED, logprob_path

# One policy and one reference forward per step; on TRL 1.15+ both through TRL's fused LM head.
ONE_FORWARD_EACH = {"policy": 1.0, "ref": 1.0}
if logprob_path() == FUSED:
    ONE_FORWARD_EACH.update({"policy_fused": 1.0, "ref_fused": 1.0})


@pytest.fixture(scope="module")
def bench():
    yield load_script("benchmarks/step_overhead.py")
    sys.modules.pop("step_overhead", None)


def _finite_positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_short_mode_counts_equal_forwards_and_reports_every_ratio(bench, tmp_path, capsys):
    out = tmp_path / "short.json"
    report = bench.main(["--short", "--json", str(out), "--work-dir", str(tmp_path / "work")])
    assert report["failures"] == []
    [case] = report["cases"]
    assert case["case"] == "tiny-full"
    # Equal forwards per step, in the timing process (both trainers) and in the memory runs.
    assert case["forwards_equal"]
    assert case["forwards_per_step"]["dpo"] == case["forwards_per_step"]["upo"] == ONE_FORWARD_EACH
    for run in case["memory"]:
        assert run["forwards_per_step"] == ONE_FORWARD_EACH
    assert case["upo_term_logged"]  # the UPO trainer really computed its auxiliary term
    # The trainers alternated step by step in ABBA order, and every step was timed (12 steps each, the first 2 of
    # each trainer dropped as warm-up).
    [timing] = case["timing"]
    assert timing["order_head"] == ["dpo", "upo", "upo", "dpo", "dpo", "upo", "upo", "dpo"]
    for kind in ("dpo", "upo"):
        rec = timing["kinds"][kind]
        assert rec["steps"] == 12
        assert len(rec["step_times"]) == len(rec["full_step_times"]) == 10
    # The ratios are there (their values are the machine's business).
    for key in ("step", "full_step", "step_cpu"):
        assert _finite_positive(case[key]["ratio"]), key
    assert _finite_positive(case["memory_ratio"])
    assert set(case["peak_memory_mb"]) == {"dpo", "upo"}
    assert set(report["scoring"]) == {"length", "column", "function", "all three"}
    assert all(_finite_positive(r["responses_per_s"]) for r in report["scoring"].values())
    # The Markdown table on stdout and the JSON file.
    printed = capsys.readouterr().out
    assert "| tiny-full |" in printed and "step ratio" in printed and "mem ratio" in printed
    assert json.loads(out.read_text())["cases"][0]["forwards_equal"]


@pytest.mark.slow  # a fresh interpreter imports torch, transformers and TRL again: ~10-15 s
def test_timing_worker_runs_in_a_fresh_process(bench, tmp_path):
    """The full run's path: a timing process launched as a subprocess (tuned allocator env), results read back."""
    from tests.tiny import save_tiny_model

    model = save_tiny_model(str(tmp_path / "model"))
    spec = {
        "case": "tiny-full", "mode": "timing", "model": model, "lora": False, "device": "cpu", "batch_size": 4,
        "response_words": [3, 6], "steps": 3, "warmup": 1, "flip": True, "seed": 0, "threads": 2,
        "tuned_malloc": True, "work_dir": str(tmp_path / "work"),
    }
    (tmp_path / "work").mkdir()
    res = bench.run_worker(spec, "subprocess")
    assert res["order_head"] == ["upo", "dpo", "dpo", "upo", "upo", "dpo"]  # flipped: UPO steps first, then ABBA
    for kind in ("dpo", "upo"):
        assert res["kinds"][kind]["forwards_per_step"] == ONE_FORWARD_EACH
        assert len(res["kinds"][kind]["step_times"]) == 2
    assert res["kinds"]["upo"]["upo_term_logged"]


@pytest.mark.slow  # two launched processes train DPO and UPO for 2 steps each: ~1 min
def test_upo_adds_one_collective_per_step_in_a_two_process_run(tmp_path):
    """benchmarks/collectives.py: in a two-process run UPO's step issues exactly one collective more than DPO's (its
    per-pair values and log-likelihoods travel in one all_gather); before that change it was 24."""
    collectives = load_script("benchmarks/collectives.py")
    try:
        result = collectives.main(["--steps", "2", "--json", str(tmp_path / "c.json")])
    finally:
        sys.modules.pop("collectives", None)
    assert result["dpo"]["total_per_step"] > 0  # the counting sees TRL's own metric gathers
    assert result["upo_minus_dpo_per_step"] == 1.0
