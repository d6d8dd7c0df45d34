"""Reward-ranked pairs: for each prompt, score N candidate responses with reward heads (or a reward model) and pair
the best against the worst, or every two candidates whose scores differ by more than a margin.

The scores stay in the output as ``score_<head>_chosen`` / ``score_<head>_rejected`` columns, so a ``column`` head
(see :func:`column_head_specs`) lets UPOTrainer train on them without scoring again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..formats import DataError, as_completion, check_prompt_column, is_conversational
from ..heads import HeadSpec, RewardHead, build_head, parse_head_specs, resolve_head_class
from ..models import load_tokenizer
from ..scoring import call_head, check_finite
from .builder import check_column, check_output, run_builder, run_fingerprint
from .generation import Generator, GenerationSettings, batch_seed, make_generator
from .io import OutputSettings

logger = logging.getLogger(__name__)

PAIRINGS = ("best_vs_worst", "all_above_margin")
#: The values of ``RankConfig.normalization`` (and of a head spec's ``normalize``, read here): the same names as
#: ``UPOConfig.upo_normalization``, but computed over one prompt's candidates (see :func:`within_prompt`).
RANK_NORMALIZATIONS = ("none", "zscore", "rank")


def score_columns(head_name: str) -> tuple[str, str]:
    """The output columns holding head ``head_name``'s scores of the chosen and the rejected response."""
    return f"score_{head_name}_chosen", f"score_{head_name}_rejected"


def column_head_specs(reward_heads: Any) -> list[dict[str, Any]]:
    """``column`` head specs that read the scores a rank run stored, for ``UPOConfig(reward_heads=...)``.

    Each head keeps its name, weight, normalisation and direction; only its type becomes ``column``, so UPOTrainer
    uses the stored scores instead of loading the head (or its model) again.

    Args:
        reward_heads: the ``reward_heads`` the pairs were ranked with (spec dicts, a JSON string or HeadSpecs).
    """
    out = []
    for spec in parse_head_specs(reward_heads):
        chosen, rejected = score_columns(spec.name)
        out.append(
            {
                "name": spec.name,
                "type": "column",
                "weight": spec.weight,
                "normalize": spec.normalize,
                "higher_is_better": spec.higher_is_better,
                "params": {"chosen": chosen, "rejected": rejected},
            }
        )
    return out


@dataclass
class RankConfig:
    """Settings of a rank run. Exactly one candidate source: ``candidates_column``, ``candidate_columns`` or
    ``generation``.

    Attributes:
        reward_heads: the heads that score candidates: spec dicts as in ``UPOConfig.reward_heads`` (or a JSON string
            of them). A reward model is ``{"name": "rm", "type": "reward_model", "params": {"model": PATH}}``.
        prompt_column: the column holding prompts (strings, or message lists for conversational data).
        candidates_column: a column holding a list of N >= 2 candidate responses per row.
        candidate_columns: N >= 2 columns holding one candidate each.
        generation: generate the candidates with this model (a :class:`GenerationSettings` or a dict of its fields).
        num_candidates: N, the candidates generated per prompt (>= 2); with a candidates column, every row must
            hold exactly N when it is set.
        pairing: ``"best_vs_worst"`` (one pair per prompt) or ``"all_above_margin"`` (every two candidates whose
            ranking scores differ by more than ``margin``).
        margin: the ranking-score difference a pair must exceed (>= 0); prompts with no such pair give no pair.
        normalization: how each head's scores are put on one scale across a prompt's candidates before the weighted
            sum that ranks them, when the head's spec sets no ``normalize``: ``"none"`` (raw scores; ``margin`` is
            in the head's units), ``"zscore"`` or ``"rank"`` (the candidate's rank among the prompt's candidates,
            in [0, 1]: :func:`candidate_ranks`). These are computed per prompt, not over a dataset: ``"rank"`` here
            is not the training-time rank normalisation of ``UPOConfig.upo_normalization`` (a quantile over the
            training split, scaled to unit variance; :func:`trl_upo.objective.fit_normalization`).
        batch_size: prompts per batch (and per shard: an interruption loses at most one batch).
        seed: the run's seed; each batch samples with a seed derived from it and the batch's index.
        keep_candidates: also store every candidate (``candidates``) and its ranking score (``candidate_scores``).
        tokenizer: tokenizer (local path or Hub id) handed to heads that count tokens (``length`` with
            ``unit: tokens``); default: the generation model's tokenizer, or none when candidates come from columns.
    """

    reward_heads: Any = None
    prompt_column: str = "prompt"
    candidates_column: str | None = None
    candidate_columns: list[str] | None = None
    generation: GenerationSettings | dict | None = None
    num_candidates: int | None = None
    pairing: str = "best_vs_worst"
    margin: float = 0.0
    normalization: str = "none"
    batch_size: int = 8
    seed: int = 0
    keep_candidates: bool = False
    tokenizer: str | None = None
    head_specs: list[HeadSpec] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.head_specs = parse_head_specs(self.reward_heads)
        if not self.head_specs:
            raise ValueError(
                "rank needs at least one reward head to score candidates: reward_heads=[{'name': 'length'}] or a "
                "reward model, {'name': 'rm', 'type': 'reward_model', 'params': {'model': PATH}} (--reward_model PATH)."
            )
        for spec in self.head_specs:
            if not resolve_head_class(spec.type).needs_text:
                raise ValueError(
                    f"Reward head {spec.name!r} ({spec.type}) reads scores of existing chosen/rejected columns; rank "
                    f"scores candidate texts, so use heads that read text (length, lexicon, reward_model, ...)."
                )
        if isinstance(self.generation, dict):
            self.generation = GenerationSettings(**self.generation)
        self._check_candidate_source()
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {list(PAIRINGS)}, got {self.pairing!r}.")
        if not (isinstance(self.margin, (int, float)) and math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"margin must be a finite number >= 0, got {self.margin!r}.")
        if self.normalization not in RANK_NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {list(RANK_NORMALIZATIONS)}, got {self.normalization!r}.")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}.")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}.")

    def _check_candidate_source(self) -> None:
        """Exactly one source of N >= 2 candidates, consistent with ``num_candidates``."""
        sources = [
            name
            for name, value in (
                ("candidates_column", self.candidates_column),
                ("candidate_columns", self.candidate_columns),
                ("generation", self.generation),
            )
            if value
        ]
        if len(sources) != 1:
            raise ValueError(
                f"rank takes candidates from exactly one source: candidates_column (a list column), candidate_columns "
                f"(one column each) or generation (a model: --model); got {sources or 'none'}."
            )
        if self.num_candidates is not None and (not isinstance(self.num_candidates, int) or self.num_candidates < 2):
            raise ValueError(
                f"num_candidates must be an integer >= 2 (a pair needs two candidates), got {self.num_candidates!r}."
            )
        if self.candidate_columns is not None:
            if isinstance(self.candidate_columns, str):
                self.candidate_columns = [self.candidate_columns]
            self.candidate_columns = list(self.candidate_columns)
            if len(self.candidate_columns) < 2:
                raise ValueError(
                    f"candidate_columns needs N >= 2 columns (a pair needs two candidates), got "
                    f"{self.candidate_columns}."
                )
            if len(set(self.candidate_columns)) != len(self.candidate_columns):
                raise ValueError(f"candidate_columns lists a column twice: {self.candidate_columns}.")
            if self.num_candidates is not None and self.num_candidates != len(self.candidate_columns):
                raise ValueError(
                    f"num_candidates={self.num_candidates} but {len(self.candidate_columns)} candidate_columns."
                )
        if self.generation is not None:
            if self.num_candidates is None:
                raise ValueError("Generating candidates needs num_candidates (N >= 2 responses per prompt).")
            if not self.generation.do_sample:
                raise ValueError(
                    "Generating several candidates per prompt needs sampling (do_sample=True): greedy decoding gives "
                    "the same response N times."
                )

    def output_columns(self) -> list[str]:
        """The columns a rank run adds to the passed-through input columns."""
        cols = ["prompt", "chosen", "rejected", "score_chosen", "score_rejected"]
        for spec in self.head_specs:
            cols += list(score_columns(spec.name))
        if self.keep_candidates:
            cols += ["candidates", "candidate_scores"]
        return cols

    def column_head_specs(self) -> list[dict[str, Any]]:
        """``column`` head specs reading this run's stored scores (see :func:`column_head_specs`)."""
        return column_head_specs([s.to_dict() | {"params": s.params} for s in self.head_specs])


def candidate_ranks(scores: np.ndarray) -> np.ndarray:
    """The ranks of one prompt's candidates, scaled to [0, 1] (lowest score 0, highest 1; ties share their mean rank).

    This is what ``"rank"`` means in a rank run (``RankConfig.normalization``, or a head spec's ``normalize`` read
    by the rank builder): an order among the N candidates of one prompt. It is not the training-time ``"rank"``
    normalisation of ``UPOConfig.upo_normalization`` (:func:`trl_upo.objective.fit_normalization`), which maps a
    score to its quantile over the whole training split and scales it to mean 0, variance 1; the two share the user
    value ``"rank"`` and nothing else.

    Args:
        scores: one head's scores of N >= 2 candidates.

    Returns:
        ``(N,)`` float64 array in [0, 1].
    """
    order = scores.argsort(kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(len(scores), dtype=np.float64)
    for value in np.unique(scores):
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    return ranks / (len(scores) - 1)


def within_prompt(scores: np.ndarray, mode: str) -> np.ndarray:
    """One head's scores of one prompt's candidates on the ranking scale.

    Args:
        scores: the head's raw scores of the prompt's N candidates.
        mode: ``"none"`` (raw), ``"zscore"`` (standardised over these candidates; a constant head gives 0) or
            ``"rank"`` (:func:`candidate_ranks`, in [0, 1]). Computed over the prompt's candidates only: the same
            names as ``UPOConfig.upo_normalization`` (dataset-level statistics, for training), not the same maths.

    Returns:
        ``(N,)`` array.
    """
    if mode == "none":
        return scores
    if mode == "zscore":
        std = scores.std()
        return np.zeros_like(scores) if std == 0 else (scores - scores.mean()) / std
    return candidate_ranks(scores)


def select_pairs(agg: np.ndarray, pairing: str, margin: float) -> list[tuple[int, int]]:
    """(chosen, rejected) candidate indices from one prompt's ranking scores.

    ``best_vs_worst``: the first highest against the last lowest, if they differ by more than ``margin``.
    ``all_above_margin``: every (i, j) with ``agg[i] - agg[j] > margin``, in candidate order.
    """
    if pairing == "best_vs_worst":
        best = int(np.argmax(agg))
        worst = len(agg) - 1 - int(np.argmin(agg[::-1]))
        return [(best, worst)] if agg[best] - agg[worst] > margin else []
    pairs = []
    for i in range(len(agg)):
        for j in range(i + 1, len(agg)):
            if agg[i] - agg[j] > margin:
                pairs.append((i, j))
            elif agg[j] - agg[i] > margin:
                pairs.append((j, i))
    return pairs


def _check_candidates(dataset: Any, config: RankConfig, conversational: bool) -> None:
    wanted = [config.candidates_column] if config.candidates_column else list(config.candidate_columns or [])
    for col in wanted:
        check_column(dataset, col, "candidate")

    def check_one(value: Any, row: int, col: str) -> None:
        if isinstance(value, str):
            return
        if is_conversational(value):
            if not conversational:
                raise DataError(
                    f"Row {row}, column {col!r}: a conversational candidate (message list) with a standard (string) "
                    f"prompt; use one format for prompts and responses."
                )
            return
        raise DataError(
            f"Row {row}, column {col!r}: a candidate must be a string or a list of messages, got {value!r}."
        )

    if config.candidates_column:
        for i, value in enumerate(dataset[config.candidates_column]):
            if not isinstance(value, (list, tuple)) or is_conversational(value):
                raise DataError(
                    f"Row {i}: candidates_column {config.candidates_column!r} must hold a list of N >= 2 responses per "
                    f"row, got {value!r}. For one response per column use candidate_columns."
                )
            if len(value) < 2:
                raise DataError(
                    f"Row {i}: {len(value)} candidate(s) in {config.candidates_column!r}; a pair needs N >= 2. Remove "
                    f"the row or add candidates."
                )
            if config.num_candidates is not None and len(value) != config.num_candidates:
                raise DataError(
                    f"Row {i}: {len(value)} candidates in {config.candidates_column!r}, but num_candidates="
                    f"{config.num_candidates}. Unset num_candidates to take every row's candidates as they are."
                )
            for v in value:
                check_one(v, i, config.candidates_column)
    else:
        for col in wanted:
            for i, value in enumerate(dataset[col]):
                check_one(value, i, col)


def build_rank_pairs(
    dataset: Any,
    config: RankConfig,
    output: OutputSettings | None = None,
    *,
    on_batch: Callable[[int], None] | None = None,
) -> Any:
    """Build reward-ranked preference pairs.

    Everything about the input is checked before a model is loaded: the prompt column, the candidates (N >= 2), and
    input columns the output would overwrite.

    Args:
        dataset: a ``datasets.Dataset`` with a prompt column (and the candidates, unless they are generated).
        config: the run's settings.
        output: where to write the pairs (and the shards that make the run resumable); None keeps the shards in a
            temporary directory and only returns the dataset.
        on_batch: called with each batch's index once it is stored.

    Returns:
        A ``Dataset`` with ``prompt``, ``chosen``, ``rejected``, the ranking scores ``score_chosen`` /
        ``score_rejected``, every head's ``score_<head>_chosen`` / ``score_<head>_rejected``, and the other input
        columns.
    """
    conversational = check_prompt_column(dataset, config.prompt_column)
    if config.candidates_column or config.candidate_columns:
        _check_candidates(dataset, config, conversational)
    passthrough = check_output(
        dataset,
        output,
        consumed={config.prompt_column, config.candidates_column, *(config.candidate_columns or [])},
        produced=config.output_columns(),
        hint=", or rank them as candidate_columns",
    )
    heads = _load_heads(config, passthrough, dataset.column_names)
    generator = make_generator(config.generation) if config.generation is not None else None
    tokenizer = _heads_tokenizer(config, generator)
    no_pair: list[int] = []  # per batch of this run: prompts whose candidates all tie within the margin

    def process(rows: list[dict[str, Any]], b: int, start: int) -> list[dict[str, Any]]:
        prompts = [r[config.prompt_column] for r in rows]
        cands = _candidates(config, generator, rows, prompts, b, conversational)
        raw = _score(config, heads, tokenizer, rows, prompts, cands, passthrough, start)
        out, skipped = _pairs(config, rows, prompts, cands, raw, passthrough)
        no_pair.append(skipped)
        return out

    def summary() -> None:
        if sum(no_pair):
            logger.warning(
                "%d of the %d prompts ranked in this run gave no pair: all their candidates' ranking scores were "
                "within margin=%s of each other.",
                sum(no_pair),
                min(len(dataset), len(no_pair) * config.batch_size),
                config.margin,
            )

    return run_builder(
        dataset,
        output,
        fingerprint=_fingerprint(dataset, config, heads),
        batch_size=config.batch_size,
        process=process,
        desc="Ranking candidates",
        on_batch=on_batch,
        release=[*heads, generator],
        summary=summary,
    )


def _load_heads(config: RankConfig, passthrough: list[str], columns: list[str]) -> list[RewardHead]:
    """Build the heads, check the columns they read, and load model heads now, so that a wrong model id fails before
    anything is generated."""
    heads = [build_head(spec) for spec in config.head_specs]
    for head, spec in zip(heads, config.head_specs, strict=True):
        missing = [c for c in head.required_columns() if c not in passthrough]
        if missing:
            raise DataError(
                f"Reward head {spec.name!r} ({spec.type}) reads column(s) {missing}, which the dataset does not have "
                f"(besides the prompt and candidates). Columns: {columns}."
            )
    for head in heads:
        head.load()
    return heads


def _heads_tokenizer(config: RankConfig, generator: Generator | None) -> Any:
    """The tokenizer handed to the heads: ``config.tokenizer``, else the generation model's, else None."""
    if config.tokenizer is not None:
        return load_tokenizer(config.tokenizer, hint="Check RankConfig.tokenizer (--tokenizer).")
    return generator.tokenizer if generator is not None else None


def _candidates(
    config: RankConfig, generator: Generator | None, rows: list[dict], prompts: list[Any], b: int, conversational: bool
) -> list[list[Any]]:
    """Every prompt's candidates, generated (with batch ``b``'s seed) or read; strings become assistant messages in
    conversational data."""
    if generator is not None:
        texts = generator.generate(prompts, config.num_candidates, batch_seed(config.seed, b, "candidates"))
        cands = [[as_completion(t, conversational) for t in ts] for ts in texts]
    elif config.candidates_column:
        cands = [list(r[config.candidates_column]) for r in rows]
    else:
        cands = [[r[c] for c in config.candidate_columns] for r in rows]
    if conversational:
        cands = [[as_completion(c, True) if isinstance(c, str) else c for c in cs] for cs in cands]
    return cands


def _score(
    config: RankConfig,
    heads: list[RewardHead],
    tokenizer: Any,
    rows: list[dict],
    prompts: list[Any],
    cands: list[list[Any]],
    passthrough: list[str],
    start: int,
) -> np.ndarray:
    """``(heads, candidates)`` raw scores of one batch's candidates (flattened in row order), all finite."""
    owner = [i for i, cs in enumerate(cands) for _ in cs]
    first = {i: owner.index(i) for i in set(owner)}
    flat = [c for cs in cands for c in cs]
    columns = {c: [rows[i][c] for i in owner] for c in passthrough}
    what = f"candidates of rows {start}..{start + len(rows) - 1}"

    def label(idx: tuple[int, ...]) -> str:
        k = idx[0]
        return f"candidate {k - first[owner[k]]} of row {start + owner[k]}"

    raw = np.empty((len(heads), len(flat)), dtype=np.float64)
    for h, (head, spec) in enumerate(zip(heads, config.head_specs, strict=True)):
        raw[h] = call_head(
            head, spec.name, [prompts[i] for i in owner], flat, columns=columns, tokenizer=tokenizer, what=what
        )
        check_finite(raw[h], spec.name, f"the {what}", label)
    return raw


def _pairs(
    config: RankConfig,
    rows: list[dict],
    prompts: list[Any],
    cands: list[list[Any]],
    raw: np.ndarray,
    passthrough: list[str],
) -> tuple[list[dict[str, Any]], int]:
    """The output rows of one batch, and how many of its prompts gave no pair."""
    out_rows = []
    skipped = 0
    offset = 0
    for i, (row, cs) in enumerate(zip(rows, cands, strict=True)):
        block = raw[:, offset : offset + len(cs)]
        offset += len(cs)
        agg = np.zeros(len(cs))
        for h, spec in enumerate(config.head_specs):
            sign = 1.0 if spec.higher_is_better else -1.0
            agg += spec.weight * sign * within_prompt(block[h], spec.normalize or config.normalization)
        pairs = select_pairs(agg, config.pairing, config.margin)
        skipped += not pairs
        for ci, ri in pairs:
            out = {"prompt": prompts[i], "chosen": cs[ci], "rejected": cs[ri]}
            out["score_chosen"], out["score_rejected"] = float(agg[ci]), float(agg[ri])
            for h, spec in enumerate(config.head_specs):
                col_c, col_r = score_columns(spec.name)
                out[col_c], out[col_r] = float(block[h, ci]), float(block[h, ri])
            if config.keep_candidates:
                out["candidates"], out["candidate_scores"] = cs, [float(x) for x in agg]
            out.update({c: row[c] for c in passthrough})
            out_rows.append(out)
    return out_rows, skipped


def _fingerprint(dataset: Any, config: RankConfig, heads: list[RewardHead]) -> str:
    settings = {k: v for k, v in asdict(config).items() if k not in ("reward_heads", "head_specs", "generation")}
    settings["generation"] = config.generation.to_dict() if config.generation is not None else None
    settings["heads"] = [[s.to_dict(), h.fingerprint()] for s, h in zip(config.head_specs, heads, strict=True)]
    return run_fingerprint("rank", settings, dataset)
