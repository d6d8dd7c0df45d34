"""A resume never picks an incomplete checkpoint, and a truncated checkpoint file is named (issue 23, items 5, 9)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from trl_upo.checkpoints import MARKER, checkpoint_problem, file_problem, last_complete_checkpoint, mark_complete


def _checkpoint(root, step: int, marked: bool = True):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"w": torch.arange(64, dtype=torch.float32)}, str(path / "model.safetensors"))
    torch.save({"state": {0: torch.ones(32)}}, str(path / "optimizer.pt"))
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if marked:
        mark_complete(str(path))
    return path


def _truncate(path, keep: int = 40):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - keep])


def test_a_complete_checkpoint_has_no_problem(tmp_path):
    path = _checkpoint(tmp_path, 5)
    assert checkpoint_problem(str(path)) is None
    assert json.loads((path / MARKER).read_text())["files"]["model.safetensors"] > 0


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt"])
def test_a_truncated_file_is_named(tmp_path, name):
    path = _checkpoint(tmp_path, 5, marked=False)
    _truncate(path / name)
    problem = checkpoint_problem(str(path))
    assert problem is not None and name in problem
    assert file_problem(str(path / name)) is not None


def test_marker_sizes_catch_any_changed_file(tmp_path):
    path = _checkpoint(tmp_path, 5)
    (path / "trainer_state.json").write_text("{")
    assert "trainer_state.json has 1 bytes" in checkpoint_problem(str(path))


def test_resume_skips_the_half_written_newest_checkpoint(tmp_path, capsys):
    """A disk full at checkpoint-10: its files are there but cut short, and it has no marker; `true` resumes from
    checkpoint-5 and names what it skipped (before: transformers' get_last_checkpoint picked checkpoint-10)."""
    from trl_upo.cli.checks import resolve_resume

    _checkpoint(tmp_path, 5)
    newest = _checkpoint(tmp_path, 10, marked=False)
    assert resolve_resume(True, str(tmp_path)) == str(tmp_path / "checkpoint-5")
    assert f"skipping {newest}" in capsys.readouterr().err
    last, skipped = last_complete_checkpoint(str(tmp_path))
    assert last == str(tmp_path / "checkpoint-5") and skipped[0][0] == str(newest)


def test_resume_from_a_named_truncated_checkpoint_names_the_file(tmp_path):
    from trl_upo.cli.checks import resolve_resume
    from trl_upo.cli.common import UsageError

    path = _checkpoint(tmp_path, 5)
    _truncate(path / "model.safetensors")
    with pytest.raises(UsageError, match="model.safetensors has .* bytes"):
        resolve_resume(str(path), str(tmp_path))


def test_only_incomplete_checkpoints_is_an_error(tmp_path):
    from trl_upo.cli.checks import resolve_resume
    from trl_upo.cli.common import UsageError

    _checkpoint(tmp_path, 3)
    os.remove(tmp_path / "checkpoint-3" / "trainer_state.json")
    with pytest.raises(UsageError, match="every one is incomplete"):
        resolve_resume("true", str(tmp_path))


def test_the_marker_callback_marks_a_saved_checkpoint(tmp_path):
    from types import SimpleNamespace

    from trl_upo.checkpoints import marker_callback

    path = _checkpoint(tmp_path, 7, marked=False)
    marker_callback().on_save(SimpleNamespace(output_dir=str(tmp_path)),
                              SimpleNamespace(is_world_process_zero=True, global_step=7), None)
    assert (path / MARKER).is_file() and checkpoint_problem(str(path)) is None


def test_a_final_save_cut_short_is_named_and_not_marked(tiny_model_path, train_dataset, tmp_path, monkeypatch):
    """Disk full at the final save (issue 23, item 5): before, the weights were lost and output_dir kept config files
    that looked like a model, with a library traceback. Now the error names the directory, its files and the fix,
    and an earlier run's marker there is removed (it would vouch for replaced files); a save that works is marked."""
    import transformers.modeling_utils as modeling_utils

    from tests.helpers import cpu_args
    from trl_upo import UPOTrainer
    from trl_upo.checkpoints import IncompleteSaveError, save_final

    out = tmp_path / "out"
    args = cpu_args(out, max_steps=1, reward_heads=[{"name": "length"}], upo_score_cache_dir=str(tmp_path / "c"))
    trainer = UPOTrainer(model=tiny_model_path, args=args, train_dataset=train_dataset)
    save_final(trainer, str(out))
    assert checkpoint_problem(str(out), require_state=False) is None and (out / MARKER).is_file()

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(modeling_utils, "safe_save_file", full)
    with pytest.raises(IncompleteSaveError, match=r"final save to .*out failed \(No space left on device\).*"
                                                  r"config\.json.*resume_from_checkpoint"):
        save_final(trainer, str(out))
    assert not (out / MARKER).exists()
