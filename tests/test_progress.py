"""Progress in every long phase under the default console (``console: compact``): the scoring bar (per head, with
its rate and ETA), the training bar and the generation bar of the before/after report; quiet only when the user
asks (``TQDM_DISABLE``). CI exports ``TQDM_DISABLE=1``: these tests set their own environment."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from trl_upo.scoring.shards import progress_enabled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trl_upo(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    exe = shutil.which("trl-upo", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "trl_upo.cli"]
    base = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS",
                                                               "HF_HUB_DISABLE_PROGRESS_BARS")}
    base["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return subprocess.run([*cmd, *args], cwd=tmp_path, env={**base, "HF_HOME": str(tmp_path / "hf"), **env},
                          capture_output=True, text=True, timeout=600)


def test_default_console_shows_scoring_training_and_generation_progress(tmp_path):
    """The quickstart (default console, 2 steps, a small report) with a fresh score cache: stderr has the scoring
    bar of the head with a rate and an ETA, the training bar and the report's generation bar. Measured: 15-20 s
    alone on 2 cores (45-50 s with the cores shared)."""
    proc = _trl_upo(tmp_path, "train", "--max_steps", "2", "--report_num_prompts", "8", "--report_num_samples", "1",
                    "--output_dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stderr.replace("\r", "\n").splitlines()
    scoring = [x for x in lines if x.startswith("Scoring the train dataset with 'novery'")]
    assert scoring, proc.stderr[-4000:]
    # tqdm's meter: 800/800 responses, [elapsed<ETA, rate]
    assert any(re.search(r"800/800 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+k?responses/s\]", x) for x in scoring), scoring
    assert any(x.startswith("training:") and "2/2" in x for x in lines)
    assert any(x.startswith("Generating 1 per prompt") and "8/8" in x for x in lines), proc.stderr[-3000:]


def test_tqdm_disable_quiets_the_bars(tmp_path, monkeypatch):
    """TQDM_DISABLE=1 (what the user asks) turns the scoring and generation bars off; without it they are on."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    import datasets
    from huggingface_hub.utils import enable_progress_bars

    enable_progress_bars()  # an earlier in-process command of the suite may have turned the Hub's bars off
    datasets.enable_progress_bars()
    assert progress_enabled()
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert not progress_enabled()
    monkeypatch.delenv("TQDM_DISABLE")
    datasets.disable_progress_bars()
    try:
        assert not progress_enabled()
    finally:
        datasets.enable_progress_bars()


def test_compact_console_keeps_the_progress_switches_on(monkeypatch):
    """The compact console silences nothing by itself: only ``disable_tqdm`` turns datasets' and transformers'
    bars (and with them scoring's) off."""
    import datasets

    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # tests/conftest.py sets it for the suite

    from trl_upo.cli.train import quiet_progress

    class Args:
        disable_tqdm = False

    from huggingface_hub.utils import enable_progress_bars

    enable_progress_bars()  # an earlier in-process command of the suite may have turned the Hub's bars off
    datasets.enable_progress_bars()
    quiet_progress(Args(), "compact")
    assert progress_enabled()
    Args.disable_tqdm = True
    try:
        quiet_progress(Args(), "compact")
        assert not progress_enabled()
    finally:
        import transformers

        datasets.enable_progress_bars()
        transformers.utils.logging.enable_progress_bar()
