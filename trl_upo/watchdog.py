"""The stuck-rank watchdog, for scoring and for training.

In a run of several processes (ranks), a rank that stops making progress (a reward head that blocks, a forward that
hangs, a dead data loader) leaves every other rank waiting in the next collective until the process group's timeout
(``ddp_timeout``, 30 minutes by default), with no message. Each rank runs a :class:`Watchdog`: a daemon thread that
logs what *this* rank is doing when it has made no progress for a while, so the rank that is not waiting in a
collective names itself. Two environment variables set the bounds:

- ``TRL_UPO_STUCK_WARN`` (seconds, default 60; ``0``: no warnings): the warning period;
- ``TRL_UPO_STUCK_TIMEOUT`` (seconds; unset or ``0``: wait for ``ddp_timeout``): after that long without progress a
  rank logs an error naming itself and what it was doing, and ends its process (exit code 3), so the launcher stops
  the run.

:class:`StuckRankCallback` watches training: each rank's state is its step and phase (``step 12: forward``, ``step 12:
backward and gradient all-reduce (waits for every rank)``, ``after step 12: ...``); the stuck rank reports a phase of
its own, the others report the all-reduce or the collective they wait at.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)

#: Seconds without progress between the warnings (0: no warning).
STUCK_WARN_ENV = "TRL_UPO_STUCK_WARN"
#: Seconds without progress after which a rank ends the run with its name (unset or 0: wait for ``ddp_timeout``).
STUCK_TIMEOUT_ENV = "TRL_UPO_STUCK_TIMEOUT"
#: Exit code of a rank the watchdog ends.
STUCK_EXIT_CODE = 3


def _seconds(name: str, default: str) -> float:
    value = os.environ.get(name, default) or "0"
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {value!r}.") from None


class Watchdog:
    """Reports a rank that makes no progress: after :data:`STUCK_WARN_ENV` seconds (default 60) without
    :meth:`beat`, logs this rank and :attr:`what` it is doing, again every period; after :data:`STUCK_TIMEOUT_ENV`
    seconds (if set) logs an error and ends the process (exit code 3). Runs only in a run of several processes.

    Args:
        rank: this process's rank.
        size: the number of processes (1: no thread).
        what: what this rank is doing (changed with :meth:`beat`).
        hint: one sentence on how to read the reports, added to them.
        min_warn: a floor under the warning period (a training step that legitimately takes longer than the period).
    """

    def __init__(self, rank: int, size: int, what: str, *, hint: str = "", min_warn: float = 0.0) -> None:
        self.rank, self.size, self.what, self.hint = rank, size, what, hint
        self.warn = _seconds(STUCK_WARN_ENV, "60")
        self.abort = _seconds(STUCK_TIMEOUT_ENV, "0")
        self.min_warn = min_warn
        self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread = None
        if size > 1 and (self.warn or self.abort):
            self._thread = threading.Thread(target=self._watch, daemon=True, name="trl-upo-watchdog")
            self._thread.start()

    def beat(self, what: str | None = None) -> None:
        """Progress was made (and this rank now does ``what``, if given)."""
        self.last = time.monotonic()
        if what is not None:
            self.what = what

    def stop(self) -> None:
        """The watched phase is over."""
        self._stop.set()

    def _watch(self) -> None:
        warned_at = 0.0
        while not self._stop.wait(0.25):
            idle = time.monotonic() - self.last
            period = max(self.warn, self.min_warn) if self.warn else 0.0
            if period and idle >= period and idle - warned_at >= period:
                bound = "" if self.abort else f" Set {STUCK_TIMEOUT_ENV} to abort after a bound."
                logger.warning("rank %d: no progress for %.0f s in %s. %s%s", self.rank, idle, self.what, self.hint,
                               bound)
                warned_at = idle
            elif idle < warned_at:
                warned_at = 0.0  # progress since the last warning
            if self.abort and idle >= self.abort:
                self._end(idle)

    def _end(self, idle: float) -> None:
        msg = (f"rank {self.rank}: no progress for {idle:.0f} s in {self.what} ({STUCK_TIMEOUT_ENV}={self.abort:g}): "
               f"stopping the run. {self.hint}")
        logger.error(msg)
        print(msg, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(STUCK_EXIT_CODE)

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _trainer_callback_base() -> type:
    from transformers import TrainerCallback

    return TrainerCallback


class StuckRankCallback(_trainer_callback_base()):
    """A ``TrainerCallback`` that reports a rank stuck during training (:class:`Watchdog`), by step and phase.

    Each rank beats at every step boundary and around the model's forward pass (hooks on the model), and says where
    it is: ``step N: forward``, ``step N: backward and gradient all-reduce (waits for every rank)``, ``after step N:
    optimizer, logging, saving or loading the next batch``. The rank stuck in a forward names the forward; the
    others, done with theirs, name the all-reduce they wait at. A warning comes after ``TRL_UPO_STUCK_WARN`` seconds,
    or after three times the slowest step so far when that is longer (a long step is not a stuck one);
    ``TRL_UPO_STUCK_TIMEOUT`` ends the run. Does nothing in a one-process run.
    """

    HINT = ("Compare the ranks: the one not waiting at the all-reduce or a collective is the stuck one (its phase is "
            "its own, e.g. a forward or loading a batch).")

    def __init__(self) -> None:
        self.dog: Watchdog | None = None
        self._handles: list[Any] = []
        self._step = 0
        self._step_started = 0.0
        self._slowest = 0.0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.world_size <= 1 or self.dog is not None:
            return
        self.dog = Watchdog(args.process_index, args.world_size, "the start of training", hint=self.HINT)
        if model is not None:
            self._handles = [model.register_forward_pre_hook(self._forward_begins),
                             model.register_forward_hook(self._forward_ends)]

    def _forward_begins(self, module, inputs):
        if self.dog is not None:
            self.dog.beat(f"step {self._step}: forward (this rank's own compute)")

    def _forward_ends(self, module, inputs, output):
        if self.dog is not None:
            self.dog.beat(f"step {self._step}: backward and gradient all-reduce (waits for every rank)")

    def on_step_begin(self, args, state, control, **kwargs):
        self._step = state.global_step + 1
        self._step_started = time.monotonic()
        if self.dog is not None:
            self.dog.beat(f"step {self._step}: loss (TRL's compute_loss, before the forward)")

    def on_substep_end(self, args, state, control, **kwargs):
        if self.dog is not None:
            self.dog.beat(f"step {self._step}: next gradient-accumulation micro-batch")

    def on_step_end(self, args, state, control, **kwargs):
        self._slowest = max(self._slowest, time.monotonic() - self._step_started)
        if self.dog is not None:
            self.dog.min_warn = 3 * self._slowest
            self.dog.beat(f"after step {self._step}: optimizer, logging, saving or loading the next batch "
                          f"(collectives wait for every rank)")

    def on_evaluate(self, args, state, control, **kwargs):
        if self.dog is not None:
            self.dog.beat(f"after the evaluation at step {state.global_step}")

    def on_save(self, args, state, control, **kwargs):
        if self.dog is not None:
            self.dog.beat(f"after the save at step {state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.dog is not None:
            self.dog.stop()
            self.dog = None
        for handle in self._handles:
            handle.remove()
        self._handles = []
