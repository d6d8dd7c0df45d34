"""Iterative UPO: rounds of sampling the current policy, judging the samples, and training UPO on them.

Round 1 trains UPO (or UPO-KTO) on the user's data; round k >= 2 samples K answers per prompt from the round k-1
policy, has a preference judge (a reward model, a function or any text head) label them, builds unpaired rows
(``UPOKTOTrainer``) or best-against-worst pairs (``UPOTrainer``), trains from the round k-1 policy with the same reward
heads, and evaluates. See ``docs/iterate.md`` and ``trl-upo iterate --help``.
"""

from __future__ import annotations

from .config import IterateConfig, IterateConfigError
from .judge import Judge, pair_rows, unpaired_rows
from .report import console_table, plot_rounds, round_points
from .rounds import completed_rounds, round_dir, run_rounds

__all__ = [
    "IterateConfig",
    "IterateConfigError",
    "Judge",
    "completed_rounds",
    "console_table",
    "pair_rows",
    "plot_rounds",
    "round_dir",
    "round_points",
    "run_rounds",
    "unpaired_rows",
]
