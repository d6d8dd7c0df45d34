"""Collectives per training step in a two-process run: UPO's against DPO's.

    python benchmarks/collectives.py [--steps 4] [--json out.json]

Starts ``accelerate launch --multi_gpu --num_processes 2`` on this script (two CPU processes over gloo), which trains
the quickstart's tiny model for ``--steps`` steps, once with ``trl.DPOTrainer`` and once with ``UPOTrainer`` (two
reward heads, ``upo_alpha`` 1), and counts every call of the ``torch.distributed`` collectives (``all_gather``,
``all_gather_into_tensor``, ``all_reduce``, ``broadcast``, ``reduce``, ...) issued from Python during the training
steps. DDP's own gradient all-reduce runs in C++ and is the same for both. UPO's collectives per step are the
difference. To measure another checkout of trl-upo (e.g. before a change), put it first on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter

COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce", "gather",
               "all_gather_object", "broadcast_object_list", "reduce_scatter_tensor", "all_to_all_single")


def _count_collectives(counter: Counter) -> None:
    import torch.distributed as dist

    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def counted(*args, _fn=fn, _name=name, **kwargs):
            if counter["_armed"]:
                counter[_name] += 1
            return _fn(*args, **kwargs)

        setattr(dist, name, counted)


def worker(model_path: str, out_json: str, steps: int) -> None:
    """One process of the launched run: DPO then UPO, collectives counted during ``train()`` only."""
    import torch
    import transformers
    import trl

    from datasets import load_dataset

    import trl_upo
    from trl_upo import UPOConfig, UPOTrainer

    torch.set_num_threads(1)
    counter: Counter = Counter()
    _count_collectives(counter)
    data_file = os.path.join(os.path.dirname(trl_upo.__file__), "resources", "quickstart-data", "train.jsonl")
    data = load_dataset("json", data_files=data_file, split="train").select(range(64))
    common = dict(use_cpu=True, bf16=False, gradient_checkpointing=False, per_device_train_batch_size=4,
                  max_steps=steps, logging_steps=1, report_to=[], save_strategy="no", seed=0, learning_rate=1e-3)
    heads = [{"name": "novery", "type": "lexicon", "params": {"avoid": ["very"], "mode": "presence"}},
             {"name": "length", "weight": 0.5}]
    result = {}
    for kind in ("dpo", "upo"):
        transformers.set_seed(0)
        out = os.path.join(os.path.dirname(out_json), kind)
        if kind == "dpo":
            trainer = trl.DPOTrainer(model_path, args=trl.DPOConfig(out, **common), train_dataset=data)
        else:
            args = UPOConfig(out, **common, reward_heads=heads, upo_alpha=1.0,
                             upo_score_cache_dir=os.path.join(os.path.dirname(out_json), "cache"))
            trainer = UPOTrainer(model_path, args=args, train_dataset=data)
        counter.clear()
        counter["_armed"] = 1
        trainer.train()
        counter["_armed"] = 0
        calls = {k: v for k, v in counter.items() if not k.startswith("_")}
        result[kind] = {"per_step": {k: v / steps for k, v in sorted(calls.items())},
                        "total_per_step": sum(calls.values()) / steps}
    if int(os.environ.get("RANK", "0")) == 0:
        import trl_upo

        result["trl"] = trl.__version__
        result["trl_upo_path"] = os.path.dirname(trl_upo.__file__)
        result["upo_minus_dpo_per_step"] = result["upo"]["total_per_step"] - result["dpo"]["total_per_step"]
        with open(out_json, "w") as f:
            json.dump(result, f, indent=2)
    del trainer  # then end the process group deliberately: no rank left in Gloo's destructor at exit
    from trl_upo.cli.common import end_distributed

    end_distributed()


def main(argv: list[str] | None = None) -> dict:
    """Launch the two-process run and print the collectives per step."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", default=None, help="write the result here too")
    args = parser.parse_args(argv)
    import trl_upo

    work = tempfile.mkdtemp(prefix="upo-collectives-")
    try:
        model = os.path.join(os.path.dirname(trl_upo.__file__), "resources", "tiny-llama")  # the packaged tiny model
        out = os.path.join(work, "result.json")
        accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
        cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", os.path.abspath(__file__), "--worker", model, out,
               str(args.steps)]
        env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-4000:])
        with open(out) as f:
            result = json.load(f)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
