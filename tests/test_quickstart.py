"""The README's main job: the CPU quickstart (python -m trl_upo.quickstart)."""

import json

import pytest

from trl_upo import quickstart


def test_quickstart_runs_end_to_end_short(tmp_path, capsys):
    quickstart.main(["--output-dir", str(tmp_path), "--steps", "4", "--sft-steps", "4"])
    out = capsys.readouterr().out
    assert "very rate" in out and "UPO (novery head)" in out
    results = json.loads((tmp_path / "results.json").read_text())
    for name in ("start (SFT)", "DPO", "UPO (novery head)"):
        r = results[name]
        assert 0.0 <= r["very_rate"] <= 1.0 and 0.0 <= r["preference_accuracy"] <= 1.0
        assert r["samples"] == 256
    # The UPO run saved its heads and statistics next to the model.
    state = json.loads((tmp_path / "upo" / "upo_state.json").read_text())
    assert [h["name"] for h in state["heads"]] == ["novery"]


@pytest.mark.slow
def test_quickstart_default_upo_beats_dpo_on_designer_metric(tmp_path):
    """Full default run. Measured on this machine (seed 0): very rate SFT 0.461, DPO 0.375, UPO 0.066;
    preference accuracy DPO 1.000, UPO 1.000."""
    results = quickstart.run(str(tmp_path))
    dpo, upo = results["DPO"], results["UPO (novery head)"]
    assert upo["very_rate"] < dpo["very_rate"] - 0.15
    assert upo["preference_accuracy"] >= dpo["preference_accuracy"] - 0.05
    assert upo["on_topic_rate"] >= dpo["on_topic_rate"] - 0.05
