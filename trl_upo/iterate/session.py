"""One iterative run's shared state: the data, the judge, the evaluation heads and the round reports; everything is
checked in the constructor, before any model loads."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from .config import IterateConfig, IterateConfigError, balanced_kto_weights, build_training_args
from .judge import Judge
from .replay import check_replay_data
from .rounds import DATA_FILE, REPORT_FILE, atomic_json, generation_settings, round_data, round_dir, train_round
from .rounds import write_jsonl


class Session:
    """The data, judge and evaluation settings of an iterative run, checked before any model loads.

    Raises (from the constructor):
        IterateConfigError: a round's trainer config, the generation settings or the judge is invalid, or the data
            has no test split.
        DatasetLoadError: the dataset cannot be loaded.
    """

    def __init__(self, config: IterateConfig) -> None:
        from ..cli.report import report_heads
        from ..data import load_splits

        self.config = config
        args = [build_training_args(config, k, round_dir(config.output_dir, k)) for k in range(1, min(config.rounds,
                                                                                                      2) + 1)]
        self.beta = float(args[0].beta)
        try:
            self.judge = Judge.from_config(config.judge) if config.rounds > 1 or config.judge else None
        except ValueError as e:
            raise IterateConfigError(f"`judge`: {e}") from e
        if config.rounds > 1:
            generation_settings(config, config.model_path)
        self.eval_heads = report_heads(args[0]) + ([self.judge.to_eval_head()] if self.judge else [])
        names = [h["name"] for h in self.eval_heads]
        if len(set(names)) != len(names):
            raise IterateConfigError(f"the judge's name {self.judge.spec.name!r} is also a reward head's name: give "
                                     f"the judge another `name`.")
        splits = load_splits(config.dataset_path)
        missing = [s for s in ("train", "test") if s not in splits]
        if missing:
            raise IterateConfigError(
                f"the dataset {config.dataset!r} has no {' or '.join(missing)} split (it has {list(splits)}): "
                f"round 1 trains on `train`, and every round is evaluated on held-out `test` rows."
            )
        self.train_rows = splits["train"].to_list()
        if config.replay and config.rounds > 1:
            check_replay_data(self.train_rows, config.form)
        self.test_rows = splits["test"].select(range(min(config.eval_num_prompts, len(splits["test"])))).to_list()
        self._reference = None

    def load_reports(self, rounds: list[int]) -> list[dict]:
        """The reports of completed rounds."""
        out = []
        for k in rounds:
            with open(os.path.join(round_dir(self.config.output_dir, k), REPORT_FILE)) as f:
                out.append(json.load(f))
        return out

    def policy(self, k: int) -> str:
        """The policy round ``k`` starts from: the original model for round 1, else round k-1's saved model."""
        return self.config.model_path if k == 1 else round_dir(self.config.output_dir, k - 1)

    def run_round(self, k: int, previous: dict | None, state: Any, log) -> dict:
        """Run round ``k`` (data, training, evaluation) and write its ``report.json`` last; return the report."""
        config, rdir = self.config, round_dir(self.config.output_dir, k)
        if state.is_main_process:
            os.makedirs(rdir, exist_ok=True)
        state.wait_for_everyone()
        policy = self.policy(k)
        if k == 1:
            rows, data = self.train_rows, {"generated_tokens": 0, "num_rows": len(self.train_rows),
                                      "source": config.dataset}
            if state.is_main_process:
                write_jsonl(os.path.join(rdir, DATA_FILE), rows)
        else:
            log(f"iterate: round {k}: sampling {config.samples_per_prompt} answers per prompt from {policy}")
            data = round_data(config, k, policy, self.train_rows, self.judge, state)
            rows = data.pop("rows")
            log(f"iterate: round {k}: {data['samples']} samples, {data['accepted']} accepted by the judge, "
                f"{data['num_rows']} {config.form} rows" + (f" ({data['replayed_rows']} of them replayed original "
                                                            f"rows)" if data.get("replayed_rows") else ""))
        extra = self.kto_weights(k, rows, data)
        before = previous["after"] if previous else (self.evaluate(policy) if state.is_main_process else None)
        t0 = time.time()
        steps = train_round(config, k, rows, policy, extra)
        report = None
        if state.is_main_process:
            after = self.evaluate(rdir)
            prev_compute = previous["compute"] if previous else {"generated_tokens": 0, "train_steps": 0}
            report = {
                "round": k,
                "before": before,
                "after": after,
                "trainer": config.round_trainer(k),
                "reference": "model" if k == 1 else config.reference,
                "evaluation_reference": config.model,
                "data": data,
                "compute": {
                    "generated_tokens": prev_compute["generated_tokens"] + data["generated_tokens"],
                    "train_steps": prev_compute["train_steps"] + steps,
                    "round_generated_tokens": data["generated_tokens"],
                    "round_train_steps": steps,
                },
                "train_seconds": round(time.time() - t0, 1),
            }
            atomic_json(os.path.join(rdir, REPORT_FILE), report)
        state.wait_for_everyone()
        if report is None:
            with open(os.path.join(rdir, REPORT_FILE)) as f:
                report = json.load(f)
        return report

    def kto_weights(self, k: int, rows: list[dict], data: dict) -> dict:
        """The KTO class weights of round ``k`` (``kto_weights``), recorded in ``data["kto_weights"]`` (the round's
        ``report.json``); returns the trainer-config fields to set (none for a DPO round or ``kto_weights: none``)."""
        config = self.config
        if config.round_trainer(k) != "kto":
            return {}
        if k > 1 and config.kto_weights == "balanced":
            data["kto_weights"] = balanced_kto_weights(rows)
            return {key: data["kto_weights"][key] for key in ("desirable_weight", "undesirable_weight")}
        args = build_training_args(config, k, round_dir(config.output_dir, k))
        n_des = sum(bool(r["label"]) for r in rows) if rows and "label" in rows[0] else None
        data["kto_weights"] = {"mode": "none" if k > 1 else "training", "desirable": n_des,
                               "undesirable": None if n_des is None else len(rows) - n_des,
                               "desirable_weight": args.desirable_weight, "undesirable_weight": args.undesirable_weight}
        return {}

    def evaluate(self, policy: str) -> dict:
        """``trl_upo.evaluation.evaluate_policy`` of ``policy`` on the test rows: the designer metrics (the reward
        heads that score text, and the judge) of sampled answers, and held-out preference accuracy with the original
        model as the reference (every round is measured against the same anchor)."""
        from ..evaluation import evaluate_policy
        from ..models import load_model

        if self._reference is None:
            self._reference = load_model(self.config.model_path)
        rows = self.test_rows
        paired = bool(rows) and {"chosen", "rejected"} <= set(rows[0])
        unpaired = bool(rows) and {"completion", "label"} <= set(rows[0])
        return evaluate_policy(
            policy,
            prompts=[r["prompt"] for r in rows],
            heads=self.eval_heads,
            pairs=rows if paired else None,
            unpaired=rows if unpaired else None,
            ref_model=self._reference,
            beta=self.beta,
            max_new_tokens=self.config.eval_max_new_tokens,
            num_samples=self.config.eval_num_samples,
            seed=self.config.seed,
        )
