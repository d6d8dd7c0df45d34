"""The README's main job, `trl-upo train` with no arguments (the packaged CPU quickstart), the packaged assets it
runs on, and the DPO-vs-UPO comparison `python -m trl_upo.quickstart`."""

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile

import pytest
import torch

from tests.helpers import ROOT
from trl_upo import quickstart
from trl_upo.cli import train as cli_train

RESOURCES = ROOT / "trl_upo" / "resources"
PACKAGED = ["quickstart.yaml", "tiny-llama/config.json", "tiny-llama/model.safetensors", "tiny-llama/tokenizer.json",
            "tiny-llama/tokenizer_config.json", "quickstart-data/train.jsonl", "quickstart-data/test.jsonl"]


def test_packaged_assets_are_present_small_and_load():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for rel in PACKAGED:
        assert (RESOURCES / rel).is_file(), rel
    size = sum(p.stat().st_size for p in RESOURCES.rglob("*") if p.is_file())
    assert size < 3_000_000, f"package data is {size} bytes; keep the embedded default to a few MB"
    model = AutoModelForCausalLM.from_pretrained(RESOURCES / "tiny-llama")
    tok = AutoTokenizer.from_pretrained(RESOURCES / "tiny-llama")
    assert model.config.vocab_size == len(tok) and model.config.num_hidden_layers == 2
    train = [json.loads(line) for line in (RESOURCES / "quickstart-data" / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (RESOURCES / "quickstart-data" / "test.jsonl").read_text().splitlines()]
    assert (len(train), len(test)) == (400, 128)
    # The designer objective ("very") is independent of the labels: as frequent in chosen as in rejected answers.
    rate = {k: sum("very" in r[k].split() for r in train) / len(train) for k in ("chosen", "rejected")}
    assert 0.4 < rate["chosen"] < 0.6 and abs(rate["chosen"] - rate["rejected"]) < 0.05


def test_recipes_quickstart_is_the_packaged_recipe_and_parses():
    assert (ROOT / "recipes" / "quickstart.yaml").read_text() == (RESOURCES / "quickstart.yaml").read_text()
    script, args, model, data, launch = cli_train.parse(["--config", str(ROOT / "recipes" / "quickstart.yaml")])
    assert model.model_name_or_path == str(RESOURCES / "tiny-llama") and script.report_before_after
    assert [s.type for s in args.head_specs] == ["lexicon"] and launch == []


def test_no_argument_quickstart_moves_the_designer_metric(tmp_path):
    """`trl-upo train` with no arguments, in a fresh directory, as the README runs it. Measured here (seed 0, 2
    cores shared with other jobs): 25-40 s; novery mean -0.434 -> -0.027 (the "very" rate of sampled answers
    43% -> 3%), held-out preference accuracy 0.500 -> 1.000."""
    exe = shutil.which("trl-upo", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "trl_upo.cli"]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "TQDM_DISABLE": "1"}
    t0 = time.time()
    proc = subprocess.run([*cmd, "train"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "running the CPU quickstart" in proc.stdout and "novery (mean)" in proc.stdout
    out = tmp_path / "outputs" / "quickstart"
    assert (out / "model.safetensors").is_file() and (out / "upo_state.json").is_file()
    report = json.loads((out / "report.json").read_text())
    before, after = report["before"], report["after"]
    assert after["designer"]["novery"]["mean"] > before["designer"]["novery"]["mean"] + 0.2
    assert after["preference"]["accuracy"] >= 0.9 and before["preference"]["accuracy"] == 0.5
    assert after["designer"]["novery"]["n"] == 128 * 4
    assert seconds < 300


@pytest.mark.slow
def test_dpo_vs_upo_comparison_default_run(tmp_path, capsys):
    """`python -m trl_upo.quickstart`: SFT warm-up, then DPO and UPO from the same start. Measured on this machine
    (seed 0, about 12 s on 2 quiet cores, 28 s on busy ones): very rate SFT 0.461, DPO 0.375, UPO 0.066; on-topic
    rate DPO 0.941, UPO 0.992; preference accuracy 1.000 for both."""
    quickstart.main(["--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "very rate" in out and "UPO (novery head)" in out
    results = json.loads((tmp_path / "results.json").read_text())
    dpo, upo = results["DPO"], results["UPO (novery head)"]
    assert all(r["samples"] == 256 for k, r in results.items() if not k.startswith("_"))
    assert upo["very_rate"] < dpo["very_rate"] - 0.15
    assert upo["preference_accuracy"] >= dpo["preference_accuracy"] - 0.05
    assert upo["on_topic_rate"] >= dpo["on_topic_rate"] - 0.05
    state = json.loads((tmp_path / "upo" / "upo_state.json").read_text())
    assert [h["name"] for h in state["heads"]] == ["novery"]


@pytest.mark.slow
def test_wheel_ships_the_package_data(tmp_path):
    """A non-editable install gets the embedded default: `pip wheel . --no-deps` contains every packaged asset."""
    src = tmp_path / "src"  # a copy: building in place would leave build/ in the repository
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "trl_upo", src / "trl_upo", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), "-q"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("trl_upo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [rel for rel in PACKAGED if f"trl_upo/resources/{rel}" not in names]
    assert not missing, missing


@pytest.mark.slow
def test_build_script_reproduces_the_packaged_assets(tmp_path):
    """scripts/build_quickstart_assets.py reproduces the shipped files: the data, tokenizer and recipe byte for byte,
    the JSON configs but for the ``transformers_version`` that ``save_pretrained`` stamps, and the weights tensor by
    tensor within 1e-4: the SFT warm-up's last bits move with the transformers/accelerate release on CPU
    (transformers 5.25 and accelerate 1.16 give differences up to 4.8e-5 on weights of magnitude up to 1.3)."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    script = ROOT / "scripts" / "build_quickstart_assets.py"
    proc = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rel in PACKAGED[1:]:
        built, shipped = (tmp_path / rel).read_bytes(), (RESOURCES / rel).read_bytes()
        if rel.endswith("config.json"):
            built, shipped = (_without_version(json.loads(x)) for x in (built, shipped))
        if rel.endswith(".safetensors"):
            _assert_same_tensors(tmp_path / rel, RESOURCES / rel)
            continue
        assert built == shipped, rel


def _assert_same_tensors(built_path, shipped_path) -> None:
    from safetensors.torch import load_file

    built, shipped = load_file(str(built_path)), load_file(str(shipped_path))
    assert built.keys() == shipped.keys()
    for name, tensor in shipped.items():
        assert built[name].dtype == tensor.dtype and built[name].shape == tensor.shape, name
        assert torch.allclose(built[name], tensor, rtol=0, atol=1e-4), name


def _without_version(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "transformers_version"}
