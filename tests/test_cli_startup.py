"""``trl-upo --help``, ``--version`` and a mistyped command answer without importing torch, transformers or TRL
(``trl_upo`` loads its public names on first use), so they take a fraction of a second instead of ~8 s."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "trl", "datasets", "peft")


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["tarin"]])
def test_help_version_and_typos_import_no_heavy_library(argv):
    code = (
        "import json, sys\n"
        "from trl_upo.cli import main\n"
        f"rc = main({argv!r})\n"
        f"print(json.dumps({{'rc': rc, 'loaded': [m for m in {list(HEAVY)!r} if m in sys.modules]}}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    assert result["rc"] == (2 if argv == ["tarin"] else 0)


def test_public_names_still_import_and_are_listed():
    import trl_upo

    from trl_upo import UPOConfig, UPOTrainer, registered_heads  # noqa: F401

    assert set(trl_upo.__all__) <= set(dir(trl_upo))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        trl_upo.nope  # noqa: B018
