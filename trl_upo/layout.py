"""The per-row values a UPO step reads from the reward heads, by name.

Every response of a row (its *roles*: ``chosen`` and ``rejected`` for preference pairs, ``completion`` for unpaired
rows) carries, for ``K`` heads, ``K`` raw scores, ``K`` normalised scores (eq. 2) and one auxiliary reward r_aux
(eq. 3). They travel together as one float64 row (a dataset column, then a batch tensor, then one gathered tensor):
:class:`ValueLayout` is the one place that says which column is which and what each is called in the logs. The
collator, both trainer adapters, the logging and the metric table of ``docs/metrics.md`` read it; nothing else
computes a column index.

Column order: the raw scores of every head for each role in turn, then the normalised scores in the same order,
then r_aux of each role. Example, heads ``a, b``, pairs::

    upo/a/chosen  upo/b/chosen  upo/a/rejected  upo/b/rejected            raw        (eq. 1)
    upo/a/chosen_norm  upo/b/chosen_norm  upo/a/rejected_norm  ...        normalised (eq. 2)
    upo/reward_aux/chosen  upo/reward_aux/rejected                        r_aux      (eq. 3)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .scoring import ROLES, UNPAIRED_ROLES

#: The prefix of every metric UPO logs.
PREFIX = "upo/"


@dataclass(frozen=True)
class ValueLayout:
    """Where each per-row value sits, and its metric name.

    Args:
        head_names: the reward heads, in config order.
        roles: the responses of a row (:data:`ROLES` or :data:`UNPAIRED_ROLES`).
    """

    head_names: tuple[str, ...]
    roles: tuple[str, ...] = ROLES

    @classmethod
    def of(cls, head_names: Sequence[str], roles: Sequence[str] = ROLES) -> ValueLayout:
        """The layout of ``head_names`` (any sequence) for ``roles``."""
        return cls(tuple(head_names), tuple(roles))

    @property
    def width(self) -> int:
        """The number of values per row: ``(2K + 1)`` per role."""
        return (2 * len(self.head_names) + 1) * len(self.roles)

    def raw_index(self, head: str, role: str) -> int:
        """The column of ``head``'s raw score of the ``role`` response."""
        return self.roles.index(role) * len(self.head_names) + self.head_names.index(head)

    def norm_index(self, head: str, role: str) -> int:
        """The column of ``head``'s normalised score of the ``role`` response."""
        return len(self.head_names) * len(self.roles) + self.raw_index(head, role)

    def reward_aux_index(self, role: str) -> int:
        """The column of r_aux of the ``role`` response."""
        return 2 * len(self.head_names) * len(self.roles) + self.roles.index(role)

    @property
    def columns(self) -> list[str]:
        """The metric name of every column, in column order."""
        names = [""] * self.width
        for role in self.roles:
            for head in self.head_names:
                names[self.raw_index(head, role)] = f"{PREFIX}{head}/{role}"
                names[self.norm_index(head, role)] = f"{PREFIX}{head}/{role}_norm"
            names[self.reward_aux_index(role)] = f"{PREFIX}reward_aux/{role}"
        return names

    @property
    def log_order(self) -> list[str]:
        """The order the value metrics are logged in: head by head (raw, then normalised, role by role), then r_aux."""
        per_head = [f"{PREFIX}{h}/{part}" for h in self.head_names for part in (*self.roles, *self._norm_parts)]
        return per_head + [f"{PREFIX}reward_aux/{r}" for r in self.roles]

    @property
    def _norm_parts(self) -> tuple[str, ...]:
        return tuple(f"{r}_norm" for r in self.roles)

    def reward_aux(self, rows: torch.Tensor, role: str) -> torch.Tensor:
        """``(N,)`` r_aux of the ``role`` responses of ``(N, >= width)`` rows."""
        return rows[:, self.reward_aux_index(role)]

    def assemble(self, raw: dict[str, torch.Tensor], norm: dict[str, torch.Tensor], r_aux: dict[str, torch.Tensor]):
        """The ``(N, width)`` rows from per-role ``(N, K)`` raw and normalised scores and ``(N,)`` r_aux."""
        parts = [raw[r] for r in self.roles] + [norm[r] for r in self.roles] + [r_aux[r][:, None] for r in self.roles]
        return torch.cat(parts, dim=1)

    def metric_table(self) -> list[tuple[str, str]]:
        """``(metric name, meaning)`` of every value, in log order: the rows of ``docs/metrics.md``'s value table."""
        meaning: dict[str, Any] = {}
        for head in self.head_names:
            for role in self.roles:
                meaning[f"{PREFIX}{head}/{role}"] = f"mean raw score of head {head} on the {role} responses"
                meaning[f"{PREFIX}{head}/{role}_norm"] = f"mean normalised score of head {head} on the {role} responses"
        for role in self.roles:
            meaning[f"{PREFIX}reward_aux/{role}"] = f"mean auxiliary reward r_aux of the {role} responses"
        return [(name, meaning[name]) for name in self.log_order]

