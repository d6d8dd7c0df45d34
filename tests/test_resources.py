"""upo:// names packaged inputs only: never an output, never a path outside trl_upo/resources/ (issue 23, item 1)."""

from __future__ import annotations

import pytest

from trl_upo.resources import (
    PACKAGE_DIR,
    RESOURCES_DIR,
    ResourcePathError,
    check_output_path,
    resolve_flags,
    resolve_inputs,
    resolve_resource,
)


def test_inputs_resolve_inside_resources():
    assert resolve_resource("upo://tiny-llama") == str(RESOURCES_DIR / "tiny-llama")
    assert resolve_resource({"a": ["upo://quickstart-data", "hub/name"]})["a"][1] == "hub/name"


@pytest.mark.parametrize("name", ["upo://..", "upo://../cli", "upo://tiny-llama/../../resources.py", "upo:///etc"])
def test_a_name_that_escapes_resources_is_refused(name):
    if name == "upo:///etc":  # a leading slash is stripped: it names resources/etc, which does not exist
        with pytest.raises(FileNotFoundError):
            resolve_resource(name)
        return
    with pytest.raises(ResourcePathError, match="leaves trl_upo/resources/"):
        resolve_resource(name)


@pytest.mark.parametrize("key", ["output_dir", "logging_dir", "upo_score_cache_dir", "output"])
def test_an_output_never_takes_a_packaged_name(key):
    with pytest.raises(ResourcePathError, match=f"`{key}` is 'upo://tiny-llama'.*never a place to write"):
        resolve_inputs({key: "upo://tiny-llama", "model_name_or_path": "upo://tiny-llama"})
    with pytest.raises(ResourcePathError):
        resolve_flags([f"--{key}", "upo://tiny-llama"])
    with pytest.raises(ResourcePathError):
        resolve_flags([f"--{key}=upo://.."])


def test_an_output_inside_the_package_is_refused(tmp_path):
    with pytest.raises(ResourcePathError, match="inside the installed trl_upo package"):
        check_output_path("output_dir", str(RESOURCES_DIR / "tiny-llama"))
    with pytest.raises(ResourcePathError):
        check_output_path("output_dir", str(PACKAGE_DIR))
    check_output_path("output_dir", str(tmp_path / "run"))  # an ordinary directory passes
    check_output_path("push_to_hub", True)


def test_flags_resolve_inputs_and_keep_outputs():
    out = resolve_flags(["--model_name_or_path", "upo://tiny-llama", "--output_dir", "runs/x", "--max_steps", "1"])
    assert out == ["--model_name_or_path", str(RESOURCES_DIR / "tiny-llama"), "--output_dir", "runs/x",
                   "--max_steps", "1"]


@pytest.mark.parametrize("flags", [["--output_dir", "upo://tiny-llama"], ["--output_dir=upo://.."],
                                   ["--upo_score_cache_dir", "upo://quickstart-data"]])
def test_train_refuses_a_packaged_output_before_anything_loads(tmp_path, monkeypatch, capsys, flags):
    """`trl-upo train --output_dir upo://tiny-llama` used to overwrite the packaged model."""
    from trl_upo.cli import train as cli_train

    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in (RESOURCES_DIR / "tiny-llama").iterdir())
    assert cli_train.main([*flags, "--max_steps", "1"], prog="trl-upo train") == 2
    assert "never a place to write" in capsys.readouterr().err
    assert sorted(p.name for p in (RESOURCES_DIR / "tiny-llama").iterdir()) == before
    assert list(tmp_path.iterdir()) == []


def test_score_refuses_a_packaged_output(tmp_path, monkeypatch, capsys):
    from trl_upo.cli import score as cli_score

    monkeypatch.chdir(tmp_path)
    code = cli_score.main(["--dataset_name", "upo://quickstart-data", "--reward_heads", '[{"name": "length"}]',
                           "--output", "upo://quickstart-data"], prog="trl-upo score")
    assert code == 2
    assert "`output` is 'upo://quickstart-data'" in capsys.readouterr().err


@pytest.mark.parametrize("command, argv", [
    ("eval", ["--model_name_or_path", "upo://tiny-llama", "--dataset_name", "upo://quickstart-data",
              "--output_dir", "upo://tiny-llama"]),
    ("build_pairs", ["rank", "--dataset", "upo://quickstart-data", "--output", "upo://quickstart-data"]),
], ids=["eval", "build_pairs"])
def test_eval_and_build_pairs_refuse_a_packaged_output(command, argv, tmp_path, monkeypatch, capsys):
    import importlib

    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(f"trl_upo.cli.{command}")
    assert module.main(argv, prog=f"trl-upo {command}") == 2
    assert "never a place to write" in capsys.readouterr().err
