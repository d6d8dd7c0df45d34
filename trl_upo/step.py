"""What the core hands an adapter's term on one batch (:class:`UPOStep`), the batch's one gather
(:class:`GatheredStep`), and the public read-only view of a trainer's UPO state (:class:`UPOView`).

A term reads like a loss module::

    def upo_term(self, step):
        ll = step.loglik()                                  # (N,) this process's, with gradient
        g = step.gather(loglik=ll.detach())                 # the step's one collective: values + named columns
        term = awr_term(g.reward_aux("chosen"), ...)        # pure math (trl_upo.objective)
        return alpha * term.loss, {"aux_loss": ..., ...}    # loss, named statistics
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from .compat import TESTED_TRL, TRLContractError, trl_version
from .heads import HeadSpec, RewardHead
from .layout import ValueLayout
from .objective import masked_mean_rows, sequence_loglik


@dataclass
class GatheredStep:
    """The per-row values and the term's named columns of the global batch (every process's rows), from one
    ``all_gather``.

    Attributes:
        rows: ``(G, width + extra)`` float64: the layout's values, then the named columns.
        real: ``(G,)`` bool, the real rows (the others pad a process's batch to the common size); None on one process.
        local: the slice of ``rows`` that is this process's batch.
        layout: which value is in which column.
    """

    rows: torch.Tensor
    real: torch.Tensor | None
    local: slice
    layout: ValueLayout
    columns: dict[str, tuple[slice, bool]] = field(default_factory=dict)
    _means: torch.Tensor | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        """A named column: ``(G,)`` when it was given as ``(B,)``, else ``(G, k)``."""
        where, flat = self.columns[name]
        column = self.rows[:, where]
        return column[:, 0] if flat else column

    @property
    def values(self) -> torch.Tensor:
        """``(G, width)`` the layout's values."""
        return self.rows[:, : self.layout.width]

    def reward_aux(self, role: str) -> torch.Tensor:
        """``(G,)`` r_aux of the ``role`` responses."""
        return self.layout.reward_aux(self.rows, role)

    def mean_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The column means of ``(G, k)`` over the real rows."""
        return x.mean(0) if self.real is None else masked_mean_rows(x, self.real)

    def value_means(self) -> dict[tuple[str, ...], torch.Tensor]:
        """The batch means of every value, keyed by the tuple of their metric names (one vector, no host sync)."""
        if self._means is None:
            self._means = self.mean_rows(self.values)
        return {tuple(self.layout.columns): self._means}

    def value_mean(self, name: str) -> torch.Tensor:
        """The batch mean of one value, by metric name (an element of :meth:`value_means`)."""
        self.value_means()
        return self._means[self.layout.columns.index(name)]


class UPOStep:
    """One batch as a term sees it: the config, the batch, its per-row values, the policy's (and the reference's)
    per-token log-probs from TRL's own forward, and the one gather.

    Args:
        args: the trainer's config.
        inputs: the batch TRL's loss read (``completion_mask``, ``label``, precomputed reference log-probs ...).
        values: ``(B, width)`` this process's per-row values.
        layout: their layout.
        policy_logps, ref_logps: per-token log-probs captured from TRL's forwards (None when not captured).
        accelerator: the trainer's, for the gather.
        capacity: the rows a process's batch is padded to for the gather (the per-device batch size).
        trl_class, path: the TRL trainer read and how (for the contract error).
    """

    def __init__(self, *, args, inputs, values, layout, policy_logps, ref_logps, accelerator, capacity, trl_class,
                 path) -> None:
        self.args, self.inputs, self.values, self.layout = args, inputs, values, layout
        self.policy_logps, self.ref_logps = policy_logps, ref_logps
        self._accelerator, self._capacity = accelerator, capacity
        self._trl_class, self._path = trl_class, path
        self._gathered: GatheredStep | None = None

    @property
    def mask(self) -> torch.Tensor:
        """``(N, T-1)`` the completion tokens, aligned with the per-token log-probs."""
        return self.inputs["completion_mask"][:, 1:]

    def check_policy_logps(self) -> None:
        """Fail clearly when the captured log-probs are not the policy's per-token log-probs of this batch."""
        logps, mask = self.policy_logps, self.mask
        if logps is None or logps.size(0) != mask.size(0) or logps.size(1) < mask.size(1):
            raise TRLContractError(
                f"UPO did not see the policy's per-token log-probabilities in this step (TRL {trl_version()}'s "
                f"{self._trl_class.__name__}, read through its {self._path} path): TRL computed them in a way UPO "
                f"does not know. trl-upo is tested with TRL {TESTED_TRL[0]} to {TESTED_TRL[1]}; see "
                f"docs/compatibility.md."
            )

    def per_token(self, logps: torch.Tensor | None = None) -> torch.Tensor:
        """The policy's (or ``logps``') per-token log-probs aligned with :attr:`mask`."""
        logps = self.policy_logps if logps is None else logps
        seq_len = self.mask.size(1)
        # Aligned already on every supported TRL; sliced only when not (a slice adds a node to the backward graph).
        return logps if logps.size(1) == seq_len else logps[:, -seq_len:]

    def loglik(self, reduction: str | None = None, logps: torch.Tensor | None = None) -> torch.Tensor:
        """``(N,)`` per-response log-likelihood (eq. 6; ``upo_loglik`` unless ``reduction`` is given)."""
        return sequence_loglik(self.per_token(logps), self.mask, reduction or self.args.upo_loglik)

    def gather(self, **columns: torch.Tensor) -> GatheredStep:
        """The values and the named per-row ``columns`` (``(B,)`` or ``(B, k)``, detached) of the global batch, in ONE
        collective: every process pads its rows to the same number and flags the real ones, so a single
        ``all_gather`` of one fixed-shape tensor brings every process what the batch-wide statistics need."""
        if self._gathered is not None:
            raise RuntimeError("a UPO step gathers once: pass every column to one gather() call")
        values = self.values
        parts, where, start = [values], {}, values.size(1)
        for name, column in columns.items():
            part = column.detach().to(torch.float64).reshape(values.size(0), -1)
            where[name] = (slice(start, start + part.size(1)), column.dim() == 1)
            parts.append(part)
            start += part.size(1)
        own = torch.cat(parts, dim=1)
        n = own.size(0)
        if self._accelerator.num_processes == 1:
            self._gathered = GatheredStep(own, None, slice(0, n), self.layout, where)
            return self._gathered
        if n > self._capacity:
            raise ValueError(
                f"A batch of {n} rows is larger than the per-device batch size ({self._capacity}) that UPO pads to "
                f"when gathering a step's values across processes; set per_device_train_batch_size (and "
                f"per_device_eval_batch_size) to the largest batch the data loader gives."
            )
        padded = own.new_zeros(self._capacity, own.size(1) + 1)
        padded[:n, 0] = 1.0
        padded[:n, 1:] = own
        gathered = self._accelerator.gather(padded)
        first = self._accelerator.process_index * self._capacity
        self._gathered = GatheredStep(gathered[:, 1:], gathered[:, 0] > 0, slice(first, first + n), self.layout, where)
        return self._gathered

    @property
    def gathered(self) -> GatheredStep:
        """The step's gather (the term must have called :meth:`gather`)."""
        if self._gathered is None:
            raise RuntimeError("the UPO term did not gather the step's values (call step.gather(...) once)")
        return self._gathered


@dataclass(frozen=True)
class UPOView:
    """A read-only view of a trainer's UPO state (``trainer.upo``); the lists and dicts are copies.

    Attributes:
        specs: the resolved heads' specs.
        heads: the head objects (their models are released after scoring).
        statistics: the normalisation statistics in use, one dict per head (fitted on the train split or the first
            rows of a stream, read from ``upo_statistics_from``, or adopted from a checkpoint on resume).
        statistics_source: where they came from (``source``, ``rows``, ``path``), as recorded in ``upo_state.json``.
        layout: the per-row value layout (column order and metric names).
        score_report: per split, what scoring did per head: ``scored``, ``cached`` or ``recorded``.
        hooks_attached: whether the log-prob capture hooks the model (only while the term is on).
    """

    specs: tuple[HeadSpec, ...]
    heads: tuple[RewardHead, ...]
    statistics: list[dict[str, Any]]
    statistics_source: dict[str, Any] | None
    layout: ValueLayout
    score_report: dict[str, dict[str, str]]
    hooks_attached: bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "statistics", copy.deepcopy(self.statistics))
        object.__setattr__(self, "score_report", copy.deepcopy(self.score_report))
        object.__setattr__(self, "statistics_source", copy.deepcopy(self.statistics_source))
