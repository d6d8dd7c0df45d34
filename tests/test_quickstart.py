"""The README's main job: the CPU quickstart (python -m trl_upo.quickstart), run with its defaults."""

import json

from trl_upo import quickstart


def test_quickstart_default_run_upo_beats_dpo_on_designer_metric(tmp_path, capsys):
    """Measured on this machine (seed 0, about 12 s on 2 quiet cores): very rate SFT 0.461, DPO 0.375, UPO 0.066;
    on-topic rate DPO 0.941, UPO 0.992; preference accuracy 1.000 for both."""
    quickstart.main(["--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "very rate" in out and "UPO (novery head)" in out
    results = json.loads((tmp_path / "results.json").read_text())
    dpo, upo = results["DPO"], results["UPO (novery head)"]
    assert all(r["samples"] == 256 for k, r in results.items() if not k.startswith("_"))
    assert upo["very_rate"] < dpo["very_rate"] - 0.15
    assert upo["preference_accuracy"] >= dpo["preference_accuracy"] - 0.05
    assert upo["on_topic_rate"] >= dpo["on_topic_rate"] - 0.05
    # The UPO run saved its heads and statistics next to the model.
    state = json.loads((tmp_path / "upo" / "upo_state.json").read_text())
    assert [h["name"] for h in state["heads"]] == ["novery"]
