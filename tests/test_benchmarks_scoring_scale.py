"""`benchmarks/scoring_scale.py --short` (what docs/benchmarks.md's scoring-at-scale numbers come from): two
processes each score half of the responses, and no causal LM exists when scoring ends in a trainer given the policy
by path."""

import importlib.util

import pytest

from tests.helpers import ROOT


@pytest.mark.slow
def test_scoring_scale_short_run():
    spec = importlib.util.spec_from_file_location("scoring_scale", ROOT / "benchmarks" / "scoring_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--short"])
    for kind, heads in (("model", 1), ("text", 3)):
        one, two = results["timing"][kind]["runs"]
        assert one["responses_per_rank"] == [800 * heads] and two["responses_per_rank"] == [400 * heads] * 2
        assert two["same_rows_check_s"] >= 0 and two["hash_every_row_s"] > 0
    assert results["timing"]["control"]["slowdown"] > 0
    assert results["memory"]["causal_lms_alive_after_scoring"] == 0
    assert results["memory"]["policy_parameters"] > 0
