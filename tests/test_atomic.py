"""Writes that cannot be left half done or sent through a planted symlink (issue 23, items 5 and 6)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from trl_upo.atomic import atomic_path, atomic_write


def test_a_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    with pytest.raises(OSError):
        with atomic_write(target) as f:
            f.write("half")
            raise OSError(28, "No space left on device")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["summary.json"]


def test_a_symlink_at_the_target_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    link = tmp_path / "out" / "log_history.json"
    link.parent.mkdir()
    link.symlink_to(victim)
    with atomic_write(link) as f:
        f.write("[]")
    assert victim.read_text() == "precious"
    assert not link.is_symlink() and link.read_text() == "[]"


def test_score_output_is_never_truncated(tmp_path, monkeypatch):
    """A disk that fills while `trl-upo score --output` writes train.jsonl: the file is the previous one (or absent),
    never a truncated one that later fails as 'An error occurred while generating the dataset'."""
    from datasets import Dataset

    from trl_upo.cli import score as cli_score

    out = tmp_path / "scored"
    out.mkdir()
    (out / "train.jsonl").write_text('{"prompt": "old"}\n')

    def full_disk(self, path, **kwargs):
        with open(path, "w") as f:
            f.write('{"prompt": "ha')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Dataset, "to_json", full_disk)
    data = Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(OSError):
        cli_score._write(str(out), {"train": data}, [], {})
    assert (out / "train.jsonl").read_text() == '{"prompt": "old"}\n'
    assert sorted(os.listdir(out)) == ["train.jsonl"]


def test_atomic_path_renames_on_success(tmp_path):
    with atomic_path(tmp_path / "x.jsonl") as tmp:
        with open(tmp, "w") as f:
            f.write("ok")
    assert (tmp_path / "x.jsonl").read_text() == "ok"


def test_log_history_symlink_is_not_followed(tmp_path):
    from trl_upo.cli.console import LOG_FILE, CompactConsole

    victim = tmp_path / "victim.json"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / LOG_FILE).symlink_to(victim)
    console = CompactConsole()
    state = SimpleNamespace(is_world_process_zero=True, global_step=3, log_history=[{"loss": 1.0, "step": 3}],
                            max_steps=3)
    console.on_train_end(SimpleNamespace(output_dir=str(out)), state, None)
    assert victim.read_text() == "precious"
    assert json.loads((out / LOG_FILE).read_text())[0]["step"] == 3


def test_summary_counts_the_steps_this_run_trained_after_a_resume(tmp_path, capsys):
    """'Trained 600 steps' after a resume from step 325 that ran 275: now the steps of this run, and the resume."""
    from trl_upo.cli.console import CompactConsole

    console = CompactConsole()
    args = SimpleNamespace(output_dir=str(tmp_path), disable_tqdm=True)
    console.on_train_begin(args, SimpleNamespace(is_world_process_zero=True, global_step=325, max_steps=600), None)
    console.on_train_end(args, SimpleNamespace(is_world_process_zero=True, global_step=600, log_history=[],
                                               max_steps=600), None)
    assert "Trained 275 steps (resumed at step 325, now at 600)" in capsys.readouterr().out
