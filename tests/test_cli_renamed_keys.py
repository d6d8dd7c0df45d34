"""Renamed keys (`trl_upo.cli.common.RENAMED_KEYS`): a recipe key or flag under either name reaches the field the
installed transformers has, without the deprecation warning of the old name; both names at once are an error naming
both; every recipe under recipes/ parses on the installed stack.

The direction the installed stack needs is tested through `trl-upo train`'s real parser; both directions are also
tested on two small parsers that stand for transformers before 5.23 (only the old name) and from 5.23 (the new
name, and the old one as a deprecated alias), so that one environment covers both.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from typing import Any

import pytest
from transformers import HfArgumentParser

from tests.recipe_utils import load_recipe, rel, training_recipes
from tests.test_cli_train import run_main, write_recipe
from trl_upo.cli import train as cli_train
from trl_upo.cli.common import RENAMED_KEYS, UsageError, installed_name, option_names, rename_flags, rename_keys

OLD, NEW = "gradient_checkpointing", "activation_checkpointing"
CPU = ["--use_cpu", "true", "--bf16", "false"]
CPU_RECIPE = dict(use_cpu=True, bf16=False, report_to="none")


def _installed() -> tuple[str, str]:
    """The names `trl-upo train`'s parser takes on this stack: (checkpointing, its kwargs)."""
    names = option_names(cli_train.make_parser())
    return installed_name(NEW, names), installed_name(NEW + "_kwargs", names)


def _parse_recording(argv: list[str]):
    """Parse with `trl-upo train`'s parser; the parsed UPOConfig and the FutureWarnings about checkpointing keys."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, args, *_ = cli_train.parse(argv, prog="trl-upo train")
    futures = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    return args, [m for m in futures if "checkpointing" in m]


# ---------------------------------------------------------------------------------------------------------------
# The table and the name choice
# ---------------------------------------------------------------------------------------------------------------


def test_the_table_has_the_checkpointing_renames():
    assert (NEW, OLD, "transformers 5.23") in RENAMED_KEYS
    assert (NEW + "_kwargs", OLD + "_kwargs", "transformers 5.23") in RENAMED_KEYS
    names = [name for row in RENAMED_KEYS for name in row[:2]]
    assert len(names) == len(set(names)), "a name in two rows"


@pytest.mark.parametrize(
    "names,expected",
    [
        ({OLD}, {OLD: OLD, NEW: OLD}),  # transformers < 5.23: only the old name
        ({OLD, NEW}, {OLD: NEW, NEW: NEW}),  # 5.23+: the new name, the old one a deprecated alias
        ({NEW}, {OLD: NEW, NEW: NEW}),  # v6: only the new name
        (set(), {OLD: OLD, NEW: NEW}),  # neither: left as given, for the unknown-key check
    ],
)
def test_installed_name_prefers_the_new_name_when_there(names, expected):
    assert {key: installed_name(key, names) for key in expected} == expected
    assert installed_name("learning_rate", names) == "learning_rate"


def test_rename_keys_keeps_order_and_values():
    config = {"learning_rate": 1.0, OLD: False, OLD + "_kwargs": {"use_reentrant": False}, "seed": 3}
    renamed = rename_keys(config, {NEW, OLD, NEW + "_kwargs", OLD + "_kwargs"}, "in the recipe r.yaml")
    assert list(renamed.items()) == [
        ("learning_rate", 1.0), (NEW, False), (NEW + "_kwargs", {"use_reentrant": False}), ("seed", 3)
    ]
    assert config[OLD] is False  # the input is not changed


# ---------------------------------------------------------------------------------------------------------------
# Both directions on stand-ins for the two transformers generations
# ---------------------------------------------------------------------------------------------------------------


#: How TrainingArguments declares its optional booleans (`--flag` alone means true).
FLAG = {"nargs": "?", "const": True}


@dataclasses.dataclass
class BeforeRename:
    """Checkpointing fields as transformers < 5.23 has them (DPOConfig's default of True)."""

    gradient_checkpointing: bool = True
    gradient_checkpointing_kwargs: dict[str, Any] | str | None = None


@dataclasses.dataclass
class AfterRename:
    """Checkpointing fields as transformers >= 5.23 has them: the new names, the old ones as deprecated aliases."""

    activation_checkpointing: bool | None = dataclasses.field(default=None, metadata=FLAG)
    activation_checkpointing_kwargs: dict[str, Any] | str | None = None
    gradient_checkpointing: bool | None = dataclasses.field(default=None, metadata=FLAG)
    gradient_checkpointing_kwargs: dict[str, Any] | str | None = None


def _parse_flags(dtype: type, tokens: list[str]):
    parser = HfArgumentParser(dtype, allow_abbrev=False)
    (parsed,) = parser.parse_args_into_dataclasses(rename_flags(tokens, parser))
    return parsed


@pytest.mark.parametrize("flag", [f"--{NEW}", f"--{NEW.replace('_', '-')}", f"--{OLD}"])
@pytest.mark.parametrize("value,expected", [(["false"], False), (["true"], True), ([], True)])
def test_flags_reach_the_old_field_before_the_rename(flag, value, expected):
    assert _parse_flags(BeforeRename, [flag, *value]).gradient_checkpointing is expected


@pytest.mark.parametrize("flag", [f"--{OLD}", f"--{OLD.replace('_', '-')}", f"--{NEW}"])
@pytest.mark.parametrize("value,expected", [(["false"], False), (["true"], True), ([], True)])
def test_flags_reach_the_new_field_after_the_rename(flag, value, expected):
    parsed = _parse_flags(AfterRename, [flag, *value])
    assert parsed.activation_checkpointing is expected and parsed.gradient_checkpointing is None


@pytest.mark.parametrize("dtype,field", [(BeforeRename, OLD), (AfterRename, NEW)])
@pytest.mark.parametrize("flag", [f"--no_{OLD}", f"--no-{NEW.replace('_', '-')}", f"--no_{NEW}"])
def test_negative_flags_under_either_name(dtype, field, flag):
    assert getattr(_parse_flags(dtype, [flag]), field) is False


@pytest.mark.parametrize("dtype,field", [(BeforeRename, OLD + "_kwargs"), (AfterRename, NEW + "_kwargs")])
@pytest.mark.parametrize("key", [NEW + "_kwargs", OLD + "_kwargs"])
def test_kwargs_flag_with_inline_value(dtype, field, key):
    parsed = _parse_flags(dtype, [f"--{key}={{\"use_reentrant\": false}}"])
    assert getattr(parsed, field) == '{"use_reentrant": false}'  # TrainingArguments decodes the JSON itself


def test_other_tokens_are_kept():
    parser = HfArgumentParser(BeforeRename)
    tokens = ["--config", "r.yaml", "--learning_rate", "0.1", "--gradient_checkpointing_extra", "x", "true"]
    assert rename_flags(tokens, parser) == tokens


# ---------------------------------------------------------------------------------------------------------------
# The installed stack, through `trl-upo train`'s parser
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [NEW, OLD])
def test_a_recipe_key_under_either_name_sets_the_installed_field(tmp_path, key):
    checkpointing, kwargs = _installed()
    path = write_recipe(tmp_path / "r.yaml", output_dir=str(tmp_path / "out"), **{
        key: False, key + "_kwargs": {"use_reentrant": False},
    })
    args, futures = _parse_recording(["--config", path, *CPU])
    assert getattr(args, checkpointing) is False  # DPOConfig's default is True: the recipe's value arrived
    assert getattr(args, kwargs) == {"use_reentrant": False}
    assert not futures, f"`{key}` warned: {futures}"


@pytest.mark.parametrize("key", [NEW, OLD])
@pytest.mark.parametrize("form", ["{key} false", "{key}=false", "{dashed} false", "no_{key}"])
def test_a_flag_under_either_name_sets_the_installed_field(tmp_path, key, form):
    checkpointing, kwargs = _installed()
    flag = "--" + form.format(key=key, dashed=key.replace("_", "-"))
    argv = ["--output_dir", str(tmp_path), *CPU, *flag.split(), f"--{key}_kwargs", '{"use_reentrant": false}']
    args, futures = _parse_recording(argv)
    assert getattr(args, checkpointing) is False
    assert getattr(args, kwargs) == {"use_reentrant": False}
    assert not futures, f"{flag} warned: {futures}"


@pytest.mark.parametrize("recipe_key,flag_key", [(OLD, NEW), (NEW, OLD)])
def test_a_flag_under_one_name_overrides_the_recipe_under_the_other(tmp_path, recipe_key, flag_key):
    checkpointing, _ = _installed()
    path = write_recipe(tmp_path / "r.yaml", output_dir=str(tmp_path / "out"), **{recipe_key: True})
    args, futures = _parse_recording(["--config", path, *CPU, f"--{flag_key}", "false"])
    assert getattr(args, checkpointing) is False and not futures


def test_the_parser_alone_renames_too(tmp_path):
    """`UPOParser.parse_args_and_config`, as a script built on `make_parser()` calls it, renames recipe keys and
    flags as `parse` does."""
    checkpointing, kwargs = _installed()
    path = write_recipe(tmp_path / "r.yaml", output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False,
                        **{NEW + "_kwargs": {"use_reentrant": False}})
    parser = cli_train.make_parser()
    _, args, *_ = parser.parse_args_and_config(["--config", path, f"--no-{OLD.replace('_', '-')}"])
    assert getattr(args, checkpointing) is False and getattr(args, kwargs) == {"use_reentrant": False}


# ---------------------------------------------------------------------------------------------------------------
# Both names at once
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", "_kwargs"])
def test_both_names_in_a_recipe_are_an_error_naming_both(tmp_path, capsys, suffix):
    value = {"use_reentrant": False} if suffix else False
    path = write_recipe(tmp_path / "r.yaml", output_dir=str(tmp_path / "out"), **CPU_RECIPE,
                        **{NEW + suffix: value, OLD + suffix: value})
    code, _, err = run_main(["--config", path], capsys)
    assert code == 2
    assert f"`{NEW + suffix}` and `{OLD + suffix}` are both given in the recipe {path}" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [
    [f"--{NEW}", "false", f"--{OLD}", "false"],
    [f"--no_{OLD}", f"--{NEW}=false"],
    [f"--{OLD.replace('_', '-')}", f"--no-{NEW.replace('_', '-')}"],
])
def test_both_names_on_the_command_line_are_an_error_naming_both(tmp_path, capsys, flags):
    code, _, err = run_main(["--output_dir", str(tmp_path / "out"), *CPU, *flags], capsys)
    assert code == 2
    assert f"`{NEW}` and `{OLD}` are both given on the command line" in err and "transformers 5.23" in err


def test_both_names_through_trl_upo_score(tmp_path, capsys):
    """`trl-upo score` reads recipes with the same parser: same renaming, same error."""
    from trl_upo.cli import score as cli_score

    path = write_recipe(tmp_path / "r.yaml", **CPU_RECIPE, **{NEW: True, OLD: True})
    code = cli_score.main(["--config", path], prog="trl-upo score")
    assert code == 2 and f"`{NEW}` and `{OLD}` are both given in the recipe" in capsys.readouterr().err


def test_rename_keys_error_is_a_usage_error():
    with pytest.raises(UsageError, match=rf"`{NEW}_kwargs` and `{OLD}_kwargs` are both given in the recipe x"):
        rename_keys({OLD + "_kwargs": None, NEW + "_kwargs": None}, {OLD}, "in the recipe x")
    with pytest.raises(UsageError, match=rf"`{NEW}` and `{OLD}` are both given on the command line"):
        rename_flags([f"--{OLD}", f"--{NEW}"], argparse.ArgumentParser())


# ---------------------------------------------------------------------------------------------------------------
# Every recipe under recipes/ parses on the installed stack
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [pytest.param(p, id=rel(p)) for p in training_recipes()])
def test_every_recipe_parses_and_its_renamed_keys_land(path):
    """Each renamed key of the recipe reaches the installed field with the recipe's value, without a
    FutureWarning about checkpointing keys."""
    data = load_recipe(path)
    names = option_names(cli_train.make_parser())
    args, futures = _parse_recording(["--config", str(path), "--use_cpu", "true"])
    renamed = {key: value for key, value in data.items() if key in (NEW, OLD, NEW + "_kwargs", OLD + "_kwargs")}
    for key, value in renamed.items():
        assert getattr(args, installed_name(key, names)) == value, key
    if renamed:
        assert not futures, f"{rel(path)}: {futures}"


def test_the_recipes_use_the_newest_names():
    """Our recipes write `activation_checkpointing` (no FutureWarning from transformers >= 5.23, which deprecates
    `gradient_checkpointing`); before 5.23 the parser translates it to `gradient_checkpointing`."""
    names = option_names(cli_train.make_parser())
    used = {key for p in training_recipes() for key in load_recipe(p)}
    assert OLD not in used and OLD + "_kwargs" not in used
    translated = {key for p in training_recipes() for key in load_recipe(p) if installed_name(key, names) != key}
    assert translated == (set() if NEW in names else {NEW, NEW + "_kwargs"}), translated


# Values to give each renamed key, and where the parsed value lands: (dataclass index in parse(), attribute, value).
OTHER_STACK_VALUES = {
    "torch_dtype": (2, "dtype", "float32"),
    "evaluation_strategy": (1, "eval_strategy", "no"),
    "no_cuda": (1, "use_cpu", True),
    "push_to_hub_model_id": (1, "hub_model_id", "me/model"),
    "warmup_ratio": (1, "warmup_steps", 0.1),
    "preprocessing_num_workers": (1, "dataset_num_proc", 1),
    "use_liger_loss": (1, "use_liger_kernel", False),
}


@pytest.mark.parametrize("old", sorted(OTHER_STACK_VALUES))
def test_other_stacks_old_names_reach_the_new_field(tmp_path, old):
    index, new, value = OTHER_STACK_VALUES[old]
    assert any(row[:2] == (new, old) for row in RENAMED_KEYS)
    base = {k: v for k, v in CPU_RECIPE.items() if k != new}
    recipe = write_recipe(tmp_path / "r.yaml", **base, **{old: value}, output_dir=str(tmp_path / "o"))
    parsed = cli_train.parse(["--config", recipe], prog="trl-upo train")
    assert getattr(parsed[index], new) == value


def test_removed_keys_say_what_to_write_instead(tmp_path, capsys):
    from trl_upo.cli.common import REMOVED_KEYS

    recipe = write_recipe(tmp_path / "r.yaml", **CPU_RECIPE, max_prompt_length=128, use_flash_attention_2=True)
    code, _, err = run_main(["--config", recipe], capsys)
    assert code == 2
    assert REMOVED_KEYS["max_prompt_length"] in err and "attn_implementation: flash_attention_2" in err
    assert "did you mean" not in err


def test_docs_list_every_renamed_and_removed_key():
    from pathlib import Path

    from trl_upo.cli.common import REMOVED_KEYS

    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    missing = [row for row in RENAMED_KEYS if f"| `{row[0]}` | `{row[1]}` | {row[2]} |" not in text]
    missing += [key for key in REMOVED_KEYS if f"`{key}`" not in text]
    assert not missing, f"docs/cli.md does not list {missing}"
