"""UPOConfig: DPOConfig compatibility, defaults, the reward_heads formats (Python, JSON, YAML, command line) and
every validation error's message."""

from __future__ import annotations

import json
import math
import re
import textwrap

import pytest
import trl

from tests.helpers import cpu_args
from trl_upo import HeadSpec, UPOConfig
from trl_upo.quickstart_task import avoid_word_reward


def make(tmp_path, **kwargs) -> UPOConfig:
    return cpu_args(tmp_path / "out", **kwargs)


# ------------------------------------------------------------------------------------------------------------------
# DPOConfig compatibility and defaults
# ------------------------------------------------------------------------------------------------------------------


def test_is_a_dpo_config_and_dpo_fields_work(tmp_path):
    cfg = make(tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[0.8, 0.2], beta=0.3, label_smoothing=0.0)
    assert isinstance(cfg, trl.DPOConfig)
    assert cfg.loss_type == ["sigmoid", "sft"]
    assert cfg.loss_weights == [0.8, 0.2]
    assert cfg.beta == 0.3
    assert cfg.use_cpu is True and cfg.bf16 is False


def test_dpo_validation_still_runs(tmp_path):
    """DPOConfig's own checks are not bypassed: mismatched loss_weights are rejected."""
    with pytest.raises(ValueError, match="loss_weights"):
        make(tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[1.0])


def test_dpo_string_loss_type_is_normalised_to_list(tmp_path):
    assert make(tmp_path, loss_type="ipo").loss_type == ["ipo"]


def test_defaults(tmp_path):
    cfg = UPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False)
    assert cfg.reward_heads == []
    assert cfg.head_specs == []
    assert cfg.upo_alpha == 0.5
    assert cfg.upo_temperature == 0.25
    assert cfg.upo_weight_cap == 100.0
    assert cfg.upo_normalize_weights is True
    assert cfg.upo_baseline == "batch"
    assert cfg.upo_applies_to == "chosen"
    assert cfg.upo_loglik == "mean"
    assert cfg.upo_normalization == "zscore"
    assert cfg.upo_combine == "awr"
    assert cfg.upo_score_batch_size == 256
    assert cfg.upo_score_cache_dir is None
    assert cfg.upo_use_score_cache is True
    # DPO's defaults are untouched
    assert cfg.beta == 0.1
    assert cfg.loss_type == ["sigmoid"]


def test_head_spec_defaults(tmp_path):
    """A head given by name only: type = name, weight 1, normalize None (-> upo_normalization), higher is
    better, no params."""
    cfg = make(tmp_path, reward_heads=[{"name": "length"}])
    (spec,) = cfg.head_specs
    assert spec == HeadSpec(name="length", type="length", weight=1.0, normalize=None, higher_is_better=True, params={})
    assert cfg.reward_heads == [
        {"name": "length", "type": "length", "weight": 1.0, "normalize": None, "higher_is_better": True, "params": {}}
    ]


# ------------------------------------------------------------------------------------------------------------------
# reward_heads formats
# ------------------------------------------------------------------------------------------------------------------

HEADS = [
    {"name": "short", "type": "length", "weight": 0.5, "normalize": "rank", "params": {"unit": "chars"}},
    {
        "name": "avoid",
        "type": "function",
        "weight": 2,
        "higher_is_better": False,
        "params": {"function": "trl_upo.quickstart_task:avoid_word_reward"},
    },
]


def _check_heads(cfg: UPOConfig) -> None:
    short, avoid = cfg.head_specs
    assert (short.name, short.type, short.weight, short.normalize, short.higher_is_better, short.params) == (
        "short",
        "length",
        0.5,
        "rank",
        True,
        {"unit": "chars"},
    )
    assert (avoid.name, avoid.type, avoid.weight, avoid.normalize, avoid.higher_is_better) == (
        "avoid",
        "function",
        2.0,
        None,
        False,
    )
    assert isinstance(avoid.weight, float)
    assert avoid.params == {"function": "trl_upo.quickstart_task:avoid_word_reward"}


def test_reward_heads_list_of_mappings(tmp_path):
    _check_heads(make(tmp_path, reward_heads=HEADS))


def test_reward_heads_json_string(tmp_path):
    _check_heads(make(tmp_path, reward_heads=json.dumps(HEADS)))


def test_reward_heads_single_dict_and_bare_names(tmp_path):
    cfg = make(tmp_path, reward_heads={"name": "length", "params": {"direction": "longer"}})
    assert [(s.name, s.params) for s in cfg.head_specs] == [("length", {"direction": "longer"})]
    cfg = make(tmp_path, reward_heads=["length"])
    assert [s.name for s in cfg.head_specs] == ["length"]


@pytest.mark.parametrize("empty", [None, "", "  ", []])
def test_reward_heads_empty(tmp_path, empty):
    assert make(tmp_path, reward_heads=empty).head_specs == []


def test_type_repeats_under_different_names(tmp_path):
    cfg = make(
        tmp_path,
        reward_heads=[
            {"name": "short_words", "type": "length"},
            {"name": "short_chars", "type": "length", "params": {"unit": "chars"}},
        ],
    )
    assert [(s.name, s.type) for s in cfg.head_specs] == [("short_words", "length"), ("short_chars", "length")]


def test_reward_heads_invalid_json_message(tmp_path):
    with pytest.raises(ValueError, match="JSON") as e:
        make(tmp_path, reward_heads="[{name: length}]")
    assert "list of mappings" in str(e.value)


def test_reward_heads_wrong_container(tmp_path):
    with pytest.raises(ValueError, match="list of mappings"):
        make(tmp_path, reward_heads=42)
    with pytest.raises(ValueError, match=r"reward_heads\[0\] must be a mapping"):
        make(tmp_path, reward_heads=[3.5])


# ------------------------------------------------------------------------------------------------------------------
# reward_heads validation messages
# ------------------------------------------------------------------------------------------------------------------


def test_unknown_head_type_lists_registered_and_suggests(tmp_path):
    with pytest.raises(ValueError) as e:
        make(tmp_path, reward_heads=[{"name": "lenght"}])
    msg = str(e.value)
    assert "Unknown reward head 'lenght'" in msg
    assert "Did you mean 'length'?" in msg
    for name in ("column", "function", "length"):
        assert repr(name) in msg, f"registered head {name!r} not listed in: {msg}"
    assert "dotted path" in msg


def test_unknown_spec_key_suggests_closest(tmp_path):
    with pytest.raises(ValueError) as e:
        make(tmp_path, reward_heads=[{"name": "length", "wieght": 2.0}])
    msg = str(e.value)
    assert "'wieght'" in msg and "did you mean 'weight'?" in msg
    assert "params" in msg  # tells where head parameters go


def test_head_param_at_top_level_points_to_params(tmp_path):
    with pytest.raises(ValueError, match="unknown key.*'unit'.*head parameters go under 'params'"):
        make(tmp_path, reward_heads=[{"name": "length", "unit": "chars"}])


@pytest.mark.parametrize(
    ("weight", "pattern"),
    [
        (-1.0, "weight must be finite and >= 0, got -1.0"),
        (float("nan"), "weight must be finite and >= 0, got nan"),
        (float("inf"), "weight must be finite and >= 0, got inf"),
        ("heavy", "weight must be a number, got 'heavy'"),
        (None, "weight must be a number, got None"),
        ([1.0], r"weight must be a number, got \[1.0\]"),
    ],
)
def test_bad_weight(tmp_path, weight, pattern):
    with pytest.raises(ValueError, match=pattern) as e:
        make(tmp_path, reward_heads=[{"name": "length", "weight": weight}])
    assert "(length)" in str(e.value)  # names the head


def test_zero_weight_is_allowed(tmp_path):
    assert make(tmp_path, reward_heads=[{"name": "length", "weight": 0}]).head_specs[0].weight == 0.0


def test_bad_normalize(tmp_path):
    with pytest.raises(ValueError) as e:
        make(tmp_path, reward_heads=[{"name": "length", "normalize": "minmax"}])
    msg = str(e.value)
    assert "normalize must be one of ['zscore', 'rank', 'none'], got 'minmax'" in msg


def test_bad_higher_is_better(tmp_path):
    with pytest.raises(ValueError, match="higher_is_better must be true or false, got 'no'"):
        make(tmp_path, reward_heads=[{"name": "length", "higher_is_better": "no"}])


def test_duplicate_names(tmp_path):
    with pytest.raises(ValueError) as e:
        make(tmp_path, reward_heads=[{"name": "length"}, {"name": "length", "params": {"unit": "chars"}}])
    msg = str(e.value)
    assert "unique" in msg and "['length']" in msg


def test_duplicate_default_names_from_type(tmp_path):
    """Two function heads without names both default to 'function'."""
    fn = {"type": "function", "params": {"function": "trl_upo.quickstart_task:avoid_word_reward"}}
    with pytest.raises(ValueError, match=r"unique.*\['function'\]"):
        make(tmp_path, reward_heads=[fn, dict(fn)])


def test_invalid_name(tmp_path):
    with pytest.raises(ValueError, match="head name '1st' is not valid"):
        make(tmp_path, reward_heads=[{"name": "1st", "type": "length"}])


def test_dotted_type_needs_a_name(tmp_path):
    with pytest.raises(ValueError, match="Give a 'name'"):
        make(tmp_path, reward_heads=[{"type": "trl_upo.heads.length:LengthHead"}])
    cfg = make(tmp_path, reward_heads=[{"name": "len", "type": "trl_upo.heads.length:LengthHead"}])
    assert cfg.head_specs[0].type == "trl_upo.heads.length:LengthHead"


def test_unknown_param_for_length(tmp_path):
    with pytest.raises(ValueError) as e:
        make(tmp_path, reward_heads=[{"name": "length", "params": {"units": "chars"}}])
    msg = str(e.value)
    assert "Invalid parameters ['units'] for reward head 'length'" in msg
    assert "Valid parameters: ['unit', 'direction', 'target']" in msg


def test_missing_required_param_for_column(tmp_path):
    with pytest.raises(ValueError) as e:
        make(tmp_path, reward_heads=[{"name": "column", "params": {"rejected": "score_rejected"}}])
    msg = str(e.value)
    assert "reward head 'column'" in msg
    assert "needs both 'chosen' and 'rejected'" in msg and "'completion'" in msg  # what to give instead


def test_params_must_be_a_mapping(tmp_path):
    with pytest.raises(ValueError, match="params must be a mapping"):
        make(tmp_path, reward_heads=[{"name": "length", "params": ["chars"]}])


# ------------------------------------------------------------------------------------------------------------------
# UPO scalar and choice fields
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"upo_alpha": -0.1}, "upo_alpha must be >= 0, got -0.1"),
        ({"upo_temperature": 0.0}, "upo_temperature must be > 0, got 0.0"),
        ({"upo_temperature": -1.0}, "upo_temperature must be > 0, got -1.0"),
        ({"upo_weight_cap": 0.0}, "upo_weight_cap must be > 0, got 0.0"),
        ({"upo_weight_cap": -5.0}, "upo_weight_cap must be > 0, got -5.0"),
        ({"upo_alpha": float("nan")}, "upo_alpha must be a finite number, got nan"),
        ({"upo_temperature": float("inf")}, "upo_temperature must be a finite number, got inf"),
        ({"upo_alpha": "1"}, "upo_alpha must be a finite number, got '1'"),
        ({"upo_weight_cap": True}, "upo_weight_cap must be a finite number, got True"),
        ({"upo_score_batch_size": 0}, "upo_score_batch_size must be >= 1, got 0"),
    ],
)
def test_bad_numbers(tmp_path, kwargs, pattern):
    with pytest.raises(ValueError, match=re.escape(pattern)):
        make(tmp_path, **kwargs)


@pytest.mark.parametrize(
    ("field", "value", "choices"),
    [
        ("upo_baseline", "mean", "['batch', 'pair', 'none']"),
        ("upo_applies_to", "rejected", "['chosen', 'both']"),
        ("upo_loglik", "max", "['mean', 'sum']"),
        ("upo_combine", "sum", "['awr', 'margin']"),
        ("upo_normalization", "minmax", "['zscore', 'rank', 'none']"),
    ],
)
def test_bad_choices(tmp_path, field, value, choices):
    with pytest.raises(ValueError) as e:
        make(tmp_path, **{field: value})
    assert str(e.value) == f"{field} must be one of {choices}, got {value!r}."


def test_alpha_zero_and_good_choices_accepted(tmp_path):
    cfg = make(
        tmp_path,
        upo_alpha=0,
        upo_baseline="pair",
        upo_applies_to="both",
        upo_loglik="sum",
        upo_normalization="rank",
        upo_normalize_weights=False,
    )
    assert (cfg.upo_alpha, cfg.upo_baseline, cfg.upo_applies_to, cfg.upo_loglik) == (0, "pair", "both", "sum")


# ------------------------------------------------------------------------------------------------------------------
# margin mode
# ------------------------------------------------------------------------------------------------------------------


def test_margin_mode_with_sigmoid_is_accepted(tmp_path):
    cfg = make(tmp_path, upo_combine="margin", reward_heads=[{"name": "length"}])
    assert cfg.upo_combine == "margin"


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"loss_type": ["ipo"]}, "loss_type=['ipo'] (must be ['sigmoid'])"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]}, "loss_type=['sigmoid', 'sft']"),
        ({"f_divergence_type": "forward_kl"}, "f_divergence_type='forward_kl' (must be 'reverse_kl')"),
        ({"ld_alpha": 0.5}, "ld_alpha=0.5 (must be None)"),
        ({"use_weighting": True}, "use_weighting=True (must be False)"),
    ],
)
def test_margin_mode_rejects_non_sigmoid_settings(tmp_path, kwargs, problem):
    with pytest.raises(ValueError) as e:
        make(tmp_path, upo_combine="margin", **kwargs)
    msg = str(e.value)
    assert "upo_combine='margin'" in msg
    assert problem in msg
    assert "upo_combine='awr'" in msg  # the way out


def test_margin_mode_lists_every_problem(tmp_path):
    with pytest.raises(ValueError) as e:
        make(tmp_path, upo_combine="margin", loss_type=["ipo"], use_weighting=True)
    assert "loss_type=['ipo']" in str(e.value) and "use_weighting=True" in str(e.value)


@pytest.mark.parametrize(
    "kwargs", [{"loss_type": ["ipo"]}, {"f_divergence_type": "forward_kl"}, {"ld_alpha": 0.5}, {"use_weighting": True}]
)
def test_awr_mode_keeps_every_dpo_option(tmp_path, kwargs):
    assert make(tmp_path, reward_heads=[{"name": "length"}], **kwargs).upo_combine == "awr"


# ------------------------------------------------------------------------------------------------------------------
# Serialisation
# ------------------------------------------------------------------------------------------------------------------


def test_to_dict_is_json_serialisable_with_callable_params(tmp_path):
    heads = [{"name": "avoid", "type": "function", "params": {"function": avoid_word_reward}}]
    cfg = make(tmp_path, reward_heads=heads)
    # the live object stays available to the trainer (behind the wrapper that lets any callable be pickled) ...
    assert cfg.head_specs[0].params["function"].fn is avoid_word_reward
    assert cfg.reward_heads[0]["params"]["function"].fn is avoid_word_reward
    assert cfg.reward_heads[0]["params"]["function"](prompts=["p"], completions=[" very"]) == [0.0]
    # ... while the serialised form holds its dotted path
    d = cfg.to_dict()
    text = json.dumps(d)
    assert d["reward_heads"][0]["params"] == {"function": "trl_upo.quickstart_task:avoid_word_reward"}
    assert json.loads(text)["reward_heads"][0]["name"] == "avoid"
    json.loads(cfg.to_json_string())  # what TrainingArguments writes to disk


def test_to_dict_round_trips(tmp_path):
    """The serialised heads build an equivalent config (the dotted path resolves to the same function)."""
    heads = [{"name": "avoid", "type": "function", "params": {"function": avoid_word_reward}}]
    cfg = make(tmp_path, reward_heads=heads)
    again = make(tmp_path, reward_heads=cfg.to_dict()["reward_heads"])
    (spec,) = again.head_specs
    assert (spec.name, spec.type) == ("avoid", "function")
    assert spec.params == {"function": "trl_upo.quickstart_task:avoid_word_reward"}


def test_to_dict_with_lambda_is_still_json(tmp_path):
    fn = lambda completions, **kw: [0.0] * len(completions)  # noqa: E731
    cfg = make(tmp_path, reward_heads=[{"name": "f", "type": "function", "params": {"function": fn}}])
    params = json.loads(json.dumps(cfg.to_dict()))["reward_heads"][0]["params"]
    assert params["function"].startswith("tests.test_config:")
    assert "<lambda>" in params["function"]


# ------------------------------------------------------------------------------------------------------------------
# YAML and command line (TrlParser)
# ------------------------------------------------------------------------------------------------------------------


def test_yaml_config_with_reward_heads(tmp_path):
    path = tmp_path / "upo.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            output_dir: {tmp_path / "out"}
            use_cpu: true
            bf16: false
            beta: 0.2
            loss_type: [sigmoid, sft]
            loss_weights: [1.0, 0.5]
            upo_alpha: 0.5
            upo_temperature: 1.0
            upo_baseline: pair
            reward_heads:
              - name: short
                type: length
                weight: 0.5
                normalize: rank
                params:
                  unit: chars
              - name: avoid
                type: function
                weight: 2
                higher_is_better: false
                params:
                  function: trl_upo.quickstart_task:avoid_word_reward
            """
        )
    )
    (cfg,) = trl.TrlParser((UPOConfig,)).parse_args_and_config(args=["--config", str(path)])
    assert isinstance(cfg, UPOConfig)
    _check_heads(cfg)
    assert cfg.beta == 0.2
    assert cfg.loss_type == ["sigmoid", "sft"] and cfg.loss_weights == [1.0, 0.5]
    assert (cfg.upo_alpha, cfg.upo_temperature, cfg.upo_baseline) == (0.5, 1.0, "pair")
    assert cfg.use_cpu is True and cfg.bf16 is False


def test_yaml_config_with_invalid_head_fails_clearly(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        f"output_dir: {tmp_path / 'out'}\nuse_cpu: true\nbf16: false\nreward_heads:\n  - name: lenght\n"
    )
    with pytest.raises(ValueError, match="Did you mean 'length'"):
        trl.TrlParser((UPOConfig,)).parse_args_and_config(args=["--config", str(path)])


def test_command_line_reward_heads_json(tmp_path):
    args = [
        "--output_dir",
        str(tmp_path / "out"),
        "--use_cpu",
        "true",
        "--bf16",
        "false",
        "--reward_heads",
        json.dumps(HEADS),
        "--upo_alpha",
        "0.5",
        "--upo_baseline",
        "pair",
    ]
    (cfg,) = trl.TrlParser((UPOConfig,)).parse_args_and_config(args=args)
    _check_heads(cfg)
    assert cfg.upo_alpha == 0.5 and cfg.upo_baseline == "pair"
    assert math.isclose(cfg.head_specs[0].weight, 0.5)


def test_command_line_rejects_bad_choice(tmp_path):
    args = ["--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--bf16", "false", "--upo_baseline", "mean"]
    with pytest.raises(SystemExit):
        trl.TrlParser((UPOConfig,)).parse_args_and_config(args=args)


def test_check_upo_values_checks_like_the_config_without_building_one():
    """The axolotl plugin validates UPO keys inside axolotl's own config validation: building a TrainingArguments
    there would set up accelerate's distributed state (a gloo process group under a launcher, before axolotl sets up
    NCCL). ``check_upo_values`` gives the config's messages and leaves that state alone."""
    import subprocess
    import sys

    code = (
        "from accelerate.state import PartialState\n"
        "from trl_upo.config import check_upo_values\n"
        "specs = check_upo_values(reward_heads=[{'name': 'length'}], upo_alpha=0.3, loss_type='sigmoid')\n"
        "assert [s.name for s in specs] == ['length'], specs\n"
        "for bad, msg in [({'upo_alpha': -1}, 'upo_alpha must be >= 0'), ({'upo_baseline': 'x'}, 'upo_baseline must'),\n"
        "                 ({'upo_combine': 'margin', 'loss_type': 'ipo'}, 'loss_type'),\n"
        "                 ({'reward_heads': [{'name': 'lenght'}]}, 'length')]:\n"
        "    try:\n"
        "        check_upo_values(**bad)\n"
        "    except ValueError as e:\n"
        "        assert msg in str(e), (bad, str(e))\n"
        "    else:\n"
        "        raise AssertionError(bad)\n"
        "assert PartialState._shared_state == {}, PartialState._shared_state\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
