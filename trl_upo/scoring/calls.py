"""Calling a reward head and checking its answer: the one place every scorer goes through (training-time scoring of
a dataset or a stream, the data builders, evaluation), so a head's errors read the same everywhere."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..formats import DataError
from ..heads import HeadSpec, RewardHead
from ..heads._hf import LazyModelMixin
from .columns import ROLES


def reads_tokenizer(head: RewardHead) -> bool:
    """Whether the head may read the trainer's tokenizer, which then keys its cached and recorded scores: a head's
    ``reads_tokenizer`` attribute when it has one; else False for model heads (they bring their own tokenizer) and
    True for any other head."""
    declared = getattr(head, "reads_tokenizer", None)
    if declared is not None:
        return bool(declared)
    return not isinstance(head, LazyModelMixin)


def call_head(
    head: RewardHead,
    name: str,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    role: str = "chosen",
    columns: dict[str, list[Any]] | None = None,
    tokenizer: Any = None,
    what: str = "responses",
) -> np.ndarray:
    """Score ``completions`` with ``head``: the one place where a head is called and its answer checked.

    Every caller (training-time scoring, the data builders, evaluation) goes through here, so a head's errors read
    the same everywhere.

    Args:
        head: the reward head.
        name: the head's name in messages (its spec name).
        prompts: the prompts, aligned with ``completions``.
        completions: the responses to score.
        role: passed to :meth:`~trl_upo.heads.RewardHead.score`.
        columns: the other dataset columns of these rows, by name.
        tokenizer: passed to the head.
        what: what is being scored, for messages (``"chosen responses of the train dataset (rows 0..)"``).

    Returns:
        ``float64`` array of ``len(completions)`` scores; a ``None`` from the head is NaN (callers reject non-finite
        scores with :func:`check_finite`, naming the rows).

    Raises:
        ValueError: the head raised ValueError (re-raised naming the head and ``what``), or returned a wrong number
            of scores. Other exceptions get a note naming the head and ``what``.
    """
    try:
        values = head.score(prompts, completions, role=role, columns=columns or {}, tokenizer=tokenizer)
    except ValueError as e:
        raise ValueError(f"Reward head {name!r} failed on the {what}: {e}") from e
    except Exception as e:
        e.add_note(f"(while reward head {name!r} scored the {what})")
        raise
    values = list(values)
    if len(values) != len(completions):
        raise ValueError(
            f"Reward head {name!r} returned {len(values)} scores for {len(completions)} {what}; it must return one "
            f"per response."
        )
    return np.array([float("nan") if v is None else float(v) for v in values], dtype=np.float64)


def check_finite(scores: np.ndarray, name: str, where: str, label: Any = None) -> None:
    """Reject non-finite scores, naming the head, where they came from and up to five of them.

    Args:
        scores: the scores, any shape.
        name: the head's name.
        where: where the scores came from (``"the train dataset"``).
        label: ``label(index_tuple) -> str`` names one score in the message (default: its index).

    Raises:
        ValueError: some score is NaN or infinite. UPO never drops a response silently.
    """
    bad = ~np.isfinite(scores)
    if not bad.any():
        return
    label = label or (lambda idx: f"index {idx[0] if len(idx) == 1 else idx}")
    examples = ", ".join(f"{label(idx)}={scores[idx]}" for idx in list(zip(*np.nonzero(bad)))[:5])
    raise DataError(
        f"Reward head {name!r} gave {int(bad.sum())} non-finite score(s) on {where} ({examples}). UPO never drops "
        f"responses silently: fix the head or the data (a None from a reward function is read as NaN), or remove "
        f"those rows from the data."
    )


def score_batch(
    head: RewardHead,
    spec: HeadSpec,
    batch: dict[str, list],
    start: int,
    split: str,
    tokenizer: Any,
    roles: tuple[str, ...] = ROLES,
) -> list[list[float]]:
    """Score the responses of each role (chosen, rejected; or completion) of one batch of rows (``start`` is the first
    row's index); one list of scores per role."""
    columns = {k: v for k, v in batch.items() if k not in ("prompt", *roles)}
    result = []
    for role in roles:
        what = f"{role} responses of the {split} dataset (rows {start}..)"
        scores = call_head(
            head, spec.name, batch["prompt"], batch[role], role=role, columns=columns, tokenizer=tokenizer, what=what
        )
        result.append(scores.tolist())
    return result
