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

from ..watchdog import STUCK_TIMEOUT_ENV, STUCK_WARN_ENV  # noqa: F401 - re-exported
from ..watchdog import Watchdog as _Watchdog

logger = logging.getLogger(__name__)


#: What this process is doing, for the stuck-rank message (the description of the last progress bar opened).
_ACTIVITY = {"what": "scoring"}


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


class Watchdog(_Watchdog):
    """The stuck-rank watchdog (:class:`trl_upo.watchdog.Watchdog`) of a scoring phase: beats at every scored block
    and at the end of each gather; the rank stuck in a head names itself and the head, the ranks waiting for it at
    the gather name the gather."""

    def __init__(self, world: World, what: str) -> None:
        super().__init__(world.rank, world.size, repr(what), hint=(
            "A rank stuck in a reward head names the head; the ranks waiting at the gather name the gather."))


def all_gather(world: World, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (one collective; just ``[obj]`` in one process). A wait for a rank that
    does not arrive is reported (:class:`Watchdog`)."""
    if world.size == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world.size
    with Watchdog(world, f"the gather after {_ACTIVITY['what']}"):
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

    class WatchedBar(tqdm):
        """A bar whose updates are the watchdog's heartbeat (:class:`Watchdog`)."""

        def update(self, n=1):
            watchdog.beat()
            return super().update(n)

        def close(self):
            watchdog.stop()
            return super().close()

    _ACTIVITY["what"] = desc
    watchdog = Watchdog(world, desc)
    return WatchedBar(total=total, desc=desc, unit="responses", unit_scale=True, dynamic_ncols=True, leave=True,
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
