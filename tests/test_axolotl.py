"""The axolotl plugin (``trl_upo.integrations.axolotl``) against the real axolotl from PyPI.

Skipped when axolotl is not installed: CI installs it, pinned, next to the TRL 1.9.0 leg's stack and runs this file
(``.ci/axolotl``). Everything runs on CPU through axolotl's own entry points: ``axolotl.cli.config.load_cfg`` (its
config loading and validation, with the plugin's keys merged into its schema) in this process, and
``axolotl train cfg.yml`` in subprocesses (its dataset preparation, model loading, trainer builder and training loop).

``rl: kto`` (the plugin's ``AxolotlUPOKTOTrainer`` on axolotl's KTO trainer) has three short runs of its own (the
tiny model, 32 unpaired quickstart rows, 4 steps): plain axolotl KTO, the plugin with no heads, the plugin with the
``novery`` head.

The DPO runs share one setup, that of ``tests/test_direction.py`` (200 quickstart pairs, the tiny Llama fine-tuned
by maximum likelihood as the starting model, batch 8, 2 epochs = 50 steps, lr 1e-3, beta 0.1, alpha 1), through
axolotl: plain axolotl DPO (no plugin), the plugin with no heads, the plugin with the quickstart's ``novery`` head.
A second test plugin (``tests/axolotl_plugins/forward_counter.py``) records each run's forwards per step, log history
and classes. QLoRA runs on CPU too (bitsandbytes' CPU backend, on the tiny model). What cannot run here: the 8B examples
(the Hub, a GPU), bf16 and paged 8-bit optimizers (CUDA); ``test_qlora_gpu`` is the GPU check.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

for _var in ("AXOLOTL_DO_NOT_TRACK", "DO_NOT_TRACK"):  # axolotl's telemetry is opt-out
    os.environ[_var] = "1"

HAS_AXOLOTL = importlib.util.find_spec("axolotl") is not None
needs_axolotl = pytest.mark.skipif(
    not HAS_AXOLOTL, reason="axolotl is not installed (CI installs it for this file: bash .ci/axolotl)"
)
PLUGIN = "trl_upo.integrations.axolotl.UPOPlugin"
TRAINER = "trl_upo.integrations.axolotl.AxolotlUPOTrainer"
KTO_TRAINER = "trl_upo.integrations.axolotl.AxolotlUPOKTOTrainer"
COUNTER = "tests.axolotl_plugins.forward_counter.ForwardCounter"
EXAMPLES = sorted((ROOT / "examples" / "axolotl").glob("*.yaml"))
DOC = ROOT / "docs" / "axolotl.md"
NOVERY_HEAD = {"name": "novery", "type": "function",
               "params": {"function": "trl_upo.quickstart_task:avoid_word_reward"}}
STEPS = 50


def _doc_configs() -> list[dict]:
    """The YAML blocks of docs/axolotl.md that are axolotl configs (they name the plugin)."""
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)
    return [yaml.safe_load(b) for b in blocks if PLUGIN in b]


def _tiny_config(model: str, data: str, out: Path, plugins: list[str], **extra) -> dict:
    """An axolotl DPO config for the tiny model on CPU, with test_direction's training settings."""
    return {
        "base_model": model,
        "plugins": plugins,
        "rl": "dpo",
        "rl_beta": 0.1,
        "datasets": [{"path": data, "ds_type": "json", "split": "train", "type": "passthrough"}],
        "dataset_prepared_path": str(out / "prepared"),
        "val_set_size": 0.0,
        "output_dir": str(out),
        "sequence_len": 128,
        "micro_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "num_epochs": 2,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "lr_scheduler": "linear",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "seed": 0,
        "logging_steps": 1,
        "save_strategy": "no",
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "dataloader_num_workers": 0,
        **extra,
    }


def _write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _load_cfg(path: Path):
    from axolotl.cli.config import load_cfg

    return load_cfg(str(path))


def _write_pairs(path: Path, n: int, seed: int) -> str:
    from trl_upo.quickstart_task import preference_rows

    with open(path, "w") as f:
        for row in preference_rows(n, seed=seed, p_word=0.5):
            f.write(json.dumps(row) + "\n")
    return str(path)


# ----------------------------------------------------------------------------------------------------------------
# Without axolotl, and the schema
# ----------------------------------------------------------------------------------------------------------------


def test_the_module_imports_without_axolotl():
    """``import trl_upo.integrations.axolotl`` needs neither axolotl nor TRL; its plugin names say they need axolotl."""
    code = (
        "import sys; sys.modules['axolotl'] = None\n"
        "import trl_upo.integrations.axolotl as m\n"
        "assert 'axolotl' not in sys.modules or sys.modules['axolotl'] is None\n"
        "assert 'trl' not in sys.modules and 'torch' not in sys.modules, 'imported TRL or torch'\n"
        "try:\n    m.UPOPlugin\nexcept ImportError as e:\n    print('ImportError', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ImportError" in out.stdout and "axolotl" in out.stdout


@needs_axolotl
def test_the_upo_keys_are_upoconfig_fields():
    """The schema and the training-args mixin carry every field UPOConfig adds to DPOConfig, with its defaults."""
    import dataclasses

    from trl import DPOConfig

    from trl_upo import UPOConfig
    from trl_upo.integrations.axolotl import UPOArgs, UPOTrainingArgsMixin, upo_keys

    expected = [f.name for f in dataclasses.fields(UPOConfig) if f.name not in DPOConfig.__dataclass_fields__]
    assert upo_keys() == expected and {"reward_heads", "upo_alpha", "upo_temperature"} <= set(expected)
    assert list(UPOArgs.model_fields) == expected
    defaults = {f.name: f.default for f in dataclasses.fields(UPOTrainingArgsMixin)}
    assert defaults == {name: UPOConfig.__dataclass_fields__[name].default for name in expected}


def test_kto_gets_the_kto_trainer_and_upokto_defaults():
    """Without axolotl: `rl: kto` sets the KTO trainer (a DPO trainer_cls is refused), its values are checked as
    UPOKTOConfig checks them, and the keys it leaves unset get UPOKTOConfig's defaults, not UPOConfig's."""
    from trl_upo import UPOConfig, UPOKTOConfig
    from trl_upo.integrations.axolotl import RL_TYPES, check_raw_config, check_values, upo_defaults, upo_keys

    assert RL_TYPES == ("dpo", "ipo", "kto")
    keys = {"rl", "trainer_cls", *upo_keys()}
    assert check_raw_config({"rl": "kto"}, keys)["trainer_cls"] == KTO_TRAINER
    assert check_raw_config({"rl": "dpo"}, keys)["trainer_cls"] == TRAINER
    with pytest.raises(ValueError, match="not a subclass of " + KTO_TRAINER):
        check_raw_config({"rl": "kto", "trainer_cls": TRAINER}, keys)
    kto, dpo = upo_defaults("kto"), upo_defaults("dpo")
    assert set(kto) == set(dpo) == set(upo_keys())
    assert kto["upo_alpha"] == UPOKTOConfig.upo_alpha == 0.25 and kto["upo_applies_to"] == "desirable"
    assert dpo["upo_alpha"] == UPOConfig.upo_alpha and dpo["upo_applies_to"] == UPOConfig.upo_applies_to
    check_values({"rl": "kto", "upo_applies_to": "all"})
    for bad in ({"upo_applies_to": "chosen"}, {"upo_combine": "margin"}, {"upo_baseline": "pair"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            check_values({"rl": "kto", **bad})
    check_values({"rl": "dpo", "upo_baseline": "pair"})  # a pair baseline is DPO's


# ----------------------------------------------------------------------------------------------------------------
# Config validation: axolotl's load_cfg with the plugin
# ----------------------------------------------------------------------------------------------------------------


@needs_axolotl
def test_a_config_with_the_plugin_validates(tiny_model_path, tmp_path):
    config = _tiny_config(tiny_model_path, "unused.jsonl", tmp_path / "out", [PLUGIN],
                          reward_heads=[NOVERY_HEAD], upo_alpha=1.0, upo_baseline="pair")
    cfg = _load_cfg(_write(tmp_path / "cfg.yml", config))
    assert cfg.trainer_cls == TRAINER
    assert cfg.reward_heads == [NOVERY_HEAD]
    assert (cfg.upo_alpha, cfg.upo_baseline) == (1.0, "pair")
    assert cfg.upo_temperature is None  # unset: UPOConfig's default applies


TYPOS = {
    "upo_alpah": (1.0, ["`upo_alpah`", "did you mean `upo_alpha`"]),
    "reward_head": ([{"name": "length"}], ["`reward_head`", "did you mean `reward_heads`"]),
    "upo_tempreature": (0.5, ["`upo_tempreature`", "did you mean `upo_temperature`"]),
}
BAD_VALUES = {
    "nested key": ({"reward_heads": [{"name": "length", "parms": {}}]}, ["'parms'", "did you mean 'params'"]),
    "negative alpha": ({"upo_alpha": -1.0}, ["upo_alpha must be >= 0"]),
    "unknown choice": ({"upo_baseline": "batchh"}, ["upo_baseline must be one of"]),
    "unknown head": ({"reward_heads": [{"name": "lenght"}]}, ["lenght"]),
    "not DPO or KTO": ({"rl": "orpo"}, ["rl: orpo", "rl: dpo", "rl: kto"]),
    "own trainer_cls": ({"trainer_cls": "axolotl.core.trainers.dpo.trainer.AxolotlDPOTrainer"}, ["trainer_cls"]),
    "kto: DPO's trainer": ({"rl": "kto", "remove_unused_columns": False, "trainer_cls": TRAINER},
                           ["is not a subclass of " + KTO_TRAINER]),
    "kto: margin mode": ({"rl": "kto", "remove_unused_columns": False, "upo_combine": "margin"}, ["upo_combine"]),
    "kto: pair choice": ({"rl": "kto", "remove_unused_columns": False, "upo_applies_to": "chosen"},
                         ["upo_applies_to"]),
}


def _expect_failure_before_model_load(tmp_path, extra: dict, fragments: list[str]) -> None:
    """``load_cfg`` rejects the config naming the problem; the model path does not exist, so the error cannot come
    from loading the model (or its config), which axolotl does only after validation."""
    config = _tiny_config(str(tmp_path / "no-such-model"), "unused.jsonl", tmp_path / "out", [PLUGIN], **extra)
    with pytest.raises(Exception) as info:  # pydantic's ValidationError, wrapping the plugin's ValueError
        _load_cfg(_write(tmp_path / "cfg.yml", config))
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "no-such-model" not in message, message
    assert not (tmp_path / "out").exists()


@needs_axolotl
@pytest.mark.parametrize("key", sorted(TYPOS))
def test_a_typo_in_a_upo_key_fails_before_any_model_loads(tmp_path, key):
    value, fragments = TYPOS[key]
    _expect_failure_before_model_load(tmp_path, {key: value}, fragments)


@needs_axolotl
@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_upo_values_fail_before_any_model_loads(tmp_path, case):
    extra, fragments = BAD_VALUES[case]
    _expect_failure_before_model_load(tmp_path, extra, fragments)


@needs_axolotl
def test_axolotl_keys_are_not_touched(tiny_model_path, tmp_path):
    """Keys of axolotl's own schema that are close to UPO keys are not taken for UPO typos."""
    config = _tiny_config(tiny_model_path, "unused.jsonl", tmp_path / "out", [PLUGIN], rl_beta=0.2)
    assert _load_cfg(_write(tmp_path / "cfg.yml", config)).rl_beta == 0.2


@needs_axolotl
@pytest.mark.parametrize("source", [*(p.name for p in EXAMPLES), *(f"docs block {i}" for i in range(3))])
def test_the_documented_configs_validate(source, tmp_path):
    """The examples and the config blocks of docs/axolotl.md pass axolotl's validation with the plugin (the Hub
    model is not loaded: validation comes first); with heads they keep them, without they train plain DPO; the KTO
    example gets the KTO trainer."""
    from axolotl.cli.config import prepare_plugins
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    if source.startswith("docs block"):
        configs = _doc_configs()
        assert len(configs) == 3, "docs/axolotl.md shows three plugin configs (DPO with and without heads, KTO)"
        raw = configs[int(source.split()[-1])]
    else:
        raw = yaml.safe_load((ROOT / "examples" / "axolotl" / source).read_text())
    cfg = DictDefault(dict(raw))
    prepare_plugins(cfg)
    cfg = validate_config(cfg)
    assert cfg.trainer_cls == (KTO_TRAINER if raw["rl"] == "kto" else TRAINER)
    assert cfg.reward_heads == raw.get("reward_heads")


def test_the_docs_list_every_upo_key():
    """Every key the plugin adds (read from UPOConfig) has a row in docs/axolotl.md's table of UPO keys."""
    from trl_upo.integrations.axolotl import upo_keys

    text = DOC.read_text()
    assert [key for key in upo_keys() if f"| `{key}` |" not in text] == []


def test_the_docs_show_the_examples():
    """docs/axolotl.md shows the three example files as they are."""
    text = DOC.read_text()
    assert len(EXAMPLES) == 3
    for path in EXAMPLES:
        assert path.read_text().strip() in text, f"{path.name} differs from its copy in docs/axolotl.md"


# ----------------------------------------------------------------------------------------------------------------
# Training through `axolotl train` (subprocesses, CPU)
# ----------------------------------------------------------------------------------------------------------------


def _axolotl_train(config_path: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """``axolotl train config_path`` in a subprocess, with the repository importable (for the counting plugin)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "axolotl.cli.main", "train", str(config_path)]
    return subprocess.run(command, capture_output=True, text=True, cwd=config_path.parent, env=env, timeout=timeout)


def _train_runs(runs: dict, base: Path, make_config) -> dict:
    """``axolotl train`` for each of ``runs`` (name -> plugins and settings), its config from
    ``make_config(output_dir, plugins, **settings)``; each run's records (see ``ForwardCounter``) and output dir."""
    done_runs = {}
    for name, settings in runs.items():
        out = base / name
        settings = dict(settings)
        if "reward_heads" in settings:
            settings["upo_score_cache_dir"] = str(base / "score-cache")
        config = make_config(out, settings.pop("plugins"), **settings)
        done = _axolotl_train(_write(base / f"{name}.yml", config))
        assert done.returncode == 0, f"axolotl train ({name}) failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
        done_runs[name] = {"out": out, **_records(out)}
    return done_runs


def _records(out: Path) -> dict:
    return {name: json.loads((out / f"{name}.json").read_text()) for name in ("forwards", "log_history", "classes",
                                                                               "args")}


RUNS = {
    "dpo": dict(plugins=[COUNTER]),
    "upo_no_heads": dict(plugins=[PLUGIN, COUNTER]),
    "upo_novery": dict(plugins=[PLUGIN, COUNTER], reward_heads=[NOVERY_HEAD], upo_alpha=1.0),
}


@pytest.fixture(scope="module")
def axolotl_runs(tiny_model_path, tmp_path_factory):
    """The three runs of the module docstring, each a real ``axolotl train``; their records and output dirs."""
    from tests.test_direction import _sft

    base = tmp_path_factory.mktemp("axolotl-runs")
    start = _sft(tiny_model_path, str(base / "start-model"))
    data = _write_pairs(base / "train.jsonl", 200, seed=0)
    runs = _train_runs(RUNS, base, lambda out, plugins, **settings: _tiny_config(start, data, out, plugins, **settings))
    runs["start"] = start
    return runs


def _steps(history: list[dict]) -> list[dict]:
    return [h for h in history if "loss" in h]


def _assert_same_run(plain: dict, upo: dict, steps: int) -> None:
    """The plugin's run without heads logged exactly what axolotl's plain run logged, every value of every one of
    ``steps`` steps, and its training arguments carry the same values (its run directories aside)."""
    assert len(_steps(plain["log_history"])) == len(_steps(upo["log_history"])) == steps
    for a, b in zip(_steps(plain["log_history"]), _steps(upo["log_history"]), strict=True):
        assert a == b
    skip = {"output_dir", "logging_dir", "run_name", "dataset_prepared_path"}
    same = {k: v for k, v in plain["args"].items() if k not in skip}
    assert {k: upo["args"][k] for k in same} == same


@needs_axolotl
@pytest.mark.slow
def test_no_heads_is_axolotl_dpo_step_for_step(axolotl_runs):
    """With the plugin and no heads, every logged value of every step equals plain axolotl DPO's, and the training
    arguments carry the same values (the plugin's AxolotlUPOConfig is axolotl's AxolotlDPOConfig plus UPO)."""
    dpo, upo = axolotl_runs["dpo"], axolotl_runs["upo_no_heads"]
    _assert_same_run(dpo, upo, STEPS)
    mro = upo["classes"]["trainer"]
    assert mro[0] == "AxolotlUPOTrainer" and mro.index("UPOMixin") < mro.index("AxolotlDPOTrainer")
    assert upo["classes"]["args"][:2] == ["AxolotlUPOConfig", "AxolotlDPOConfig"] and "UPOConfig" in upo["classes"][
        "args"]
    assert dpo["classes"]["trainer"][0] == "AxolotlDPOTrainer"


@needs_axolotl
@pytest.mark.slow
def test_a_head_logs_upo_metrics_with_dpo_forwards(axolotl_runs):
    """With the novery head: the UPO metrics are logged at every step, and the policy and the reference model run
    exactly as many forwards per step as in plain axolotl DPO (one each: UPO reads the forward DPO already runs)."""
    dpo, upo = axolotl_runs["dpo"], axolotl_runs["upo_novery"]
    steps = _steps(upo["log_history"])
    assert len(steps) == STEPS
    for step in steps:
        assert {"upo/aux_loss", "upo/novery/chosen", "upo/novery/rejected", "upo/weight/max"} <= set(step), step
    assert upo["forwards"] == dpo["forwards"] == [{"policy": 1, "ref": 1}] * STEPS
    assert upo["args"]["upo_alpha"] == 1.0 and upo["args"]["reward_heads"][0]["name"] == "novery"


@needs_axolotl
@pytest.mark.slow
def test_a_head_moves_the_designer_metric_as_trl_upo_does(axolotl_runs):
    """The designer metric of tests/test_direction.py (very_gap: how much less likely an answer is without "very"
    than with it) after axolotl DPO and after axolotl + UPO: UPO raises it over DPO by more than test_direction's
    margin, as trl-upo's own trainers do on the same data, starting model, settings and seed (test_direction, run by
    every CI leg; measured there: UPO - DPO = 1.13 at seed 0, 0.73-1.39 over seeds 0-7). Measured through axolotl
    at seed 0: 1.49 (the trl-upo run beside it in the same process: 1.13)."""
    import transformers

    from tests.test_direction import FULL_MARGIN, _check_accuracy, measure

    start = axolotl_runs["start"]
    tok = transformers.AutoTokenizer.from_pretrained(start)
    ref = transformers.AutoModelForCausalLM.from_pretrained(start).eval()
    results = {
        kind: measure(transformers.AutoModelForCausalLM.from_pretrained(str(axolotl_runs[run]["out"])), ref, tok)
        for kind, run in (("dpo", "dpo"), ("upo", "upo_novery"))
    }
    print("axolotl:", results)
    assert results["upo"]["very_gap"] - results["dpo"]["very_gap"] > FULL_MARGIN, results
    assert results["upo"]["very_gap_per_token"] > results["dpo"]["very_gap_per_token"], results
    _check_accuracy(results)


@needs_axolotl
@pytest.mark.slow
def test_a_typo_stops_axolotl_train_before_the_model_loads(tmp_path):
    """The real command: `axolotl train` with a mistyped UPO key exits non-zero naming it, and loads no model (the
    base model path does not exist, and axolotl never gets to it)."""
    config = _tiny_config(str(tmp_path / "no-such-model"), "unused.jsonl", tmp_path / "out", [PLUGIN], upo_alpah=1)
    done = _axolotl_train(_write(tmp_path / "cfg.yml", config), timeout=600)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "unknown UPO key `upo_alpah`" in output and "did you mean `upo_alpha`" in output
    assert "no-such-model" not in output.split("unknown UPO key")[0]
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# rl: kto through `axolotl train`
# ----------------------------------------------------------------------------------------------------------------

KTO_STEPS = 4
KTO_RUNS = {
    "kto": dict(plugins=[COUNTER]),
    "upo_kto_no_heads": dict(plugins=[PLUGIN, COUNTER]),
    "upo_kto_novery": dict(plugins=[PLUGIN, COUNTER], reward_heads=[NOVERY_HEAD], upo_alpha=1.0),
}


def _kto_config(model: str, data: str, out: Path, plugins: list[str], **extra) -> dict:
    """An axolotl KTO config for the tiny model on CPU: unpaired rows as they are (no dataset type), 4 steps."""
    config = _tiny_config(model, data, out, plugins, rl="kto", remove_unused_columns=False, micro_batch_size=8,
                          num_epochs=1, max_steps=KTO_STEPS, **extra)
    del config["datasets"][0]["type"]
    return config


@pytest.fixture(scope="module")
def axolotl_kto_runs(tiny_model_path, tmp_path_factory):
    """The three KTO runs of the module docstring, each a real ``axolotl train``; their records."""
    from trl_upo.data import unpair_rows
    from trl_upo.quickstart_task import preference_rows

    base = tmp_path_factory.mktemp("axolotl-kto-runs")
    data = base / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in unpair_rows(preference_rows(16, seed=0, p_word=0.5))))
    return _train_runs(KTO_RUNS, base,
                       lambda out, plugins, **settings: _kto_config(tiny_model_path, str(data), out, plugins, **settings))


@needs_axolotl
@pytest.mark.slow
def test_kto_no_heads_is_axolotl_kto_step_for_step(axolotl_kto_runs):
    """`rl: kto` with the plugin and no heads: every logged value of every step equals plain axolotl KTO's, with the
    same forwards per step; the trainer is UPOKTOMixin on axolotl's KTO trainer, its arguments axolotl's KTO
    arguments plus UPOKTOConfig, with UPOKTOConfig's defaults (upo_alpha 0.25, upo_applies_to desirable)."""
    kto, upo = axolotl_kto_runs["kto"], axolotl_kto_runs["upo_kto_no_heads"]
    _assert_same_run(kto, upo, KTO_STEPS)
    assert upo["forwards"] == kto["forwards"]
    mro = upo["classes"]["trainer"]
    assert mro[0] == "AxolotlUPOKTOTrainer" and mro.index("UPOKTOMixin") < mro.index("AxolotlKTOTrainer")
    assert kto["classes"]["trainer"][0] == "AxolotlKTOTrainer"
    assert upo["classes"]["args"][:2] == ["AxolotlUPOKTOConfig", "AxolotlKTOConfig"]
    assert "UPOKTOConfig" in upo["classes"]["args"]
    assert (upo["args"]["upo_alpha"], upo["args"]["upo_applies_to"]) == (0.25, "desirable")


@needs_axolotl
@pytest.mark.slow
def test_kto_with_a_head_logs_upo_metrics_with_kto_forwards(axolotl_kto_runs):
    """`rl: kto` with the novery head trains through `axolotl train`: the UPO metrics of the head are logged at every
    step, the loss differs from KTO's, and the policy and the reference run exactly KTO's forwards (UPO reads the
    policy forward KTO already runs)."""
    kto, upo = axolotl_kto_runs["kto"], axolotl_kto_runs["upo_kto_novery"]
    steps = _steps(upo["log_history"])
    assert len(steps) == KTO_STEPS
    for step in steps:
        assert "upo/aux_loss" in step and any(k.startswith("upo/novery") for k in step), step
    assert [s["loss"] for s in steps] != [s["loss"] for s in _steps(kto["log_history"])]
    assert upo["forwards"] == kto["forwards"]
    assert upo["args"]["upo_alpha"] == 1.0 and upo["args"]["reward_heads"][0]["name"] == "novery"


def _qlora_run(model: str, tmp_path: Path, **extra) -> dict:
    """``axolotl train`` with QLoRA (4-bit base weights, LoRA on every linear layer) and two heads, 4 steps."""
    data = _write_pairs(tmp_path / "train.jsonl", 32, seed=0)
    heads = [{"name": "length", "params": {"direction": "shorter"}}, NOVERY_HEAD]
    settings = dict(reward_heads=heads, upo_score_cache_dir=str(tmp_path / "cache"), load_in_4bit=True,
                    adapter="qlora", lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_linear=True,
                    num_epochs=1, max_steps=4, micro_batch_size=4, **extra)
    config = _tiny_config(model, data, tmp_path / "out", [PLUGIN, COUNTER], **settings)
    done = _axolotl_train(_write(tmp_path / "cfg.yml", config))
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    records = _records(tmp_path / "out")
    steps = _steps(records["log_history"])
    assert len(steps) == 4
    assert all({"upo/aux_loss", "upo/length/chosen", "upo/novery/chosen"} <= set(h) for h in steps)
    assert "Linear4bit" in records["classes"]["modules"] and "LoraModel" in records["classes"]["modules"]
    # PEFT: the reference is the policy with its adapter disabled, as in axolotl's DPO: two policy forwards a step.
    assert records["forwards"] == [{"policy": 2, "ref": 0}] * 4
    return records


@needs_axolotl
@pytest.mark.slow
def test_qlora_on_cpu(tiny_model_path, tmp_path):
    """The examples' QLoRA settings through `axolotl train` on CPU (bitsandbytes' CPU backend, fp32 compute): the
    base weights load in 4 bits, the UPO metrics of both heads are logged, and each step runs DPO's forwards."""
    _qlora_run(tiny_model_path, tmp_path)


@needs_axolotl
@pytest.mark.gpu
def test_qlora_gpu(tiny_model_path, tmp_path):
    """The same QLoRA run on a CUDA GPU in bf16 with a paged 8-bit optimizer, as the 8B example trains. Command:
    ``python -m pytest -m gpu tests/test_axolotl.py -k qlora_gpu`` (axolotl installed as in .ci/axolotl, with a
    CUDA build of torch)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("the GPU QLoRA run needs a CUDA GPU")
    _qlora_run(tiny_model_path, tmp_path, use_cpu=False, bf16=True, optimizer="paged_adamw_8bit")
