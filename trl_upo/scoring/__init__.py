"""Scoring preference data with reward heads (step 1 of the objective): the public names, re-exported.

- :mod:`~trl_upo.scoring.columns`: the response roles, the score column names, the implicit prompt.
- :mod:`~trl_upo.scoring.calls`: calling a head and checking its scores (one place for every caller).
- :mod:`~trl_upo.scoring.dataset`: scoring a map-style dataset (cache, provenance, several processes).
- :mod:`~trl_upo.scoring.stream`: scoring an ``IterableDataset`` lazily, batch by batch, as it is read.
- :mod:`~trl_upo.scoring.statistics`: the normalisation statistics and where they come from.
- :mod:`~trl_upo.scoring.rows`: row keys made from the shards (the same-rows check, provenance row digests).
- :mod:`~trl_upo.scoring.cache`, :mod:`~trl_upo.scoring.provenance`, :mod:`~trl_upo.scoring.shards`: the score
  cache, the recorded-scores column, splitting work across processes.
"""

from .cache import default_cache_dir
from .calls import call_head, check_finite, reads_tokenizer, score_batch
from .columns import RESPONSE_COLUMNS, ROLES, UNPAIRED_ROLES, ensure_prompt, score_column
from .dataset import PARALLEL_BLOCK, ScoreReport, score_dataset
from .provenance import PROVENANCE_COLUMN, head_digest, recorded_scores, row_digests
from .statistics import (
    DEFAULT_STREAM_ROWS,
    SOURCES,
    STATISTICS_FILE,
    StatisticsSource,
    fit_head_statistics,
    load_statistics,
    statistics_summary,
    stream_statistics,
    write_statistics_summary,
)
from .stream import RankShare, rank_share, score_stream

__all__ = [
    "DEFAULT_STREAM_ROWS",
    "SOURCES",
    "STATISTICS_FILE",
    "StatisticsSource",
    "load_statistics",
    "score_stream",
    "RankShare",
    "rank_share",
    "statistics_summary",
    "stream_statistics",
    "write_statistics_summary",
    "PARALLEL_BLOCK",
    "PROVENANCE_COLUMN",
    "RESPONSE_COLUMNS",
    "ROLES",
    "UNPAIRED_ROLES",
    "ScoreReport",
    "call_head",
    "check_finite",
    "default_cache_dir",
    "ensure_prompt",
    "fit_head_statistics",
    "head_digest",
    "reads_tokenizer",
    "recorded_scores",
    "row_digests",
    "score_batch",
    "score_column",
    "score_dataset",
]
