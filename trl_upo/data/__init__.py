"""Building alignment data before preference optimisation (``trl-upo build-pairs``).

- :func:`build_rank_pairs`: score N candidate responses per prompt with reward heads or a reward model and pair the
  best against the worst (or every two above a margin), keeping the scores as columns UPO can train on directly.
- :func:`build_critique_pairs`: answer, critique under a principle, revise (Constitutional AI); the revision is the
  chosen response, the original answer the rejected one.

Both write their output in shards as they go (resumable, deterministic with a seed) and produce TRL's standard or
conversational preference format, or unpaired rows for KTO (``OutputSettings(unpaired=True)``, :func:`unpair_rows`:
the chosen answers desirable, the rejected ones undesirable). Their input, like every command's dataset, is read by :func:`load_split`
(:mod:`trl_upo.data.loading`: files, saved datasets, Hub names and ``upo://`` assets).
"""

from .critique import (
    DEFAULT_CRITIQUE_TEMPLATE,
    DEFAULT_PRINCIPLES,
    DEFAULT_REVISION_TEMPLATE,
    CritiqueConfig,
    Principle,
    build_critique_pairs,
    check_template,
)
from .generation import GenerationSettings, batch_seed, make_generator
from .io import OutputSettings, unpair_rows
from .loading import DatasetLoadError, load_split, load_splits
from .rank import (
    RankConfig,
    build_rank_pairs,
    candidate_ranks,
    column_head_specs,
    score_columns,
    select_pairs,
    within_prompt,
)

__all__ = [
    "DEFAULT_CRITIQUE_TEMPLATE",
    "DEFAULT_PRINCIPLES",
    "DEFAULT_REVISION_TEMPLATE",
    "CritiqueConfig",
    "DatasetLoadError",
    "GenerationSettings",
    "OutputSettings",
    "Principle",
    "RankConfig",
    "batch_seed",
    "build_critique_pairs",
    "build_rank_pairs",
    "candidate_ranks",
    "check_template",
    "column_head_specs",
    "load_split",
    "load_splits",
    "make_generator",
    "score_columns",
    "select_pairs",
    "unpair_rows",
    "within_prompt",
]
