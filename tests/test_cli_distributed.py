"""`trl-upo train --num_processes 2 --use_cpu true` on a CPU-only machine starts two training processes (the command
re-launches itself with `accelerate launch --multi_gpu`, since `--cpu --num_processes 2` would start one), and their
losses and UPO metrics match a one-process run with the same global batch."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import assert_same_training_steps
from tests.test_cli_train import CPU, write_data, write_recipe


def _train(args, cwd, timeout=900):
    exe = shutil.which("trl-upo", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "trl_upo.cli"]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TRL_UPO_LAUNCHED", None)
    proc = subprocess.run([*cmd, "train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_two_cpu_processes_match_one_process(tmp_path, tiny_model_path):
    data = write_data(tmp_path / "data", n_train=32, n_test=8)
    fields = {**CPU, "use_cpu": False, "save_strategy": "steps"}  # use_cpu: given on the command line below
    recipe = write_recipe(
        tmp_path / "r.yaml", model_name_or_path=tiny_model_path, dataset_name=str(data), **fields,
        max_steps=3, logging_steps=1, learning_rate=1e-3, seed=42, save_steps=3,
        reward_heads=[{"name": "novery", "type": "lexicon", "params": {"avoid": ["very"], "mode": "presence"}},
                      {"name": "length", "weight": 0.5}],
        upo_score_cache_dir=str(tmp_path / "cache"),
    )
    one, two = tmp_path / "one", tmp_path / "two"
    _train(["--config", recipe, "--output_dir", str(one), "--use_cpu", "true", "--per_device_train_batch_size", "4"],
           tmp_path)
    out = _train(["--config", recipe, "--output_dir", str(two), "--use_cpu", "true", "--per_device_train_batch_size",
                  "2", "--num_processes", "2"], tmp_path)
    assert "accelerate launch --num_processes 2 --multi_gpu" in out
    # The Trainer saves one RNG state per process: two processes really ran.
    assert (one / "checkpoint-3" / "rng_state.pth").is_file()
    assert sorted(p.name for p in (two / "checkpoint-3").glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    a = json.loads((one / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    b = json.loads((two / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    assert_same_training_steps(a, b, steps=3)
    assert (two / "upo_state.json").is_file() and (two / "model.safetensors").is_file()


@pytest.mark.slow
def test_started_by_accelerate_launch_as_a_script_does_not_launch_again(tmp_path, tiny_model_path):
    """`accelerate launch <path of trl_upo/cli/train.py> ...`: the script trains in the launched process; a launch key
    among its arguments is left to the launcher (message) instead of starting a second launcher."""
    from trl_upo.cli import train as cli_train

    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    data = write_data(tmp_path / "data", n_train=8, n_test=4)
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path=tiny_model_path, dataset_name=str(data), **CPU,
                          max_steps=2, per_device_train_batch_size=4, reward_heads=[{"name": "length"}],
                          upo_score_cache_dir=str(tmp_path / "cache"))
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TRL_UPO_LAUNCHED", None)
    proc = subprocess.run(
        [accelerate, "launch", "--num_processes", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         cli_train.__file__, "--config", recipe, "--output_dir", str(tmp_path / "out"), "--num_processes", "2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "already running under a launcher" in proc.stderr and "launching:" not in proc.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_end_distributed_destroys_the_process_group():
    """What every command calls last: the group is gone afterwards (no rank left in its destructor)."""
    import socket

    import torch.distributed as dist

    from trl_upo.cli.common import end_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    assert dist.is_initialized()
    end_distributed()
    assert not dist.is_initialized()
    end_distributed()  # nothing to do: no error


@pytest.mark.slow
@pytest.mark.parametrize("attempt", [1, 2])
def test_two_cpu_processes_on_the_quickstart_exit(tmp_path, attempt):
    """`trl-upo train --num_processes 2 --use_cpu true --max_steps 1` on the quickstart recipe once hung at exit (rank 1
    in ProcessGroupGloo's destructor, 1 run in 2): the command tears the group down and returns (twice, in time)."""
    out = _train(["--num_processes", "2", "--use_cpu", "true", "--max_steps", "1", "--report_before_after", "false",
                  "--output_dir", str(tmp_path / "out")], tmp_path, timeout=300)
    assert "accelerate launch --num_processes 2 --multi_gpu" in out
    assert (tmp_path / "out" / "model.safetensors").is_file()
