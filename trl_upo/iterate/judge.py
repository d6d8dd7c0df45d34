"""The preference judge of rounds >= 2, and the rows it makes from a round's samples.

A judge is a reward-head spec (a ``function``, a ``reward_model``, a ``classifier``, or any head that scores text)
plus a ``threshold``. It is called through ``trl_upo.scoring.call_head``, as training and evaluation call heads, so a
judge fails with the same messages. Two data forms:

- unpaired (:func:`unpaired_rows`): every sample is a row, ``label`` True when the judge accepts it (score >=
  threshold); the form ``UPOKTOTrainer`` trains on.
- pairs (:func:`pair_rows`): per prompt, the sample the judge scores highest (chosen) against the one it scores lowest
  (rejected); a prompt whose samples all score the same gives no pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: The judge's name when its spec gives none: the column of the judge's scores in a round's data and the designer
#: metric of the judge in each round's report.
JUDGE_NAME = "judge"


@dataclass
class Judge:
    """A reward head used as the preference judge.

    Attributes:
        spec: the head's ``HeadSpec``.
        threshold: a sample is accepted (desirable) when its score is >= this.
    """

    spec: Any
    threshold: float = 0.5

    @classmethod
    def from_config(cls, value: dict[str, Any]) -> Judge:
        """Parse ``{type, params, name, higher_is_better, threshold}`` (a head spec plus ``threshold``).

        Raises:
            ValueError: no judge given, a spec the head registry rejects (unknown type or key, with a suggestion), a
                head that cannot score generated text (``column``), or a non-numeric threshold.
        """
        from ..evaluation import text_head_specs

        if not value:
            raise ValueError(
                "no `judge`: rounds >= 2 need a preference judge, a head spec with a threshold, e.g. "
                "{type: function, params: {function: my_module:accepts}, threshold: 0.5}, or "
                "{type: reward_model, params: {model: <path>}, threshold: 0.0}."
            )
        from ..resources import resolve_resource

        value = resolve_resource(dict(value))  # upo://<asset> in the judge's params: this installation's path
        threshold = value.pop("threshold", 0.5)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not np.isfinite(threshold):
            raise ValueError(f"judge.threshold must be a finite number, got {threshold!r}.")
        value.setdefault("name", JUDGE_NAME)
        (spec,) = text_head_specs([value])
        return cls(spec, float(threshold))

    def to_eval_head(self) -> dict[str, Any]:
        """The judge as an evaluation head spec (its mean score on sampled answers goes in each report)."""
        return self.spec.to_dict()

    def score(self, prompts: list[Any], completions: list[Any], tokenizer: Any = None) -> np.ndarray:
        """The judge's scores of ``completions`` (in the data's format: strings, or assistant message lists for
        conversational prompts); higher is better: negated for ``higher_is_better: false``), checked finite."""
        from ..heads import build_head
        from ..scoring import call_head, check_finite

        texts = list(completions)
        head = build_head(self.spec)
        try:
            scores = call_head(head, self.spec.name, prompts, texts, tokenizer=tokenizer,
                               what="samples of the current policy")
        finally:
            head.release()
        check_finite(scores, self.spec.name, "the samples of the current policy",
                     lambda idx: f"sample {texts[idx[0]]!r}")
        return scores if self.spec.higher_is_better else -scores


def unpaired_rows(samples: list[dict[str, Any]], threshold: float,
                  alongside: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Samples ``{prompt, completion, judge_score}`` -> ``UPOKTOTrainer`` rows with ``label`` = score >= threshold.
    ``alongside``: labelled rows the round trains on too (replayed original rows): they count as either kind.

    Raises:
        ValueError: the judge accepted every sample or none, and ``alongside`` lacks the missing kind: KTO's objective
            needs both kinds, and the message says how to get them (more samples, another threshold).
    """
    rows = [{**s, "label": bool(s["judge_score"] >= threshold)} for s in samples]
    accepted = sum(r["label"] for r in rows)
    kinds = {r["label"] for r in rows} | {bool(r["label"]) for r in alongside}
    if len(kinds) < 2:
        kind = "none" if accepted == 0 else "all"
        raise ValueError(
            f"the judge accepted {kind} of the {len(rows)} samples (threshold {threshold}): unpaired rows need "
            f"desirable and undesirable ones. Change judge.threshold, sample more (samples_per_prompt, "
            f"generation.temperature), use form: pairs, or replay the original rows (replay: 1.0)."
        )
    return rows


def pair_rows(samples: list[dict[str, Any]], alongside: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Samples ``{prompt, completion, judge_score}`` -> one pair per prompt: best (chosen) against worst (rejected)
    by the judge (the first of equal scores, in sampling order); prompts whose samples all score the same give none.
    ``alongside``: pairs the round trains on too (replayed original pairs).

    Raises:
        ValueError: no prompt gave a pair (the judge scored every prompt's samples equally) and ``alongside`` is
            empty.
    """
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        by_prompt.setdefault(repr(s["prompt"]), []).append(s)
    rows = []
    for group in by_prompt.values():
        scores = np.array([s["judge_score"] for s in group])
        best, worst = int(scores.argmax()), int(scores.argmin())
        if scores[best] == scores[worst]:
            continue
        rows.append({"prompt": group[best]["prompt"], "chosen": group[best]["completion"],
                     "rejected": group[worst]["completion"], "judge_score_chosen": float(scores[best]),
                     "judge_score_rejected": float(scores[worst])})
    if not rows and not alongside:
        raise ValueError(
            f"the judge scored all samples of each of the {len(by_prompt)} prompts equally: no preference pair. "
            f"Sample more per prompt (samples_per_prompt, generation.temperature), or use a judge with finer scores."
        )
    return rows
