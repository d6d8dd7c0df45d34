"""Helpers shared by the tests (import as ``from tests.helpers import ...``): fixtures are in conftest.py, tiny
models and data in tiny.py, the recipes' tables and stand-ins in recipe_utils.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

#: The repository root.
ROOT = Path(__file__).resolve().parents[1]


def load_script(relative_path: str):
    """Import a script of the repository (``benchmarks/step_overhead.py``, ...) as a module named after its file, and
    register it in ``sys.modules`` (dataclasses and pickling look their module up there)."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def cpu_args(output_dir, **kwargs):
    """UPOConfig (or DPOConfig via ``config_cls``) settings for fast deterministic CPU runs."""
    from trl_upo import UPOConfig

    config_cls = kwargs.pop("config_cls", UPOConfig)
    defaults = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=42,
        dataloader_num_workers=0,
    )
    defaults.update(kwargs)
    return config_cls(**defaults)


def prompt_dataset(n: int, conversational: bool = False):
    """``n`` prompts about the synthetic topics (a string, or one user message), with an ``id`` column."""
    from datasets import Dataset

    from trl_upo.quickstart_task import TOPICS

    topics = list(TOPICS)
    rows = []
    for i in range(n):
        topic = topics[i % len(topics)]
        text = f"tell me about {topic}"
        prompt = [{"role": "user", "content": text}] if conversational else text + " answer"
        rows.append({"prompt": prompt, "id": i})
    return Dataset.from_list(rows)


#: Logged values a run on two processes must reproduce from a one-process run with the same global batch.
DISTRIBUTED_METRICS = ["loss", "upo/aux_loss", "upo/weight/max", "upo/advantage/max", "upo/novery/chosen",
                       "upo/length/rejected_norm", "rewards/margins", "logps/chosen"]


def assert_same_training_steps(history_one: list[dict], history_two: list[dict], steps: int) -> None:
    """The training steps of two ``log_history`` lists (one process, two processes) number ``steps`` and agree on
    every ``DISTRIBUTED_METRICS`` value."""
    import pytest

    steps_a = [h for h in history_one if "loss" in h]
    steps_b = [h for h in history_two if "loss" in h]
    assert len(steps_a) == len(steps_b) == steps
    for ha, hb in zip(steps_a, steps_b):
        for key in DISTRIBUTED_METRICS:
            # Float32 reductions run in a different order across two processes: agreement to 1e-4 relative.
            assert hb[key] == pytest.approx(ha[key], rel=1e-4, abs=1e-6), (key, ha["step"])


def one_and_two_process_histories(script: str, model_path: str, tmp_path) -> tuple[dict, dict]:
    """Run a training ``script`` (``python SCRIPT MODEL OUT_JSON PER_DEVICE_BATCH CACHE_DIR``) once in one process with
    a per-device batch of 4 and once in two CPU processes over gloo (``accelerate launch --multi_gpu``, batch 2): the
    same global batch. Returns the two JSON documents the script wrote (its ``history`` and ``num_processes``)."""
    import json
    import os
    import shutil
    import subprocess

    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    assert accelerate, "accelerate's launcher is not installed"
    cache = str(tmp_path / "cache")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for cmd in (
        [sys.executable, script, model_path, str(one), "4", cache],
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", script, model_path, str(two), "2", cache],
    ):
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(one.read_text()), json.loads(two.read_text())



def train_and_record(trainer, out_json: str) -> None:
    """The end of a launched training script: train, and write the run's logged history and process count to
    ``out_json`` (main process), as :func:`one_and_two_process_histories` reads them."""
    import json

    trainer.train()
    if trainer.accelerator.is_main_process:
        with open(out_json, "w") as f:
            json.dump({"num_processes": trainer.accelerator.num_processes, "history": trainer.state.log_history}, f)


def end_distributed() -> None:
    """End a launched test script as a careful user ends theirs: once the trainer is released (call this after the
    function that held it returned), destroy the process group, so that no rank aborts or hangs in Gloo's destructor
    at exit (seen on CPU: "terminate called without an active exception", 1 run in several)."""
    from trl_upo.cli.common import end_distributed as end

    end()
