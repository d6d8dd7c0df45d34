"""`benchmarks/stream_scale.py` (docs/benchmarks.md's streaming numbers): the synthetic pairs, and one stream and one
map-style measurement of a few rows, in this process (the fast check) and as the script runs them (``--short``: child
processes, slow). No timing thresholds: the machine is shared, a timing is a measurement, not a test."""

from __future__ import annotations

import json
import sys

import pytest

from tests.helpers import load_script


@pytest.fixture(scope="module")
def bench():
    yield load_script("benchmarks/stream_scale.py")
    sys.modules.pop("stream_scale", None)


def test_the_synthetic_pairs_are_seeded_and_60_to_240_words_long(bench):
    rows = list(bench.pairs(20))
    assert rows == list(bench.pairs(20)) and rows != list(bench.pairs(20, seed=1))
    lengths = [len(r[k].split()) for r in rows for k in ("chosen", "rejected")]
    assert min(lengths) >= 60 and max(lengths) <= 240


@pytest.mark.parametrize("mode", ["stream", "map"])
def test_one_measurement_scores_every_row(bench, tmp_path, mode):
    out = tmp_path / f"{mode}.json"
    bench.child(mode, 40, 16, str(out))
    rec = json.loads(out.read_text())
    assert rec["mode"] == mode and rec["rows"] == 40
    assert 0 < rec["first_row_s"] <= rec["total_s"] and rec["pairs_per_s"] > 0
    assert rec["peak_rss_mb"] >= rec["rss_mb_after_imports"] > 0


@pytest.mark.slow
def test_short_run_reports_both_modes(bench):
    results = bench.main(["--short"])
    assert [(r["mode"], r["rows"]) for r in results["runs"]] == [("stream", 300), ("map", 300)]
