"""Replaying the original preference data in rounds >= 2 (``IterateConfig.replay``).

Rounds >= 2 train on the current policy's own judged samples; the policy drifts from the data's preference signal as
it does (docs/iterate.md: the held-out accuracy falls). With ``replay: f`` > 0 each round >= 2 also trains on a share
``f`` of the original train rows (round 1's data): ``f * N`` of the ``N`` rows (rounded half up, at least 1), all
of them for ``f = 1``, drawn without replacement with a seed of the run's seed and the round. In the unpaired form
(KTO) each original pair gives two rows, the chosen answer desirable (``label`` True) and the rejected one
undesirable; original unpaired rows are replayed as they are. In the pairs form the pairs are replayed as they are.

The round's ``train.jsonl`` holds exactly what the round trains on: every row carries ``source`` (``sample``: the
policy's judged sample; ``replay``: an original row) and every row has the same columns (a column one kind lacks is
None: ``judge_score`` of a replayed row). Only the columns the trainer reads are replayed (``prompt`` and ``chosen`` /
``rejected``, or ``completion`` / ``label``); other columns of the original data are not carried into rounds >= 2.

The unpaired form does not go through :func:`trl_upo.data.io.unpair_rows`: that function skips a (prompt, answer,
label) row an earlier pair already gave, so the replayed count would depend on the data's repeats (up to 5 of 800
rows on the sweep's length data); here every pair gives its two rows, as the DPO round trained on every pair.
"""

from __future__ import annotations

import random
from typing import Any

from .config import IterateConfigError

#: The column that marks where a row of a round >= 2 with ``replay`` > 0 comes from.
SOURCE = "source"
SAMPLE, REPLAY = "sample", "replay"


def data_kind(rows: list[dict]) -> str | None:
    """``paired`` (prompt, chosen, rejected), ``unpaired`` (prompt, completion, label) or None (neither)."""
    keys = set(rows[0]) if rows else set()
    if {"prompt", "chosen", "rejected"} <= keys:
        return "paired"
    if {"prompt", "completion", "label"} <= keys:
        return "unpaired"
    return None


def check_replay_data(train_rows: list[dict], form: str) -> None:
    """Check that the original rows can be replayed in rounds of ``form``.

    Raises:
        IterateConfigError: the rows are neither pairs nor unpaired rows with explicit prompts, or they are unpaired
            and ``form`` is ``pairs`` (an unpaired row has no pair to replay).
    """
    kind = data_kind(train_rows)
    if kind is None:
        raise IterateConfigError(
            f"`replay` needs train rows with `prompt`, `chosen` and `rejected` (or `prompt`, `completion` and "
            f"`label`); the dataset's train rows have {sorted(train_rows[0]) if train_rows else 'no rows'}. Set "
            f"`replay: 0`, or give the data explicit prompts."
        )
    if kind == "unpaired" and form == "pairs":
        raise IterateConfigError(
            "`replay` with `form: pairs` replays the original pairs, and the dataset's train rows are unpaired "
            "(completion, label): use `form: unpaired`, or set `replay: 0`."
        )


def replay_count(n_rows: int, fraction: float) -> int:
    """The number of original rows replayed per round: ``fraction * n_rows`` rounded half up, at least 1 when
    ``fraction`` > 0, at most ``n_rows``."""
    if fraction <= 0 or n_rows == 0:
        return 0
    return min(n_rows, max(1, int(fraction * n_rows + 0.5)))


def replay_rows(train_rows: list[dict], fraction: float, form: str, seed: int, k: int) -> list[dict[str, Any]]:
    """The original rows round ``k`` replays, in the round's ``form``, each marked ``source: replay``: a share
    ``fraction`` of ``train_rows`` (:func:`replay_count`; all of them in their order for 1, else drawn with the seed
    ``"<seed>:replay:<k>"``); a pair gives two rows in the unpaired form.

    Raises:
        IterateConfigError: rows that cannot be replayed in ``form`` (:func:`check_replay_data`).
    """
    n = replay_count(len(train_rows), fraction)
    if n == 0:
        return []
    check_replay_data(train_rows, form)
    chosen = train_rows if n == len(train_rows) else random.Random(f"{seed}:replay:{k}").sample(train_rows, n)
    if data_kind(train_rows) == "unpaired":
        return [{"prompt": r["prompt"], "completion": r["completion"], "label": bool(r["label"]), SOURCE: REPLAY}
                for r in chosen]
    if form == "pairs":
        return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], SOURCE: REPLAY}
                for r in chosen]
    out = []
    for r in chosen:
        out.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True, SOURCE: REPLAY})
        out.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False, SOURCE: REPLAY})
    return out


def mix_rows(sampled: list[dict], replayed: list[dict]) -> list[dict]:
    """``sampled`` (marked ``source: sample``) then ``replayed``, every row with every column of either (None where a
    row has none): ``datasets`` builds its columns from the rows, and a column one kind lacks must not vanish. With
    nothing replayed, ``sampled`` unchanged (no ``source`` column: the rows of a run without replay)."""
    if not replayed:
        return sampled
    rows = [{**r, SOURCE: SAMPLE} for r in sampled] + replayed
    columns = list(dict.fromkeys(key for r in rows for key in r))
    return [{key: r.get(key) for key in columns} for r in rows]
