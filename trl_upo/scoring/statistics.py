"""Eq. (2)'s normalisation statistics of every head, and where they come from."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from datasets.fingerprint import Hasher

from ..atomic import atomic_write
from ..formats import DataError
from ..heads import HeadSpec, RewardHead
from .calls import reads_tokenizer
from .columns import ROLES, score_column
from .provenance import head_digest
from .shards import all_gather, current_world

logger = logging.getLogger(__name__)

#: Rows of a stream the statistics are fitted on by default (``upo_stream_stats_rows``): 2,000 responses of a
#: pair stream put a z-score's mean within about 2% of a standard deviation of the split's (standard error
#: 1/sqrt(2000)) and give the rank mode's 1,001 quantiles about two responses each; scoring them costs a second or
#: two with a model head on a GPU, far less with text heads.
DEFAULT_STREAM_ROWS = 1000


def fit_head_statistics(
    dataset: Any, specs: Sequence[HeadSpec], default_mode: str, roles: Sequence[str] = ROLES
) -> list[dict]:
    """Eq. (2) statistics of every head over the training split (the responses of all ``roles`` pooled).

    ``dataset`` is a scored ``Dataset`` or a mapping of column name to values (the rows of a stream)."""
    from ..objective import fit_normalization

    stats = []
    for spec in specs:
        values = np.concatenate(
            [np.asarray(dataset[score_column(spec.name, role)], dtype=np.float64) for role in roles]
        )
        st = fit_normalization(values, spec.normalize or default_mode)
        if st["std"] == 0 or not math.isfinite(st["std"]):
            logger.warning(
                "Reward head %r gives the same score (%s) to every response of the training split: it cannot rank "
                "responses and contributes nothing to the auxiliary reward. Check its parameters.",
                spec.name,
                st["mean"],
            )
        stats.append(st)
    return stats


#: Where statistics came from (``StatisticsSource.source``).
SOURCES = ("train_split", "stream", "score_summary", "upo_state")
#: The file ``trl-upo score --output DIR`` writes the statistics of its first split to (:func:`statistics_summary`).
STATISTICS_FILE = "upo_statistics.json"


@dataclass(frozen=True)
class StatisticsSource:
    """Where a run's normalisation statistics came from, for ``upo_state.json`` and the model card.

    Attributes:
        source: one of :data:`SOURCES`: ``"train_split"`` (fitted on the whole map-style split), ``"stream"``
            (fitted on the first ``rows`` rows of the stream), ``"score_summary"`` (read from a ``trl-upo score
            --output`` directory), ``"upo_state"`` (read from an earlier run's ``upo_state.json``).
        rows: the rows (pairs, or unpaired rows) the statistics were fitted on.
        path: the file they were read from (None when fitted in this run).
    """

    source: str
    rows: int
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``{"source", "rows", "path"}``."""
        return asdict(self)

    def describe(self) -> str:
        """One line for the model card and the log."""
        where = {"train_split": "the whole train split", "stream": "the first rows of the train stream",
                 "score_summary": "a trl-upo score summary", "upo_state": "an earlier run's upo_state.json"}
        return f"fitted on {self.rows} rows ({where[self.source]}" + (f": {self.path})" if self.path else ")")


def stream_statistics(
    stream: Any,
    heads: Sequence[RewardHead],
    specs: Sequence[HeadSpec],
    default_mode: str,
    *,
    rows: int = DEFAULT_STREAM_ROWS,
    roles: Sequence[str] = ROLES,
    tokenizer: Any = None,
    batch_size: int = 256,
    distributed: bool = False,
    **cache: Any,
) -> tuple[list[dict], StatisticsSource]:
    """The statistics of every head fitted on the first ``rows`` rows of ``stream`` (the stream before TRL shards it:
    the same rows on every rank), scored as :func:`~trl_upo.scoring.stream.score_stream` scores them.

    With ``distributed`` (a running process group), each rank scores every ``size``-th of those rows and one gather
    brings every rank all the scores, so every rank fits the same statistics. ``cache``: ``cache_dir``,
    ``use_cache`` as for :func:`~trl_upo.scoring.stream.score_stream`.

    Returns:
        ``(statistics, source)``: the statistics in :func:`fit_head_statistics`'s format, and where they came from.

    Raises:
        DataError: the stream is empty; as :func:`~trl_upo.scoring.stream.score_stream` on bad rows or scores.
    """
    from .stream import score_stream

    roles = tuple(roles)
    world = current_world(distributed)
    head_rows = stream.take(rows)
    if world.size > 1:
        head_rows = head_rows.filter(lambda _, i: i % world.size == world.rank, with_indices=True)
    scored = score_stream(head_rows, heads, specs, split="train", tokenizer=tokenizer, batch_size=batch_size,
                          roles=roles, **cache)
    columns = [score_column(s.name, r) for s in specs for r in roles]
    mine = {c: [] for c in columns}
    for row in scored:
        for c in columns:
            mine[c].append(row[c])
    parts = all_gather(world, mine)
    values = {c: _interleave([part[c] for part in parts]) for c in columns}  # the stream's order: the same sums
    n = len(values[columns[0]]) if columns else 0
    if n == 0:
        raise DataError("The train stream is empty: no rows to fit the normalisation statistics on.")
    return fit_head_statistics(values, specs, default_mode, roles), StatisticsSource("stream", n)


def _interleave(parts: list[list[float]]) -> list[float]:
    """Rank ``r`` of ``size`` held rows ``r, r + size, ...``: put them back in the stream's order."""
    out: list[float] = [0.0] * sum(len(p) for p in parts)
    for rank, part in enumerate(parts):
        out[rank :: len(parts)] = part
    return out


def statistics_summary(
    dataset: Any, heads: Sequence[RewardHead], specs: Sequence[HeadSpec], default_mode: str, *,
    roles: Sequence[str] = ROLES, tokenizer: Any = None, split: str = "train",
) -> dict[str, Any]:
    """What ``trl-upo score --output DIR`` writes to ``DIR/upo_statistics.json``: the statistics of a scored split
    and what identifies the heads that scored it (their digests: fingerprint, tokenizer, roles), so that a training
    run with the same heads can adopt them (:func:`load_statistics`) without a pass over the split."""
    roles = tuple(roles)
    return {
        "format": 1,
        "split": split,
        "rows": len(dataset[score_column(specs[0].name, roles[0])]),
        "roles": list(roles),
        "heads": [{"name": s.name, "digest": _digest(h, tokenizer, roles)} for s, h in zip(specs, heads, strict=True)],
        "statistics": fit_head_statistics(dataset, specs, default_mode, roles),
    }


def write_statistics_summary(directory: str, summary: dict[str, Any]) -> str:
    """Write ``summary`` to ``directory/upo_statistics.json`` atomically (a temporary file, then renamed)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, STATISTICS_FILE)
    with atomic_write(path) as f:
        json.dump(summary, f, indent=2)
    return path


def load_statistics(
    path: str, heads: Sequence[RewardHead], specs: Sequence[HeadSpec], default_mode: str, *,
    roles: Sequence[str] = ROLES, tokenizer: Any = None,
) -> tuple[list[dict], StatisticsSource]:
    """Statistics fitted earlier, for this run's heads: from a ``trl-upo score --output`` directory (its
    ``upo_statistics.json``) or an earlier run's output directory or checkpoint (its ``upo_state.json``); ``path``
    is the directory or the file.

    Raises:
        ValueError: there is no such file, or it was made with other heads (names, parameters, content, tokenizer
            or roles), another normalisation mode, or it is damaged; the message names the difference and the fix.
    """
    from ..state import STATE_FILE

    file = path
    if os.path.isdir(path):
        found = [os.path.join(path, f) for f in (STATISTICS_FILE, STATE_FILE) if os.path.exists(os.path.join(path, f))]
        if not found:
            raise ValueError(f"{path} has neither {STATISTICS_FILE} (written by trl-upo score --output) nor "
                             f"{STATE_FILE} (written by a training run): give the directory of one of them.")
        file = found[0]
    if not os.path.exists(file):
        raise ValueError(f"Statistics file {file} does not exist: give a trl-upo score --output directory or a run's "
                         f"output directory or checkpoint.")
    if os.path.basename(file) == STATE_FILE:
        stats, rows = _from_state(file, heads, specs), None
        source = "upo_state"
    else:
        stats, rows = _from_summary(file, heads, specs, tuple(roles), tokenizer)
        source = "score_summary"
    _check_modes(file, stats, specs, default_mode)
    if rows is None:
        rows = int(min(s.get("count", 0) for s in stats) // len(tuple(roles))) if stats else 0
    return stats, StatisticsSource(source, rows, os.path.abspath(file))


def _digest(head: RewardHead, tokenizer: Any, roles: tuple[str, ...]) -> str:
    tok_key = Hasher.hash(tokenizer) if tokenizer is not None and reads_tokenizer(head) else (
        "none" if reads_tokenizer(head) else "unused")
    return head_digest(head, tok_key, roles)


def _read_json(file: str) -> Any:
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{file} cannot be read as JSON ({e}): it is damaged or cut short; write it again.") from None


def _from_summary(file: str, heads: Sequence[RewardHead], specs: Sequence[HeadSpec], roles: tuple[str, ...],
                  tokenizer: Any) -> tuple[list[dict], int]:
    data = _read_json(file)
    if not isinstance(data, dict) or not isinstance(data.get("statistics"), list) or "heads" not in data:
        raise ValueError(f"{file} is not a trl-upo score statistics summary (no 'heads' and 'statistics').")
    saved = {h["name"]: h.get("digest") for h in data["heads"]}
    diffs = []
    if tuple(data.get("roles", ())) != roles:
        diffs.append(f"roles {data.get('roles')} in the file, {list(roles)} now")
    for spec, head in zip(specs, heads, strict=True):
        if spec.name not in saved:
            diffs.append(f"head {spec.name!r} is not in the file (it has {sorted(saved)})")
        elif saved[spec.name] != _digest(head, tokenizer, roles):
            diffs.append(f"head {spec.name!r}: other parameters, content or tokenizer than when the file was written")
    if diffs:
        raise ValueError(f"{file} was written for other reward heads than this run's: " + "; ".join(diffs)
                         + ". Score again with this run's heads (trl-upo score --output), or fit the statistics on "
                         "the stream.")
    by_name = dict(zip([h["name"] for h in data["heads"]], data["statistics"], strict=True))
    return [by_name[s.name] for s in specs], int(data.get("rows", 0))


def _from_state(file: str, heads: Sequence[RewardHead], specs: Sequence[HeadSpec]) -> list[dict]:
    from ..state import head_differences, head_identity, load_upo_state

    state = load_upo_state(os.path.dirname(file) or ".")
    if state.get("head_identity") is None:
        raise ValueError(f"{file} was written by an older trl-upo, without head identities: its statistics cannot be "
                         f"checked against this run's heads. Fit the statistics on the stream instead.")
    # The weight and the sign do not change a head's raw scores: only what decides the scores is compared.
    def scoring_part(ident: dict) -> dict:
        return {k: v for k, v in ident.items() if k not in ("weight", "higher_is_better")}

    now = [scoring_part(json.loads(json.dumps(head_identity(s, h), default=str))) for s, h in zip(specs, heads,
                                                                                                 strict=True)]
    diffs = head_differences([scoring_part(i) for i in state["head_identity"]], now)
    if diffs:
        raise ValueError(f"{file} was written by a run with other reward heads than this one's:\n  - "
                         + "\n  - ".join(diffs) + "\nUse that run's reward_heads, or fit the statistics on the stream.")
    return list(state["statistics"])


def _check_modes(file: str, stats: list[dict], specs: Sequence[HeadSpec], default_mode: str) -> None:
    for spec, st in zip(specs, stats, strict=True):
        want = spec.normalize or default_mode
        if not isinstance(st, dict) or st.get("mode") != want:
            got = st.get("mode") if isinstance(st, dict) else st
            raise ValueError(f"{file}: head {spec.name!r} was normalised with {got!r} there, this run uses {want!r} "
                             f"(upo_normalization or the head's normalize). Use the same mode, or fit the statistics "
                             f"on the stream.")
