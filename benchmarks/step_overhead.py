#!/usr/bin/env python
"""UPO costs what DPO costs: step time, peak memory and model forwards of UPOTrainer against DPOTrainer.

    python benchmarks/step_overhead.py             # full CPU run: tiny + ~74M-parameter model (about 12 min, 2 cores)
    python benchmarks/step_overhead.py --short     # CI: tiny model, a few steps; fails if the forwards per step differ
    python benchmarks/step_overhead.py --calibrate # A/A: DPOTrainer against a second DPOTrainer (the noise floor)
    python benchmarks/step_overhead.py --model Qwen/Qwen2.5-0.5B-Instruct   # CUDA machine: a real model by name

It needs the installed ``trl_upo`` only (any working directory), and a quiet machine. Compared: ``trl.DPOTrainer``
and ``trl_upo.UPOTrainer`` with three reward heads (the built-in ``length``, ``column`` reading two score columns
added to the data, and ``function`` with the quickstart's ``avoid_word_reward``; ``upo_alpha=1``), on the same model,
data, batch, seed and arguments: full fine-tuning with the reference loaded from the same saved path, and LoRA
(adapter-disabled reference). Models are built locally from the quickstart's tokenizer (``trl_upo.quickstart_task``).

- Step time: both trainers in one process on one shared policy and reference, their optimizer steps alternating in
  one thread in ABBA order, each step run as ``Trainer.train()``'s inner loop runs it (``_StepDriver``); per timing
  process the ratio of the median step times, over processes their geometric mean. Steps during which other
  processes used the CPU (read from ``/proc/stat``) are dropped.
- Peak memory: fresh processes that each build one trainer from the model path and train a few steps; ``VmHWM`` from
  ``/proc/self/status`` (on CUDA ``torch.cuda.max_memory_allocated()``).
- Forwards per step: forward hooks on the policy (the base model under PEFT) and on the reference.
- Also: the heads' scoring throughput through ``trl_upo.scoring.score_dataset``, and the wall time of ``trl-upo train``
  (the CPU quickstart) in a fresh process.

Why it is measured this way (the simpler designs measured mostly noise), the allocator settings, and the results:
docs/benchmarks.md. Output: a Markdown table on stdout and a JSON file (``--json``) with every raw step time. Exit
status 1 when UPO and DPO run a different number of forwards per step or UPO's term was not computed;
``--check-targets`` also fails on a missed time or memory target.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "outputs" / "benchmarks" / "step_overhead.json"  # /outputs/ is git-ignored

STEP_RATIO_TARGET = 1.03
MEMORY_RATIO_TARGET = 1.02

# The three heads UPO is measured with: one of each built-in head type.
HEADS = [
    {"name": "length", "weight": 1.0, "params": {"direction": "shorter"}},
    {"name": "rm", "type": "column", "weight": 1.0, "params": {"chosen": "rm_chosen", "rejected": "rm_rejected"}},
    {"name": "novery", "type": "function", "weight": 1.0,
     "params": {"function": "trl_upo.quickstart_task:avoid_word_reward"}},
]

# Models built locally (no hub). "tiny" is the tests' tiny Llama. "medium" is a 12-layer Llama of 73.7M
# parameters with a 32,000-token vocabulary like Llama 2's, although the quickstart's word-level tokenizer has
# ~70 tokens: the embedding and the LM head have 32k rows, so the fused LM head's log-softmax and its backward cost
# what they cost with a real 32k tokenizer; only the ids that occur are few, which changes no cost. (A real 32k
# tokenizer would need a download, or a corpus to train one on.)
SIZES = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=None),
    "medium": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=8,
                   num_key_value_heads=8, vocab_size=32000),
}

# A case: a model, full fine-tuning or LoRA, the data shape, and the run lengths. response_words: words (one token
# each) per response; prompts are 5 tokens. Timing: `repeats` processes; in each, `steps` optimizer steps of each
# trainer, alternating step by step, the first `warmup` of each dropped. Memory: `memory_repeats` DPO+UPO pairs of
# fresh processes of `memory_steps` steps.
CASES = {
    "tiny-full": dict(size="tiny", lora=False, batch_size=8, response_words=(3, 6), steps=300, warmup=20,
                      repeats=2, memory_steps=10, memory_repeats=2),
    "medium-full": dict(size="medium", lora=False, batch_size=4, response_words=(48, 64), steps=14, warmup=2,
                        repeats=2, memory_steps=3, memory_repeats=2),
    "medium-lora": dict(size="medium", lora=True, batch_size=4, response_words=(48, 64), steps=14, warmup=2,
                        repeats=2, memory_steps=3, memory_repeats=2),
    # --model NAME on CUDA: a real model from the hub (or a local path), full fine-tuning and LoRA.
    "hub-full": dict(size=None, lora=False, batch_size=8, response_words=(96, 160), steps=60, warmup=5,
                     repeats=2, memory_steps=5, memory_repeats=2),
    "hub-lora": dict(size=None, lora=True, batch_size=8, response_words=(96, 160), steps=60, warmup=5,
                     repeats=2, memory_steps=5, memory_repeats=2),
}
SHORT = dict(cases=["tiny-full"], steps=12, warmup=2, repeats=1, memory_steps=3, memory_repeats=1,
             scoring_pairs=500)


# ----------------------------------------------------------------------------------------------------------------
# Data and models
# ----------------------------------------------------------------------------------------------------------------


def bench_rows(n: int, seed: int, response_words: tuple[int, int]) -> list[dict]:
    """Synthetic preference pairs over the quickstart task's vocabulary (chosen on-topic, rejected off-topic, "very"
    in half of the answers) with responses of ``response_words`` words, plus two score columns for the column head
    (think: a reward model's labels)."""
    from trl_upo.quickstart_task import DESIGNER_WORD, TOPICS, topic_words

    rng = random.Random(seed)
    topics = list(TOPICS)

    def answer(topic: str) -> str:
        n_words = rng.randint(*response_words)
        words = topic_words(rng, topic, n_words)
        if rng.random() < 0.5:
            words[rng.randrange(n_words)] = DESIGNER_WORD
        return " " + " ".join(words)

    rows = []
    for _ in range(n):
        topic = rng.choice(topics)
        other = rng.choice([t for t in topics if t != topic])
        rows.append({
            "prompt": f"tell me about {topic} answer",
            "chosen": answer(topic),
            "rejected": answer(other),
            "rm_chosen": rng.gauss(0.5, 1.0),
            "rm_rejected": rng.gauss(0.0, 1.0),
        })
    return rows


def build_local_model(size: str, path: str, seed: int = 0) -> dict:
    """Save a randomly initialised Llama of ``size`` and the word-level tokenizer to ``path``."""
    import torch
    from transformers import LlamaForCausalLM

    from trl_upo.quickstart_task import build_tokenizer, model_config

    tokenizer = build_tokenizer()
    spec = dict(SIZES[size])
    vocab = spec.pop("vocab_size") or len(tokenizer)
    config = model_config(tokenizer, vocab_size=vocab, max_position_embeddings=512, **spec)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    gc.collect()
    return {"path": path, "params": n_params, "vocab_size": vocab, **spec}


# ----------------------------------------------------------------------------------------------------------------
# Process and machine measurements
# ----------------------------------------------------------------------------------------------------------------


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Free what can be freed, hand it back to the OS, and reset VmHWM to the current RSS (Linux >= 4.0)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    hwm = _proc_status_kb("VmHWM")
    if hwm is not None:
        return hwm / 1024
    import resource  # not Linux: the best there is (on Linux ru_maxrss includes the launcher's pre-exec peak)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _rss_mb() -> float:
    rss = _proc_status_kb("VmRSS")
    if rss is not None:
        return rss / 1024
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return float("nan")


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes of the machine have spent busy since boot (``/proc/stat``), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def foreign_cores(wall: float, own_cpu: float, busy_delta: float | None) -> float:
    """Cores' worth of CPU that *other* processes used during ``wall`` seconds (0 when unknown). /proc/stat counts
    in 10 ms ticks, so this is only meaningful over a few hundred milliseconds or more."""
    if busy_delta is None or wall <= 0:
        return 0.0
    return max(0.0, busy_delta - own_cpu) / wall


def wait_for_quiet(max_wait: float, threshold: float, probe: float = 1.0) -> dict:
    """Wait (at most ``max_wait`` s) until other processes use less than ``threshold`` cores over ``probe`` s."""
    t0 = time.perf_counter()
    while True:
        b0, c0, w0 = machine_busy_seconds(), time.process_time(), time.perf_counter()
        time.sleep(probe)
        b1 = machine_busy_seconds()
        load = foreign_cores(time.perf_counter() - w0, time.process_time() - c0, None if b0 is None else b1 - b0)
        waited = time.perf_counter() - t0
        if load < threshold or waited >= max_wait:
            return {"foreign_cores": load, "waited_s": round(waited, 1)}
        time.sleep(min(5.0, max(0.0, max_wait - waited)))


# ----------------------------------------------------------------------------------------------------------------
# Building a trainer, counting its forwards, timing its steps
# ----------------------------------------------------------------------------------------------------------------


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def _build_trainer(spec: dict, kind: str, model=None, ref_model=None):
    """A DPOTrainer or UPOTrainer: from the model path (as users run it; LoRA through ``peft_config``), or on the
    given model objects (the timing processes share one policy and one reference between the two trainers)."""
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from trl_upo import UPOConfig, UPOTrainer

    batch, steps = spec["batch_size"], spec["steps"]
    # Enough distinct pairs that no batch repeats; both kinds see the same batches (same seed, same sampler).
    data = Dataset.from_list(bench_rows(max(64, batch * steps), spec["seed"], tuple(spec["response_words"])))
    common = dict(
        output_dir=os.path.join(spec["work_dir"], f"run-{kind}"),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=1e-5,
        logging_steps=min(10, steps),
        save_strategy="no",
        report_to=[],
        seed=spec["seed"],
        data_seed=spec["seed"],
        dataloader_num_workers=0,
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    if spec["device"] == "cuda":
        common.update(bf16=torch.cuda.is_bf16_supported())
    else:
        common.update(use_cpu=True, bf16=False)
    if kind == "dpo":
        args, trainer_cls = trl.DPOConfig(**common), trl.DPOTrainer
    else:
        args = UPOConfig(
            **common,
            reward_heads=HEADS,
            upo_alpha=1.0,
            upo_score_cache_dir=os.path.join(spec["work_dir"], "score-cache"),
            upo_use_score_cache=False,  # score every time: part of the construction time reported
        )
        trainer_cls = UPOTrainer
    peft_config = _lora_config() if spec["lora"] and model is None else None
    transformers.set_seed(spec["seed"])
    t0 = time.perf_counter()
    trainer = trainer_cls(model=spec["model"] if model is None else model, ref_model=ref_model, args=args,
                          train_dataset=data, peft_config=peft_config)
    init_seconds = time.perf_counter() - t0
    # No printed logs (disable_tqdm swaps the progress bar for a printer): stdout is the report's.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer, init_seconds


def _count_forwards(trainer, counts_for=None) -> tuple[Counter, list]:
    """Forward hooks on the policy module (under PEFT the tuner around the base model: PEFT 0.20 calls the base
    model's ``forward`` directly, past its hooks) and the reference model.
    ``counts_for``: a callable returning the Counter to add to (shared models: the one of the trainer whose turn it
    is)."""
    from peft import PeftModel

    counts: Counter = Counter()
    counts_for = counts_for or (lambda: counts)

    def counter(role):
        def hook(module, args, kwargs, output):
            c = counts_for()
            c[role] += 1
            if kwargs.get("fused_lm_head"):
                c[f"{role}_fused"] += 1

        return hook

    policy = trainer.accelerator.unwrap_model(trainer.model)
    policy = policy.base_model if isinstance(policy, PeftModel) else policy
    handles = [policy.register_forward_hook(counter("policy"), with_kwargs=True)]
    if trainer.ref_model is not None:
        ref = trainer.accelerator.unwrap_model(trainer.ref_model)
        handles.append(ref.register_forward_hook(counter("ref"), with_kwargs=True))
    return counts, handles


def _sample(cuda: bool) -> tuple[float, float, float | None]:
    """(wall clock, this process's CPU seconds over all threads, the machine's busy CPU seconds)."""
    if cuda:
        import torch

        torch.cuda.synchronize()
    busy = machine_busy_seconds()
    return (time.perf_counter(), time.process_time(), busy)


class _StepDriver:
    """One optimizer step at a time of a trainer, as ``Trainer.train()``'s inner loop does it (transformers 5):
    fetch and collate the batch, ``training_step`` (inputs to the device, ``compute_loss``, backward), gradient
    clipping, ``optimizer.step()``, ``lr_scheduler.step()``, ``zero_grad()``, and every ``logging_steps`` the
    trainer's ``log()`` (which averages and clears its metrics). What it leaves out (callbacks, saving, evaluation)
    is the same for both trainers and none of UPO's code."""

    def __init__(self, trainer, total_steps: int, cuda: bool):
        self.trainer, self.cuda = trainer, cuda
        trainer.create_optimizer_and_scheduler(num_training_steps=total_steps)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        self._loader = trainer.get_train_dataloader()
        self._it = iter(self._loader)
        self.steps = 0
        self._loss = 0.0
        self.start, self.begin, self.end, self.done = [], [], [], []

    def _next_batch(self):
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self._loader)
            return next(self._it)

    def step(self) -> None:
        tr, args = self.trainer, self.trainer.args
        self.start.append(_sample(self.cuda))
        batch = self._next_batch()
        self.begin.append(_sample(self.cuda))
        loss = tr.training_step(tr.model, batch)
        if args.max_grad_norm and args.max_grad_norm > 0:
            tr.accelerator.clip_grad_norm_(tr.model.parameters(), args.max_grad_norm)
        tr.optimizer.step()
        tr.lr_scheduler.step()
        tr.model.zero_grad()
        self.end.append(_sample(self.cuda))
        self.steps += 1
        tr.state.global_step = self.steps
        self._loss += loss.detach()
        if self.steps % args.logging_steps == 0:
            tr.log({"loss": float(self._loss) / args.logging_steps})
            self._loss = 0.0
        self.done.append(_sample(self.cuda))


def _intervals(starts, ends) -> list[tuple[float, float, float]]:
    out = []
    for (w0, c0, b0), (w1, c1, b1) in zip(starts, ends):
        out.append((w1 - w0, c1 - c0, foreign_cores(w1 - w0, c1 - c0, None if b0 is None or b1 is None else b1 - b0)))
    return out


def _record(driver: _StepDriver, warmup: int) -> dict:
    """Step and full-step times (wall and CPU) of a driver's steps, without its first ``warmup`` steps."""
    steps = _intervals(driver.begin, driver.end)[warmup:]
    full = _intervals(driver.start, driver.done)[warmup:]
    return {
        "steps": driver.steps,
        "step_times": [w for w, _, _ in steps],
        "step_cpu_times": [c for _, c, _ in steps],
        "step_foreign_cores": [f for _, _, f in steps],
        "full_step_times": [w for w, _, _ in full],
        "full_step_foreign_cores": [f for _, _, f in full],
    }


def _upo_logged(trainer) -> bool:
    return any("upo/aux_loss" in h for h in trainer.state.log_history)


def run_timing(spec: dict) -> dict:
    """One timing process: a DPOTrainer and a UPOTrainer built in this process on one shared policy and reference,
    alternating one optimizer step at a time in ABBA order, all in this one thread."""
    import torch
    from transformers import AutoModelForCausalLM

    cuda = spec["device"] == "cuda"
    if not cuda:
        torch.set_num_threads(spec["threads"])
    kinds = ("dpo", "upo")
    # Full fine-tuning: one policy and one reference (loaded from the saved path) shared by both trainers: where two
    # copies of the same weights land in memory changed their speed by several percent in A/A runs. Each trainer
    # keeps its own optimizer; training the shared weights in turns changes no step's cost. LoRA: each trainer loads
    # the model from the path with `peft_config`, as users run it (given a ready PeftModel, TRL would add a "ref"
    # adapter instead of disabling the adapter, which neither could share).
    policy = ref_model = None
    if not spec["lora"]:
        policy = AutoModelForCausalLM.from_pretrained(spec["model"], dtype="auto")
        ref_model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype="auto")
    # Odd timing processes build UPO first and give it the first step, so that what the order of construction or of
    # the steps does cancels across processes.
    flip = spec.get("flip", False)
    trainers, init = {}, {}
    for kind in kinds[::-1] if flip else kinds:
        # --calibrate (A/A): the "upo" slot is a second DPOTrainer: what the method reads when nothing differs.
        trainers[kind], init[kind] = _build_trainer(spec, "dpo" if spec.get("calibrate") else kind, policy, ref_model)
    counters = {kind: Counter() for kind in kinds}
    turn = {"kind": kinds[0]}
    handles = []
    for kind in kinds if policy is None else kinds[:1]:  # shared modules: hooked once, counted for whose turn it is
        handles += _count_forwards(trainers[kind], lambda: counters[turn["kind"]])[1]
    first = "upo" if flip else "dpo"
    busy0, cpu0, wall0 = machine_busy_seconds(), time.process_time(), time.perf_counter()
    try:
        # Created (dataloader, optimizer) in the order of construction too: everything about a slot flips.
        drivers = {kind: _StepDriver(trainers[kind], spec["steps"], cuda) for kind in (kinds[::-1] if flip else kinds)}
        order = abba(spec["steps"], first)
        for kind in order:
            turn["kind"] = kind
            drivers[kind].step()
    finally:
        for h in handles:
            h.remove()
    wall, busy1 = time.perf_counter() - wall0, machine_busy_seconds()
    out = {
        "mode": "timing",
        "foreign_cores": foreign_cores(wall, time.process_time() - cpu0, None if busy0 is None else busy1 - busy0),
        "order_head": order[:8],
        "kinds": {},
    }
    for kind in kinds:
        tr = trainers[kind]
        rec = _record(drivers[kind], spec["warmup"])
        rec.update({
            "forwards": dict(counters[kind]),
            "forwards_per_step": {k: v / max(1, rec["steps"]) for k, v in sorted(counters[kind].items())},
            "upo_term_logged": _upo_logged(tr),
            "init_seconds": init[kind],
            "policy_params": sum(p.numel() for p in tr.model.parameters()),
            "trainable_params": sum(p.numel() for p in tr.model.parameters() if p.requires_grad),
        })
        out["kinds"][kind] = rec
    del trainers
    gc.collect()
    return out


def run_memory(spec: dict) -> dict:
    """One memory run: a fresh process (or a reset high-water mark) builds one trainer and trains a few steps."""
    import torch

    cuda = spec["device"] == "cuda"
    if not cuda:
        torch.set_num_threads(spec["threads"])
    if spec.get("inprocess"):
        _reset_peak_rss()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_mb()
    kind = spec["kind"]
    trainer, init_seconds = _build_trainer(spec, kind)
    counts, handles = _count_forwards(trainer)
    try:
        trainer.train()
    finally:
        for h in handles:
            h.remove()
    steps = trainer.state.global_step
    out = {
        "mode": "memory",
        "kind": kind,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_before_model_mb": rss_before,
        "init_seconds": init_seconds,
        "steps": steps,
        "forwards_per_step": {k: v / max(1, steps) for k, v in sorted(counts.items())},
        "upo_term_logged": _upo_logged(trainer),
    }
    if cuda:
        out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    del trainer
    gc.collect()
    return out


def run_worker(spec: dict, isolation: str) -> dict:
    fn = run_timing if spec["mode"] == "timing" else run_memory
    if isolation == "inprocess":
        return fn({**spec, "inprocess": True})
    out = os.path.join(spec["work_dir"], f"result-{spec['mode']}-{spec.get('kind', 'both')}-{time.monotonic_ns()}.json")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps({**spec, "result_file": out})]
    env = _child_env()
    if spec.get("tuned_malloc"):
        env.update(TUNED_MALLOC if spec["mode"] == "timing" else MEMORY_MALLOC)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"benchmark worker failed ({spec['mode']}, {spec['case']}), exit {proc.returncode}")
    with open(out) as f:
        return json.load(f)


# glibc allocator settings of the worker processes (--default-malloc: none). Both trainers get the same, and no UPO
# code allocates differently because of them; they remove noise that is the allocator's, not the trainers'.
#
# Timing processes: serve every allocation from the heap and keep freed memory. By default a block above glibc's
# dynamic mmap threshold (at most 32 MB; the fused LM head's logit tiles are 70 MB on the medium model) is mmap-ed
# and unmapped again, so the kernel faults in and zeroes ~1.8 GB per medium step (450k minor faults, 0.9 of 4.8
# CPU-seconds; measured): a cost that varies with the kernel's memory state. With these, 0 faults per step after the
# first.
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**36)}
# Memory processes: glibc's starting mmap threshold (128 KiB), fixed. Left dynamic (the default), the threshold
# rises as large blocks are freed, and how much freed memory the heap then retains varies from process to process:
# measured, the same medium LoRA DPO run peaked at 1676, 1726 and 1775 MB (UPO: 1681, 1825, 1861). Fixed, every large
# tensor is mapped and unmapped with its lifetime, so the peak RSS follows live memory: 1572-1573 MB for DPO and
# 1573-1574 MB for UPO in the same check.
MEMORY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("TQDM_DISABLE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


# ----------------------------------------------------------------------------------------------------------------
# A case: timing processes, memory runs, summary
# ----------------------------------------------------------------------------------------------------------------


def run_case(name: str, model: str, model_info: dict, opts, work_dir: str, device: str) -> dict:
    case = dict(CASES[name])
    steps = opts.steps or case["steps"]
    warmup = min(opts.warmup if opts.warmup is not None else case["warmup"], max(0, steps - 3))
    repeats = opts.repeats or case["repeats"]
    memory_steps = opts.memory_steps or case["memory_steps"]
    memory_repeats = opts.memory_repeats or case["memory_repeats"]
    base = {
        "case": name, "model": model, "lora": case["lora"], "device": device, "batch_size": case["batch_size"],
        "response_words": case["response_words"], "seed": opts.seed, "threads": opts.threads,
    }
    timing: list[dict] = []
    for i in range(repeats):
        spec = {**base, "mode": "timing", "steps": steps, "warmup": warmup, "flip": i % 2 == 1,
                "calibrate": opts.calibrate, "tuned_malloc": not opts.default_malloc,
                "work_dir": os.path.join(work_dir, f"{name}-timing-{i}")}
        os.makedirs(spec["work_dir"], exist_ok=True)
        # Other jobs slow whichever steps they overlap. Wait for a quiet machine first, and run a process again (at
        # most --retries times) if other processes were busy during it.
        for attempt in range(opts.retries + 1):
            quiet = wait_for_quiet(opts.quiet_wait, opts.noise_cores) if opts.quiet_wait > 0 else None
            res = run_worker(spec, opts.isolation)
            res["attempt"], res["quiet_check"] = attempt, quiet
            if res["foreign_cores"] <= opts.noise_cores:
                break
            print(f"  {name}: other processes used {res['foreign_cores']:.2f} cores during timing process {i + 1}; "
                  + ("running it again" if attempt < opts.retries else "kept (out of retries)"), file=sys.stderr)
        timing.append(res)
        med = {k: 1e3 * statistics.median(v["step_times"]) for k, v in res["kinds"].items()}
        print(f"  {name} timing {i + 1}/{repeats}: median step DPO {med['dpo']:.1f} ms, UPO {med['upo']:.1f} ms "
              f"(ratio {med['upo'] / med['dpo']:.3f}), other processes {res['foreign_cores']:.2f} cores",
              file=sys.stderr)
    memory: list[dict] = []
    for i, kind in enumerate(abba(memory_repeats)):
        spec = {**base, "mode": "memory", "kind": kind, "steps": memory_steps, "tuned_malloc": not opts.default_malloc,
                "work_dir": os.path.join(work_dir, f"{name}-memory-{i}")}
        os.makedirs(spec["work_dir"], exist_ok=True)
        res = run_worker(spec, opts.isolation)
        res["repeat"] = i // 2
        memory.append(res)
        print(f"  {name} memory {kind} {i // 2 + 1}/{memory_repeats}: peak RSS {res['peak_rss_mb']:.0f} MB"
              + (f", CUDA {res['cuda_peak_allocated_mb']:.0f} MB" if "cuda_peak_allocated_mb" in res else ""),
              file=sys.stderr)
    return summarize(name, case, model_info, timing, memory, steps, warmup, repeats, memory_steps, opts, device)


def abba(repeats: int, first: str = "dpo") -> list[str]:
    """DPO, UPO, UPO, DPO, DPO, UPO, ...: each repeat is one DPO and one UPO run, the order flipping each time."""
    a, b = (first, "upo" if first == "dpo" else "dpo")
    order = []
    for r in range(repeats):
        order += [a, b] if r % 2 == 0 else [b, a]
    return order


# Below this step length the 10 ms ticks of /proc/stat cannot attribute other processes' CPU to one step; such steps
# are judged by their process as a whole (the retry above).
MIN_ATTRIBUTABLE_STEP_S = 0.25


def _clean(rec: dict, key: str, noise_cores: float) -> tuple[list[float], int]:
    """``rec[key]`` without the steps during which other processes used more than ``noise_cores`` cores (all of them
    when fewer than 3 would remain), and how many were dropped."""
    times = rec[key]
    foreign = rec["full_step_foreign_cores" if key == "full_step_times" else "step_foreign_cores"]
    walls = rec["full_step_times" if key == "full_step_times" else "step_times"]
    keep = [t for t, w, f in zip(times, walls, foreign, strict=True) if w < MIN_ATTRIBUTABLE_STEP_S or f <= noise_cores]
    if len(keep) < 3:
        return list(times), 0
    return keep, len(times) - len(keep)


def _ratio_stats(timing: list[dict], key: str, noise_cores: float) -> dict:
    pooled = {"dpo": [], "upo": []}
    per_process, dropped = [], 0
    for res in timing:
        med = {}
        for kind in pooled:
            kept, n = _clean(res["kinds"][kind], key, noise_cores)
            pooled[kind] += kept
            dropped += n
            med[kind] = statistics.median(kept)
        per_process.append(med["upo"] / med["dpo"])
    d, u = statistics.median(pooled["dpo"]), statistics.median(pooled["upo"])
    return {
        "dpo_median_ms": 1e3 * d,
        "upo_median_ms": 1e3 * u,
        # Per process the ratio of the medians; over processes their geometric mean, so that a process built DPO
        # first and one built UPO first weigh the same whatever their speed.
        "ratio": statistics.geometric_mean(per_process),
        "pooled_ratio": u / d,
        "process_ratio_min": min(per_process),
        "process_ratio_max": max(per_process),
        "process_ratios": per_process,
        "dpo_iqr_ms": 1e3 * _iqr(pooled["dpo"]),
        "upo_iqr_ms": 1e3 * _iqr(pooled["upo"]),
        "n_steps": {k: len(v) for k, v in pooled.items()},
        "dropped_noisy_steps": dropped,
    }


def _iqr(xs: list[float]) -> float:
    if len(xs) < 4:
        return float("nan")
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


def summarize(name, case, model_info, timing, memory, steps, warmup, repeats, memory_steps, opts, device) -> dict:
    fwd = {k: timing[0]["kinds"][k]["forwards_per_step"] for k in ("dpo", "upo")}
    all_fwd = [t["kinds"][k]["forwards_per_step"] for t in timing for k in ("dpo", "upo")]
    all_fwd += [m["forwards_per_step"] for m in memory]
    mem_key = "cuda_peak_allocated_mb" if device == "cuda" else "peak_rss_mb"
    by = {k: [m for m in memory if m["kind"] == k] for k in ("dpo", "upo")}
    peak = {k: statistics.median(m[mem_key] for m in by[k]) for k in by}
    added = {k: statistics.median(m["peak_rss_mb"] - m["rss_before_model_mb"] for m in by[k]) for k in by}
    up = timing[0]["kinds"]["upo"]
    out = {
        "case": name,
        "model": model_info,
        "policy_params": up["policy_params"],
        "trainable_params": up["trainable_params"],
        "lora": case["lora"],
        "batch_size": case["batch_size"],
        "response_words": case["response_words"],
        "steps_per_trainer": steps,
        "warmup": warmup,
        "calibrate": opts.calibrate,
        "timing_processes": repeats,
        "memory_steps": memory_steps,
        "memory_pairs": len(memory) // 2,
        "isolation": opts.isolation,
        "device": device,
        "step": _ratio_stats(timing, "step_times", opts.noise_cores),
        "full_step": _ratio_stats(timing, "full_step_times", opts.noise_cores),
        "step_cpu": _ratio_stats(timing, "step_cpu_times", opts.noise_cores),
        "other_processes_cores": max(t["foreign_cores"] for t in timing),
        "rerun_timing_processes": sum(t["attempt"] for t in timing),
        "memory_metric": mem_key,
        "peak_memory_mb": peak,
        "memory_ratio": peak["upo"] / peak["dpo"],
        "memory_pair_ratios": [
            next(m for m in memory if m["repeat"] == r and m["kind"] == "upo")[mem_key]
            / next(m for m in memory if m["repeat"] == r and m["kind"] == "dpo")[mem_key]
            for r in sorted({m["repeat"] for m in memory})
        ],
        "added_rss_mb": added,
        "forwards_per_step": fwd,
        "forwards_equal": all(f == fwd["dpo"] for f in all_fwd),
        "upo_term_logged": all(t["kinds"]["upo"]["upo_term_logged"] for t in timing)
        and all(m["upo_term_logged"] for m in by["upo"]),
        "init_seconds": {k: statistics.median(m["init_seconds"] for m in by[k]) for k in by},
        "timing": timing,
        "memory": memory,
    }
    out["meets_step_target"] = out["step"]["ratio"] <= STEP_RATIO_TARGET
    out["meets_memory_target"] = out["memory_ratio"] <= MEMORY_RATIO_TARGET
    return out


# ----------------------------------------------------------------------------------------------------------------
# Scoring throughput and quickstart
# ----------------------------------------------------------------------------------------------------------------


def scoring_throughput(n_pairs: int, seed: int, work_dir: str) -> dict:
    """Responses per second of each built-in head alone and of the three together, on ``n_pairs`` pairs (two
    responses each) shaped like the tiny case's data, through ``trl_upo.scoring.score_dataset`` with the cache off
    (what ``UPOTrainer.__init__`` runs; it includes adding the score columns to the dataset)."""
    from datasets import Dataset

    from trl_upo.heads import build_head, parse_head_specs
    from trl_upo.scoring import score_dataset
    from trl_upo.quickstart_task import build_tokenizer

    data = Dataset.from_list(bench_rows(n_pairs, seed, CASES["tiny-full"]["response_words"]))
    tokenizer = build_tokenizer()
    specs = parse_head_specs(HEADS)
    results = {}
    for group, label in [([s], s.type) for s in specs] + [(specs, "all three")]:
        heads = [build_head(s) for s in group]
        t0 = time.perf_counter()
        _, report = score_dataset(data, heads, group, split="train", tokenizer=tokenizer, batch_size=256,
                                  cache_dir=os.path.join(work_dir, "scoring-cache"), use_cache=False)
        seconds = time.perf_counter() - t0
        assert set(report.status.values()) == {"scored"}
        results[label] = {"responses": 2 * n_pairs, "seconds": seconds, "responses_per_s": 2 * n_pairs / seconds}
    return results


def quickstart_command() -> list[str]:
    """The README's main command, ``trl-upo train`` (no arguments: the packaged CPU quickstart recipe), through the
    console script installed next to this interpreter."""
    script = Path(sys.executable).with_name("trl-upo")
    return [str(script), "train"] if script.exists() else [sys.executable, "-m", "trl_upo.cli", "train"]


def quickstart_wall_time(work_dir: str) -> dict:
    """Wall time of the README's main command (``trl-upo train``) in a fresh process, imports included, run in an
    empty directory (the recipe writes to ``outputs/quickstart`` under it)."""
    cwd = os.path.join(work_dir, "quickstart")
    os.makedirs(cwd, exist_ok=True)
    cmd = quickstart_command()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), cwd=cwd)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise RuntimeError(f"the quickstart ({' '.join(cmd)}) failed, exit {proc.returncode}")
    return {"command": "trl-upo train", "wall_seconds": wall, "stdout_tail": proc.stdout[-1500:]}


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def machine_info(threads: int) -> dict:
    import datasets
    import peft
    import torch
    import transformers
    import trl

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        mem_gb = None
    info = {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "torch_threads": threads,
        "ram_gb": mem_gb,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "datasets": datasets.__version__,
        "loadavg_start": os.getloadavg(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def format_report(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['nproc']} CPUs ({m['torch_threads']} torch threads), {m['ram_gb']} GB RAM"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}, "
        f"peft {m['peft']}. Load average {m['loadavg_start'][0]:.2f} at start, {report['loadavg_end']:.2f} at end.",
        "",
        "| case | params (trainable) | batch, steps x processes | DPO step ms | UPO step ms | step ratio [per process] "
        "| full-step ratio | CPU-time ratio | peak mem MB DPO / UPO | mem ratio | added MB DPO / UPO | forwards/step "
        "DPO = UPO | targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["cases"]:
        s, f, cpu = c["step"], c["full_step"], c["step_cpu"]
        params = f"{c['policy_params'] / 1e6:.2f}M ({c['trainable_params'] / 1e6:.2f}M)"
        fw = ", ".join(f"{n} {v:g}" for n, v in c["forwards_per_step"]["upo"].items() if not n.endswith("_fused"))
        if not c["forwards_equal"]:
            fw = "DIFFER: " + json.dumps(c["forwards_per_step"])
        targets = ("step " + ("yes" if c["meets_step_target"] else "NO") + ", mem "
                   + ("yes" if c["meets_memory_target"] else "NO"))
        lines.append(
            f"| {c['case']}{' (A/A)' if c['calibrate'] else ''} | {params} | {c['batch_size']}, "
            f"{c['steps_per_trainer']} x {c['timing_processes']} | "
            f"{s['dpo_median_ms']:.1f} | {s['upo_median_ms']:.1f} | "
            f"**{s['ratio']:.3f}** [{s['process_ratio_min']:.3f}, {s['process_ratio_max']:.3f}] | "
            f"{f['ratio']:.3f} | {cpu['ratio']:.3f} | "
            f"{c['peak_memory_mb']['dpo']:.0f} / {c['peak_memory_mb']['upo']:.0f} | **{c['memory_ratio']:.3f}** | "
            f"{c['added_rss_mb']['dpo']:.0f} / {c['added_rss_mb']['upo']:.0f} | {fw} | {targets} |"
        )
    lines.append("")
    step_def = ("one optimizer step as Trainer.train() runs it (training_step: forward and backward; clipping, "
                "optimizer and scheduler step), DPO and UPO alternating step by step in one process on shared weights")
    lines.append(
        f"Targets: step ratio <= {STEP_RATIO_TARGET}, peak memory ratio <= {MEMORY_RATIO_TARGET}, equal forwards per "
        f"step. Step: {step_def}; median after warm-up per process, geometric mean over processes [each process]. "
        f"Full step: also fetching and collating the batch, and logging. CPU time: this process's CPU seconds per "
        f"step. Memory: {report['cases'][0]['memory_metric'] if report['cases'] else ''}, median of "
        f"{'fresh processes' if report['isolation'] == 'subprocess' else 'runs in this process (approximate)'}; "
        f"added: minus the RSS before the model is loaded."
    )
    noise = "; ".join(
        f"{c['case']}: up to {c['other_processes_cores']:.2f} cores, {c['step']['dropped_noisy_steps']} steps "
        f"dropped, {c['rerun_timing_processes']} processes re-run" for c in report["cases"])
    lines.append(f"Other processes during timing: {noise}.")
    init = ", ".join(f"{c['case']} {c['init_seconds']['dpo']:.1f} s / {c['init_seconds']['upo']:.1f} s"
                     for c in report["cases"])
    lines.append(f"Trainer construction DPO / UPO (UPO's includes scoring the train set with three heads): {init}.")
    if report.get("scoring"):
        lines += ["", "| heads scoring | responses | seconds | responses/s |", "|---|---|---|---|"]
        for label, r in report["scoring"].items():
            lines.append(f"| {label} | {r['responses']} | {r['seconds']:.2f} | {r['responses_per_s']:,.0f} |")
    if report.get("quickstart"):
        q = report["quickstart"]
        lines += ["", f"Quickstart (`{q['command']}`, the README's main command, fresh process): "
                      f"{q['wall_seconds']:.1f} s wall, interpreter start and imports included."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", action="store_true",
                   help="CI mode: tiny model, a few steps, in-process, small scoring corpus, no quickstart")
    p.add_argument("--cases", default=None,
                   help=f"comma-separated cases (default: tiny-full,medium-full,medium-lora; hub-full,hub-lora with "
                        f"--model). Known: {', '.join(CASES)}")
    p.add_argument("--model", default=None,
                   help="a hub model name or local path (for a CUDA machine): benchmark it instead of the local models")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of each trainer in a timing process")
    p.add_argument("--warmup", type=int, default=None, help="steps of each trainer dropped at the start")
    p.add_argument("--repeats", type=int, default=None, help="timing processes per case")
    p.add_argument("--calibrate", action="store_true",
                   help="A/A check: time DPOTrainer against a second DPOTrainer in the UPO slot (the noise floor)")
    p.add_argument("--memory-steps", type=int, default=None, help="steps of a memory run")
    p.add_argument("--memory-repeats", type=int, default=None, help="DPO/UPO pairs of memory runs per case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="torch CPU threads")
    p.add_argument("--isolation", choices=["subprocess", "inprocess"], default=None,
                   help="a fresh process per timing process and memory run (default; needed for peak RSS), or all in "
                        "this process (default of --short)")
    p.add_argument("--default-malloc", action="store_true",
                   help="worker processes keep glibc's default allocator settings (see TUNED_MALLOC, MEMORY_MALLOC)")
    p.add_argument("--noise-cores", type=float, default=0.25,
                   help="a step (or timing process) during which other processes used more than this many cores is "
                        "disturbed: dropped (step) or run again (process)")
    p.add_argument("--quiet-wait", type=float, default=None,
                   help="seconds to wait at most for a quiet machine before each timing process (default 120; 0 with "
                        "--short)")
    p.add_argument("--retries", type=int, default=None,
                   help="times a disturbed timing process is run again (default 1; 0 with --short)")
    p.add_argument("--scoring-pairs", type=int, default=None, help="pairs (x2 responses) of the scoring corpus "
                   "(default 10000; 500 with --short)")
    p.add_argument("--no-scoring", action="store_true")
    p.add_argument("--no-quickstart", action="store_true")
    p.add_argument("--json", default=None, help=f"where to write the full results (default {DEFAULT_JSON}; none "
                   f"with --short)")
    p.add_argument("--check-targets", action="store_true", help="exit 1 when a step or memory target is missed")
    p.add_argument("--work-dir", default=None, help="where models and runs go (default: a temporary directory)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    opts = parse_args(argv)
    if opts.worker:
        spec = json.loads(opts.worker)
        res = run_timing(spec) if spec["mode"] == "timing" else run_memory(spec)
        with open(spec["result_file"], "w") as f:
            json.dump(res, f)
        return res

    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if opts.short:
        for key in ("steps", "warmup", "repeats", "memory_steps", "memory_repeats", "scoring_pairs"):
            if getattr(opts, key) is None:
                setattr(opts, key, SHORT[key])
        opts.isolation = opts.isolation or "inprocess"
        opts.no_quickstart = True
        opts.quiet_wait = 0 if opts.quiet_wait is None else opts.quiet_wait
        opts.retries = 0 if opts.retries is None else opts.retries
    else:
        opts.json = opts.json or str(DEFAULT_JSON)
    opts.isolation = opts.isolation or "subprocess"
    opts.quiet_wait = 120.0 if opts.quiet_wait is None else opts.quiet_wait
    opts.retries = 1 if opts.retries is None else opts.retries
    opts.scoring_pairs = opts.scoring_pairs or 10_000

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if opts.cases:
        cases = opts.cases.split(",")
    elif opts.short:
        cases = SHORT["cases"]
    elif opts.model:
        cases = ["hub-full", "hub-lora"]
    else:
        cases = ["tiny-full", "medium-full", "medium-lora"]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {list(CASES)}")
    if any(CASES[c]["size"] is None for c in cases) and not opts.model:
        raise SystemExit("the hub-* cases need --model NAME")
    if device == "cpu":
        torch.set_num_threads(opts.threads)

    machine = machine_info(opts.threads)
    tmp = tempfile.TemporaryDirectory(prefix="upo-bench-") if opts.work_dir is None else None
    work_dir = opts.work_dir or tmp.name
    report = {"command": " ".join(["python", *sys.argv]) if argv is None else " ".join(["main", *argv]),
              "machine": machine, "isolation": opts.isolation, "short": opts.short, "cases": []}
    try:
        models: dict[str, dict] = {}
        for name in cases:
            size = CASES[name]["size"]
            if size is None:
                info = {"path": opts.model, "name": opts.model}
            else:
                if size not in models:
                    models[size] = build_local_model(size, os.path.join(work_dir, "models", size), seed=opts.seed)
                info = models[size]
            print(f"== {name} ==", file=sys.stderr)
            report["cases"].append(run_case(name, info["path"], {k: v for k, v in info.items() if k != "path"},
                                            opts, work_dir, device))
        if not opts.no_scoring:
            print("== scoring throughput ==", file=sys.stderr)
            report["scoring"] = scoring_throughput(opts.scoring_pairs, opts.seed, work_dir)
        if not opts.no_quickstart:
            print("== quickstart ==", file=sys.stderr)
            report["quickstart"] = quickstart_wall_time(work_dir)
    finally:
        if tmp is not None:
            tmp.cleanup()
    report["loadavg_end"] = os.getloadavg()[0]

    print(format_report(report))
    if opts.json:
        os.makedirs(os.path.dirname(os.path.abspath(opts.json)), exist_ok=True)
        with open(opts.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"\n(full results: {opts.json})")

    failures = [f"{c['case']}: forwards per step differ" for c in report["cases"] if not c["forwards_equal"]]
    failures += [f"{c['case']}: UPO term not computed" for c in report["cases"]
                 if not c["upo_term_logged"] and not opts.calibrate]
    if opts.check_targets:
        failures += [f"{c['case']}: targets missed" for c in report["cases"]
                     if not (c["meets_step_target"] and c["meets_memory_target"])]
    report["failures"] = failures
    if failures:
        print("FAILED: " + "; ".join(failures), file=sys.stderr)
        if argv is None:
            sys.exit(1)
    return report


if __name__ == "__main__":
    main()
