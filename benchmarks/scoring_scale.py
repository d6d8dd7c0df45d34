"""Scoring at scale: the wall time of scoring 20,000+ responses with a model head in 1 and in 2 processes, and the
peak memory of a trainer built with the policy passed by name (the policy must not be loaded while heads score).

    python benchmarks/scoring_scale.py [--pairs 10000] [--processes 1 2] [--heads model text] [--json out.json]
    python benchmarks/scoring_scale.py --memory [--json out.json]
    python benchmarks/scoring_scale.py --short        # the CI check: 400 pairs, both parts

Run it from a checkout of the repository: the models are the tests' tiny ones (``tests/tiny.py``), built and saved
locally (no Hub). Timing: every run is ``accelerate launch --multi_gpu --num_processes N`` of this script on the CPU
(gloo), one torch thread per process, score cache off; the time is the slowest rank's ``score_dataset`` call (every
rank waits at a barrier before it starts), without process start-up or model loading (the head loads its model
before the clock starts); ``--repeats`` rounds alternate the process counts and the best time of each is reported,
with all of them, and with a control of the machine (two pure-Python loops at once against one: 1.0 when two cores
are free). Memory: a child process builds ``UPOTrainer(model=<policy path>, ...)`` with a
``classifier`` head and records ``ru_maxrss`` when scoring ends and after the trainer is built, and whether any
causal LM existed when scoring ended.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # first: tests/tiny.py (another installed package may also be named `tests`)
    sys.path.insert(0, str(REPO))

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}


#: The text heads of ``--heads text`` (each scores every response).
TEXT_HEADS = [
    {"name": "len", "type": "length"},
    {"name": "lex", "type": "lexicon", "params": {"encourage": ["clear", "good"], "avoid": ["very"]}},
    {"name": "read", "type": "readability"},
]


def long_pairs(n: int):
    """``n`` pairs of 60-240-word responses from a 2,000-word vocabulary (``benchmarks/stream_scale.py``'s rows), as a
    map-style dataset: text heads' work then grows with the responses, as on real data. (The tests' tiny pairs are a
    few words from a few dozen: per-process fixed costs, such as textstat's per-word caches filling and reading the
    Arrow columns, weigh about as much as scoring them.)"""
    import importlib.util

    from datasets import Dataset

    spec = importlib.util.spec_from_file_location("stream_scale", Path(__file__).with_name("stream_scale.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Dataset.from_list(list(module.pairs(n)))


def worker(classifier: str, pairs: int, out: str, kind: str = "model") -> None:
    """One rank: score ``pairs`` pairs with a classifier head (``kind`` model) or the three text heads (text),
    distributed; write this rank's timing, and the time of the same-rows check against hashing every row."""
    import torch
    from accelerate import PartialState

    from tests.tiny import preference_dataset
    from trl_upo.heads import build_head, parse_head_specs
    from trl_upo.scoring import row_digests, score_dataset
    from trl_upo.scoring.rows import same_rows_key

    torch.set_num_threads(1)
    state = PartialState(cpu=True)
    params = {"model": classifier, "labels": "positive", "device": "cpu", "batch_size": 64}
    specs = parse_head_specs(TEXT_HEADS if kind.startswith("text") else
                             [{"name": "cls", "type": "classifier", "params": params}])
    heads = [build_head(s) for s in specs]
    for head in heads:  # models loaded, lazy resources (the readability head's word lists) read, before the clock
        head.load()
        head.score(["p"], ["Warm up."], role="chosen", columns={})
    data = preference_dataset(pairs, seed=0) if kind != "text" else long_pairs(pairs)
    state.wait_for_everyone()
    start, cpu_start = time.perf_counter(), time.process_time()
    _, report = score_dataset(data, heads, specs, split="train", batch_size=256, use_cache=False, distributed=True)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    state.wait_for_everyone()
    check = time.perf_counter()
    same_rows_key(data, ("chosen", "rejected"))
    check, every_row = time.perf_counter() - check, time.perf_counter()
    row_digests(data, ("prompt", "chosen", "rejected"))
    every_row = time.perf_counter() - every_row
    with open(f"{out}.rank{state.process_index}.json", "w") as f:
        json.dump({"seconds": seconds, "cpu_seconds": cpu_seconds, "responses": sum(report.responses.values()),
                   "world": state.num_processes, "same_rows_check_s": check, "hash_every_row_s": every_row}, f)
    if state.num_processes > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def time_scoring(classifier: str, pairs: int, processes: int, work: str, kind: str = "model") -> dict:
    """Launch ``processes`` ranks; the slowest rank's scoring time and each rank's responses."""
    out = os.path.join(work, f"timing-{kind}-{processes}")
    script = [str(Path(__file__).resolve()), "--worker", classifier, str(pairs), out, kind]
    if processes == 1:
        cmd = [sys.executable, *script]
    else:
        accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
        cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", *script]
    subprocess.run(cmd, env=_env(), check=True, capture_output=True, text=True)
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(processes)]
    return {"processes": processes, "seconds": max(r["seconds"] for r in ranks),
            "cpu_seconds_per_rank": [r["cpu_seconds"] for r in ranks],
            "responses_per_rank": [r["responses"] for r in ranks],
            "same_rows_check_s": max(r["same_rows_check_s"] for r in ranks),
            "hash_every_row_s": max(r["hash_every_row_s"] for r in ranks)}


def _timing(classifier: str, pairs: int, kind: str, args: argparse.Namespace, work: str) -> dict:
    """``args.repeats`` rounds of every process count, alternating; the best of each, all of them, and the ratio."""
    tries = [[time_scoring(classifier, pairs, n, work, kind) for n in args.processes] for _ in range(args.repeats)]
    runs = [min((t[i] for t in tries), key=lambda r: r["seconds"]) for i in range(len(args.processes))]
    for i, run in enumerate(runs):
        run["all_seconds"] = [t[i]["seconds"] for t in tries]
    out = {"responses": 2 * pairs, "hidden_size": args.hidden, "runs": runs}
    if len(runs) > 1:
        out["ratio"] = runs[-1]["seconds"] / runs[0]["seconds"]
        out["cpu_ratio"] = max(runs[-1]["cpu_seconds_per_rank"]) / runs[0]["cpu_seconds_per_rank"][0]
    return out


MEMORY_CHILD = """
import gc, json, resource, sys
import torch
from transformers import PreTrainedModel
from tests.helpers import cpu_args
from tests.tiny import preference_dataset
import trl_upo.core as trainer_module  # the core scores the datasets
from trl_upo import UPOTrainer

policy, classifier, out = sys.argv[1:4]
torch.set_num_threads(1)
seen = {}
real = trainer_module.score_dataset

def measured(*args, **kwargs):
    result = real(*args, **kwargs)
    gc.collect()
    lms = [m for m in gc.get_objects() if isinstance(m, PreTrainedModel) and "CausalLM" in type(m).__name__]
    seen.setdefault("rss_mb_after_scoring", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    seen.setdefault("causal_lms_alive_after_scoring", len(lms))
    return result

trainer_module.score_dataset = measured
rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
heads = [{"name": "cls", "type": "classifier", "params": {"model": classifier, "labels": "positive", "device": "cpu"}}]
args = cpu_args(out + ".run", reward_heads=heads, upo_use_score_cache=False)
trainer = UPOTrainer(model=policy, args=args, train_dataset=preference_dataset(2000, seed=0))
seen["rss_mb_at_start"] = rss_start
seen["rss_mb_after_trainer"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
seen["policy_parameters"] = sum(p.numel() for p in trainer.model.parameters())
json.dump(seen, open(out, "w"))
"""


def measure_memory(work: str, policy_hidden: int = 512, policy_layers: int = 8) -> dict:
    """Peak RSS of a child process that builds ``UPOTrainer`` with the policy by path and a classifier head."""
    from tests.tiny import save_tiny_classifier, save_tiny_model

    policy = save_tiny_model(os.path.join(work, "policy"), hidden_size=policy_hidden, num_layers=policy_layers)
    classifier = save_tiny_classifier(os.path.join(work, "mem-classifier"), labels=["negative", "positive"],
                                      hidden_size=128)
    out = os.path.join(work, "memory.json")
    subprocess.run([sys.executable, "-c", MEMORY_CHILD, policy, classifier, out], env=_env(), check=True,
                   capture_output=True, text=True, cwd=work)
    return json.loads(Path(out).read_text())


BUSY_LOOP = "x = 0\nfor i in range(10_000_000):\n    x += i\n"


def free_cores_control() -> dict:
    """A control for the machine, not the code: the wall time of a pure-Python loop alone, and of two copies started
    together. On two free cores the two take as long as one (ratio 1.0); on one free core, twice as long (2.0)."""

    def run(copies: int) -> float:
        start = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(copies)]
        for proc in procs:
            proc.wait()
        return time.perf_counter() - start

    alone, together = run(1), run(2)
    return {"loop_alone_s": alone, "two_loops_s": together, "slowdown": together / alone}


def load_average() -> str:
    """``uptime``'s load averages (other processes on the machine during the measurement)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark (see the module docstring); returns and prints the results."""
    if argv and argv[0] == "--worker":
        worker(argv[1], int(argv[2]), argv[3], *argv[4:5])
        return {}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=10_000, help="pairs to score (two responses each)")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--heads", nargs="+", choices=["model", "text", "text-short"], default=["model", "text"],
                   help="a classifier head, and/or the length, lexicon and readability heads on responses of 60-240 "
                        "words (text) or on the tests' few-word responses (text-short)")
    p.add_argument("--hidden", type=int, default=128, help="hidden size of the tiny classifier")
    p.add_argument("--repeats", type=int, default=3,
                   help="timing rounds (1 then 2 processes, alternating); the best of each is reported")
    p.add_argument("--memory", action="store_true", help="only the memory part")
    p.add_argument("--no-memory", dest="timing_and_memory", action="store_false", help="only the timing part")
    p.add_argument("--short", action="store_true", help="CI check: 400 pairs, small models")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    from tests.tiny import save_tiny_classifier

    results: dict = {"cpus": os.cpu_count(), "load_before": load_average()}
    with tempfile.TemporaryDirectory() as work:
        if not args.memory:
            pairs = 400 if args.short else args.pairs
            args.repeats = 1 if args.short else args.repeats
            classifier = save_tiny_classifier(os.path.join(work, "classifier"), labels=["negative", "positive"],
                                              hidden_size=32 if args.short else args.hidden)
            results["timing"] = {kind: _timing(classifier, pairs, kind, args, work) for kind in args.heads}
            results["timing"]["control"] = free_cores_control()
        if args.memory or args.timing_and_memory:
            results["memory"] = measure_memory(work, *((64, 2) if args.short else (512, 8)))
    results["load_after"] = load_average()
    return emit(results, args.json)


def emit(results: dict, path: str | None) -> dict:
    """Print the results as JSON, write them to ``path`` (``--json``) when given, and return them."""
    print(json.dumps(results, indent=2))
    if path:
        Path(path).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
