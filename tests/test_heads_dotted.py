"""What a recipe can execute (issue 23, item 6): no current directory first on sys.path, a module next to the recipe
imported only explicitly, and a dotted ``type:`` refused from its source before its module runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import ROOT
from trl_upo.heads.dotted import import_dotted, static_problem
from trl_upo.heads.spec import parse_head_specs

_MARKS = "import pathlib\npathlib.Path(__file__).with_suffix('.ran').write_text('ran')\n"


def test_trl_upo_help_does_not_import_a_yaml_py_from_the_current_directory(tmp_path):
    """Before: `trl-upo --help` put the current directory first on sys.path, so a yaml.py there ran."""
    (tmp_path / "yaml.py").write_text(_MARKS + "raise SystemExit('planted yaml ran')\n")
    code = "import sys; from trl_upo.cli import main; sys.argv = ['trl-upo', 'train', '--help']; main()"
    script = tmp_path.parent / f"{tmp_path.name}-entry.py"  # a console script: its own directory on sys.path
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert not (tmp_path / "yaml.ran").exists(), proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_module_in_the_current_directory_is_imported_explicitly(tmp_path, monkeypatch, caplog):
    (tmp_path / "my_rewards_cwd23.py").write_text("def brevity(completions, **kw):\n    return [0.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    with caplog.at_level("WARNING", logger="trl_upo"):
        fn = import_dotted("my_rewards_cwd23:brevity")
    assert fn.__name__ == "brevity"
    assert "from the current directory" in caplog.text and "my_rewards_cwd23.py" in caplog.text
    assert sys.path[-1] == str(tmp_path)  # last: it never shadows an installed module


def test_a_rejected_type_does_not_run_its_module(tmp_path, monkeypatch):
    """`type: planted23:score` names a function, not a head class: refused from the source, the module never ran."""
    (tmp_path / "planted23.py").write_text(_MARKS + "def score(completions, **kw):\n    return [0.0]\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="is a function, not a RewardHead subclass"):
        parse_head_specs([{"name": "p", "type": "planted23:score"}])
    with pytest.raises(ValueError, match="has no attribute 'Missing'"):
        parse_head_specs([{"name": "p", "type": "planted23:Missing"}])
    assert not (tmp_path / "planted23.ran").exists()
    assert "planted23" not in sys.modules


def test_static_check_leaves_dynamic_modules_to_the_import():
    assert static_problem("os.path:join") is None
    assert static_problem("trl_upo.heads.length:LengthHead", expect="class") is None
