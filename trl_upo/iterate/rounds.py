"""The rounds loop: round 1 trains on the user's data; round k >= 2 samples the round k-1 policy, has the judge label
the samples, trains from the round k-1 policy on them, and evaluates. Each round lives in ``<output_dir>/round-<k>/``
and is complete when its ``report.json`` exists (written atomically, last), so a killed run resumes at the first
incomplete round: its samples are reused when they were written, its training resumes from its last checkpoint when
the trainer saved one, and anything else in it is redone.

Under ``accelerate launch`` every process samples and judges its share of the prompts (``prompts[rank::world]``),
writes it to ``round-<k>/samples/rank-<r>.jsonl`` and the main process merges the shares in prompt order into
``train.jsonl``; training is the trainers' own data parallelism; the evaluation runs on the main process.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

from .config import IterateConfig, IterateConfigError, build_training_args, trainer_class
from .judge import Judge, pair_rows, unpaired_rows
from .replay import mix_rows, replay_count, replay_rows

ROUND_PREFIX = "round-"
REPORT_FILE = "report.json"
DATA_FILE = "train.jsonl"
SNAPSHOT_FILE = "iterate.json"
#: What a run whose iterate.json predates a key did (a run started before ``kto_weights`` trained with KTO's weights
#: as ``training`` set them): it resumes with that value.
BEFORE_THE_KEY_EXISTED = {"kto_weights": "none", "replay": 0.0}
#: The main process's verdict on a round's samples when they give no rows; every process reads it and raises.
ERROR_FILE = "data-error.json"
#: Settings a resumed run may change (more rounds, other threads); any other change needs a new output_dir.
RESUMABLE_CHANGES = ("rounds", "torch_num_threads")


def round_dir(output_dir: str, k: int) -> str:
    """``<output_dir>/round-<k>``."""
    return os.path.join(output_dir, f"{ROUND_PREFIX}{k}")


def completed_rounds(output_dir: str) -> list[int]:
    """The rounds 1, 2, ... whose ``report.json`` exists, up to the first one that does not."""
    done, k = [], 1
    while os.path.exists(os.path.join(round_dir(output_dir, k), REPORT_FILE)):
        done.append(k)
        k += 1
    return done


def atomic_json(path: str, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` through a temporary file and a rename: the file is whole or absent."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, default=str)
    os.replace(tmp, path)


def write_jsonl(path: str, rows: list[dict]) -> None:
    """Write rows as JSON lines, atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
    """Read JSON lines."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_snapshot(config: IterateConfig, main: bool) -> None:
    """Record the settings in ``<output_dir>/iterate.json``, or check a resumed run against them.

    Raises:
        IterateConfigError: the output directory holds a run with other settings (other than
            :data:`RESUMABLE_CHANGES`), naming the keys.
    """
    path = os.path.join(config.output_dir, SNAPSHOT_FILE)
    now = config.to_dict()
    if os.path.exists(path):
        with open(path) as f:
            before = {**BEFORE_THE_KEY_EXISTED, **json.load(f)}
        changed = sorted(k for k in set(now) | set(before) if k not in RESUMABLE_CHANGES
                         and not _same_setting(now.get(k), before.get(k)))
        if changed:
            raise IterateConfigError(
                f"{config.output_dir!r} holds an iterative run with other settings ({', '.join(changed)} differ from "
                f"{path}): resume it with the same settings, or choose another output_dir."
            )
    if main:
        os.makedirs(config.output_dir, exist_ok=True)
        atomic_json(path, now)


def _same_setting(now: Any, before: Any) -> bool:
    """A setting equals its snapshot as given (``upo://`` names and all), or resolved: a snapshot written before
    ``iterate.json`` kept ``upo://`` names holds this installation's resolved paths."""
    from ..resources import resolve_resource

    if now == before:
        return True
    try:
        return json.loads(json.dumps(resolve_resource(now), default=repr)) == before
    except (FileNotFoundError, ValueError):
        return False


def round_prompts(train_rows: list[dict], config: IterateConfig, k: int) -> list[Any]:
    """The distinct train prompts of round ``k`` (first-seen order), ``prompts_per_round`` of them drawn with a seed
    of the run's seed and the round."""
    seen, prompts = set(), []
    for row in train_rows:
        key = json.dumps(row["prompt"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            prompts.append(row["prompt"])
    if config.prompts_per_round is not None and config.prompts_per_round < len(prompts):
        prompts = random.Random(f"{config.seed}:{k}").sample(prompts, config.prompts_per_round)
    return prompts


def generation_settings(config: IterateConfig, policy: str) -> Any:
    """``GenerationSettings`` for sampling ``policy`` (``config.generation`` plus sampling on).

    Raises:
        IterateConfigError: a key GenerationSettings does not take, or a value it rejects.
    """
    import dataclasses

    from ..cli.common import did_you_mean
    from ..data import GenerationSettings

    names = [f.name for f in dataclasses.fields(GenerationSettings) if f.name != "model"]
    unknown = [k for k in config.generation if k not in names]
    if unknown:
        hints = "; ".join(f"{k!r}{did_you_mean(str(k), names)}" for k in unknown)
        raise IterateConfigError(f"`generation` has unknown key(s) {hints}; valid keys: {', '.join(names)}.")
    try:
        return GenerationSettings(model=policy, **{"do_sample": True, **config.generation})
    except ValueError as e:
        raise IterateConfigError(f"`generation`: {e}") from e


def sample_and_judge(config: IterateConfig, k: int, policy: str, prompts: list[Any], judge: Judge,
                     rank: int = 0, world: int = 1) -> tuple[list[dict], int]:
    """Sample ``samples_per_prompt`` responses of ``policy`` to this process's share of ``prompts`` and score them
    with the judge; return ``(samples, generated tokens)``. Each sample: ``prompt``, ``completion``, ``judge_score``
    and ``prompt_index`` (its prompt's position in ``prompts``, for the merge)."""
    from ..data import batch_seed, make_generator
    from ..formats import as_completion, is_conversational

    generator = make_generator(generation_settings(config, policy))
    mine = list(range(rank, len(prompts), world))
    samples, tokens = [], 0
    try:
        for b in range(0, len(mine), config.generation_batch_size):
            index = mine[b : b + config.generation_batch_size]
            batch = [prompts[i] for i in index]
            texts = generator.generate(batch, config.samples_per_prompt, batch_seed(config.seed, index[0], f"round{k}"))
            for i, p, responses in zip(index, batch, texts, strict=True):
                for text in responses:
                    tokens += len(generator.tokenizer(text, add_special_tokens=False)["input_ids"])
                    samples.append({"prompt": p, "completion": as_completion(text, is_conversational(p)),
                                    "prompt_index": i})
    finally:
        generator.release()
    if samples:
        scores = judge.score([s["prompt"] for s in samples], [s["completion"] for s in samples],
                             tokenizer=generator.tokenizer)
        for s, v in zip(samples, scores, strict=True):
            s["judge_score"] = float(v)
    return samples, tokens


def round_data(config: IterateConfig, k: int, policy: str, train_rows: list[dict], judge: Judge, state: Any) -> dict:
    """The rows round ``k`` trains on, from ``train.jsonl`` when an earlier attempt wrote it; else sampled (sharded
    over processes), judged and written, with the original rows ``replay`` adds (:mod:`trl_upo.iterate.replay`).
    Returns ``{"rows", "generated_tokens", "samples", "prompts", "accepted", "num_rows", "form"}`` and, with
    ``replay`` > 0, ``replay``, ``sampled_rows`` and ``replayed_rows``."""
    rdir = round_dir(config.output_dir, k)
    path, meta = os.path.join(rdir, DATA_FILE), os.path.join(rdir, "data.json")
    if not (os.path.exists(path) and os.path.exists(meta)):
        prompts = round_prompts(train_rows, config, k)
        samples, tokens = sample_and_judge(config, k, policy, prompts, judge, state.process_index, state.num_processes)
        shard_dir = os.path.join(rdir, "samples")
        os.makedirs(shard_dir, exist_ok=True)
        write_jsonl(os.path.join(shard_dir, f"rank-{state.process_index}.jsonl"), samples)
        atomic_json(os.path.join(shard_dir, f"rank-{state.process_index}.json"), {"generated_tokens": tokens})
        state.wait_for_everyone()
        if state.is_main_process:
            _merge(config, k, judge, shard_dir, state.num_processes, len(prompts), train_rows, path, meta)
        state.wait_for_everyone()
        raise_shared_error(rdir)  # every process stops with the main process's verdict, none waits at a barrier
    with open(meta) as f:
        info = json.load(f)
    return {"rows": read_jsonl(path), **info}


def _merge(config: IterateConfig, k: int, judge: Judge, shard_dir: str, world: int, n_prompts: int,
           train_rows: list[dict], path: str, meta: str) -> None:
    samples, tokens = [], 0
    for r in range(world):
        samples += read_jsonl(os.path.join(shard_dir, f"rank-{r}.jsonl"))
        with open(os.path.join(shard_dir, f"rank-{r}.json")) as f:
            tokens += json.load(f)["generated_tokens"]
    samples.sort(key=lambda s: s["prompt_index"])  # stable: each prompt's samples keep their order
    error = os.path.join(os.path.dirname(path), ERROR_FILE)
    if os.path.exists(error):  # an earlier attempt's verdict: this attempt decides again
        os.remove(error)
    replayed = replay_rows(train_rows, config.replay, config.form, config.seed, k)
    try:  # replayed rows give the kind (or the pairs) the judged samples may lack
        rows = (unpaired_rows(samples, judge.threshold, replayed) if config.form == "unpaired"
                else pair_rows(samples, replayed))
    except ValueError as e:  # written for every process to raise (raise_shared_error), not raised here alone
        atomic_json(error, {"error": f"{os.path.dirname(path)}: {e}", "samples": len(samples)})
        return
    n_sampled, rows = len(rows), mix_rows(rows, replayed)
    if config.form == "unpaired":
        random.Random(config.seed).shuffle(rows)  # every batch mixes prompts, labels (and sources)
    accepted = sum(s["judge_score"] >= judge.threshold for s in samples)
    write_jsonl(path, rows)
    info = {"generated_tokens": tokens, "samples": len(samples), "prompts": n_prompts, "accepted": accepted,
            "num_rows": len(rows), "form": config.form}
    if config.replay:
        info.update(replay=config.replay, sampled_rows=n_sampled, replayed_rows=len(replayed),
                    replayed_original_rows=replay_count(len(train_rows), config.replay))
    atomic_json(meta, info)


def raise_shared_error(rdir: str) -> None:
    """Raise, in every process, the error the main process recorded for round directory ``rdir`` while merging the
    samples (the judge accepted all or none of them, or no prompt gave a pair), so that no process waits at a barrier
    for a process that stopped.

    Raises:
        IterateConfigError: the recorded error, the same message in every process.
    """
    path = os.path.join(rdir, ERROR_FILE)
    if os.path.exists(path):
        with open(path) as f:
            raise IterateConfigError(json.load(f)["error"])


def last_complete_checkpoint(rdir: str) -> str | None:
    """The newest ``checkpoint-<step>`` of ``rdir`` that was written to the end (its ``trainer_state.json``, which
    transformers writes after the model, ``upo_state.json`` and the optimizer, exists); None when there is none. A
    process killed while saving leaves a newer, partial checkpoint: it is skipped."""
    import re

    steps = []
    for name in os.listdir(rdir) if os.path.isdir(rdir) else []:
        m = re.fullmatch(r"checkpoint-(\d+)", name)
        if m and os.path.isfile(os.path.join(rdir, name, "trainer_state.json")):
            steps.append(int(m[1]))
    return os.path.join(rdir, f"checkpoint-{max(steps)}") if steps else None


def train_round(config: IterateConfig, k: int, rows: list[dict], policy: str, extra: dict | None = None) -> int:
    """Train round ``k`` from ``policy`` on ``rows`` and save the model in the round's directory (resuming from its
    last checkpoint when an earlier attempt saved one); return the number of optimizer steps. ``extra``: trainer
    config fields the run sets for this round (balanced KTO weights)."""
    from datasets import Dataset

    from ..models import load_model

    rdir = round_dir(config.output_dir, k)
    args = build_training_args(config, k, rdir, extra)
    kwargs = {}
    if k > 1 and config.reference == "original":
        kwargs["ref_model"] = load_model(config.model_path)
    trainer = trainer_class(config.round_trainer(k))(model=policy, args=args, train_dataset=Dataset.from_list(rows),
                                                     **kwargs)
    checkpoint = last_complete_checkpoint(rdir)
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(rdir)
    if trainer.accelerator.is_main_process:
        trainer.processing_class.save_pretrained(rdir)
    steps = int(trainer.state.global_step)
    # Not trainer.end(): it ends the process group, which the next round (and its barriers) still uses; the command
    # ends it once, after the last round (trl_upo.cli.common.end_distributed).
    del trainer
    return steps


def _quiet(message: str) -> None:
    """The progress log of processes other than the main one."""


def run_rounds(config: IterateConfig | dict, log=print) -> list[dict]:
    """Run (or resume) the rounds of ``config`` and return every round's report.

    Args:
        config: an :class:`IterateConfig` or a mapping of its fields.
        log: where progress lines go.

    Returns:
        The ``report.json`` content of rounds 1..R (also in ``<output_dir>/rounds.json``, with the console table
        printed and the frontier plot written when matplotlib is installed).
    """
    from accelerate import PartialState

    from .report import finish_run
    from .session import Session

    if isinstance(config, dict):
        config = IterateConfig.from_dict(config)
    if config.torch_num_threads:
        import torch

        torch.set_num_threads(config.torch_num_threads)
    session = Session(config)  # every check that needs no model: data, judge, every round's trainer config
    state = PartialState()
    if not state.is_main_process:
        log = _quiet  # one process reports progress
    check_snapshot(config, state.is_main_process)
    state.wait_for_everyone()
    reports = session.load_reports(completed_rounds(config.output_dir)[: config.rounds])
    if reports:
        log(f"iterate: rounds {', '.join(str(r['round']) for r in reports)} complete in {config.output_dir}; "
            f"resuming at round {len(reports) + 1}.")
    for k in range(len(reports) + 1, config.rounds + 1):
        t0 = time.time()
        reports.append(session.run_round(k, reports[-1] if reports else None, state, log))
        log(f"iterate: round {k} done ({time.time() - t0:.0f} s).")
    if state.is_main_process:
        finish_run(config.output_dir, reports, log=log)
    return reports
