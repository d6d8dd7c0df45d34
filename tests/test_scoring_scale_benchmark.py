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
    one, two = results["timing"]["runs"]
    assert one["responses_per_rank"] == [800] and two["responses_per_rank"] == [400, 400]
    assert results["memory"]["causal_lms_alive_after_scoring"] == 0
    assert results["memory"]["policy_parameters"] > 0
