"""benchmarks/head_throughput.py runs (short mode) and reports every built-in head; no timing thresholds here (the
CI machine is shared and noisy): the full numbers are produced by hand and recorded in docs/benchmarks.md."""

import json

from tests.helpers import load_script
from trl_upo import registered_heads


def test_head_throughput_short_mode_reports_every_builtin_head(tmp_path, capsys):
    module = load_script("benchmarks/head_throughput.py")
    out = tmp_path / "tp.json"
    assert module.main(["--short", "--json", str(out)]) == 0
    rows = {r["head"]: r for r in json.loads(out.read_text())["rows"]}
    builtin = {n for n, c in registered_heads().items() if c is not None and c.__module__.startswith("trl_upo.")}
    assert builtin <= set(rows)
    for name, row in rows.items():
        if "skipped" not in row:
            assert row["responses"] == 400 and row["responses_per_s"] > 0
    assert "| length |" in capsys.readouterr().out
