"""Scoring split across the processes of a distributed run, and the progress bar.

Every process (rank) of a run started by ``accelerate launch`` / torchrun calls the same scoring function. For each
head, the ranks first agree on which rows are already scored (in anyone's cache: the caches need not share a
filesystem), split the rest evenly, each scores its share on its own device, and one ``all_gather_object`` brings
every rank the complete, identical scores. No rank waits for more than the slowest share, so scoring never runs into
the process group's timeout (``ddp_timeout``) the way one rank scoring everything while the others wait at a barrier
does.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this is the process that shows progress (rank 0)."""
        return self.rank == 0


def current_world(distributed: bool) -> World:
    """The running process group (``torch.distributed``), or one process when ``distributed`` is False or no group
    is initialised. Under ``accelerate launch``, building ``accelerate.PartialState()`` (any ``TrainingArguments``
    does) initialises the group."""
    if not distributed:
        return World()
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return World()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


#: What this process is doing, for the stuck-rank message (the description of the last progress bar opened).
_ACTIVITY = {"what": "scoring"}
#: Seconds between the warnings about ranks that have not reached a gather (0: no warning).
STUCK_WARN_ENV = "TRL_UPO_STUCK_WARN"
#: Seconds after which a rank that has not reached a gather aborts the run with its name (unset or 0: wait for
#: the process group's own timeout, ``ddp_timeout``).
STUCK_TIMEOUT_ENV = "TRL_UPO_STUCK_TIMEOUT"


def wait_for_ranks(world: World, what: str | None = None) -> None:
    """Before a gather: wait until every rank has arrived, naming the ones that have not.

    Each rank other than 0 sends rank 0 a one-element tensor; rank 0 polls which of them arrived. Every
    :data:`STUCK_WARN_ENV` seconds (default 60) a waiting rank logs whom it waits for and what the run was doing (the
    reward head being scored); after :data:`STUCK_TIMEOUT_ENV` seconds (if set) it raises, naming the ranks. A head
    that blocks on one rank is then reported within a bounded time instead of hanging silently for ``ddp_timeout``.
    """
    import time

    import torch
    import torch.distributed as dist

    warn = float(os.environ.get(STUCK_WARN_ENV, "60") or 0)
    abort = float(os.environ.get(STUCK_TIMEOUT_ENV, "0") or 0)
    what = what or _ACTIVITY["what"]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    if world.rank == 0:
        bufs = {r: torch.zeros(1, device=device) for r in range(1, world.size)}
        works = {r: dist.irecv(bufs[r], src=r) for r in bufs}
    else:
        works = {0: dist.isend(torch.ones(1, device=device), dst=0)}
    start = next_warn = time.monotonic()
    next_warn += warn
    while True:
        pending = sorted(r for r, w in works.items() if not w.is_completed())
        if not pending:
            for w in works.values():
                w.wait()
            return
        waited = time.monotonic() - start
        ranks = ", ".join(map(str, pending))
        if abort and waited > abort:
            raise RuntimeError(
                f"rank {world.rank}: rank(s) {ranks} did not reach the gather after {what!r} within {abort:g} s "
                f"({STUCK_TIMEOUT_ENV}): a reward head is stuck or far slower there. That rank's log shows where."
            )
        if warn and time.monotonic() >= next_warn:
            logger.warning("rank %d has waited %.0f s for rank(s) %s to finish %r (a reward head stuck there?); "
                           "set %s to abort after a bound.", world.rank, waited, ranks, what, STUCK_TIMEOUT_ENV)
            next_warn += warn
        time.sleep(0.05)


def all_gather(world: World, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (one collective; just ``[obj]`` in one process). Ranks that do not
    arrive are named (:func:`wait_for_ranks`)."""
    if world.size == 1:
        return [obj]
    import torch.distributed as dist

    wait_for_ranks(world)
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def pack_mask(mask: np.ndarray) -> bytes:
    """A boolean row mask as bits (what ranks exchange to agree on the cached rows)."""
    return np.packbits(mask.astype(bool)).tobytes()


def unpack_mask(data: bytes, n: int) -> np.ndarray:
    """The inverse of :func:`pack_mask`."""
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=n).astype(bool)


def plan(world: World, have_by_rank: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Who does what for one head, the same on every rank.

    Args:
        world: this process's place.
        have_by_rank: each rank's mask of the rows its cache holds.

    Returns:
        ``(todo, supply, missing)``: the rows this rank scores (every ``size``-th row no cache holds, from its
        ``rank``-th: even shares even when the data is sorted by length), the cached rows this rank hands to the
        others (the lowest rank that holds a row supplies it), and the mask of rows no cache holds.
    """
    have = np.stack(have_by_rank)
    missing = ~have.any(axis=0)
    todo = np.flatnonzero(missing)[world.rank :: world.size]
    owner = np.where(have.any(axis=0), have.argmax(axis=0), -1)
    supply = np.flatnonzero(owner == world.rank)
    return todo, supply, missing


def progress_bar(world: World, total: int, desc: str):
    """A tqdm bar counting responses (with responses/s) on the main process; a silent stand-in elsewhere, or when
    progress bars are off (``TQDM_DISABLE=1``, ``datasets.disable_progress_bars()`` or
    ``huggingface_hub.utils.disable_progress_bars()``)."""
    from tqdm.auto import tqdm

    _ACTIVITY["what"] = desc
    return tqdm(total=total, desc=desc, unit="responses", unit_scale=True, dynamic_ncols=True, leave=True,
                disable=not (world.is_main and progress_enabled()))


def progress_enabled() -> bool:
    """Whether progress bars are on (see :func:`progress_bar`)."""
    if os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    try:
        from datasets.utils.logging import is_progress_bar_enabled

        if not is_progress_bar_enabled():
            return False
    except ImportError:  # pragma: no cover
        pass
    try:
        from huggingface_hub.utils import are_progress_bars_disabled

        return not are_progress_bars_disabled()
    except ImportError:  # pragma: no cover
        return True
