"""What ``trl-upo train`` prints while it trains (``console: compact``, the default): one progress bar, then a compact
table of the logged steps, instead of the raw metric dicts ``transformers`` prints at every logging step.

The full metrics are unchanged where they are kept: every ``report_to`` integration, ``trainer.state.log_history``,
and ``output_dir/log_history.json`` (written at the end). ``console: full`` keeps transformers' own printing.

Neither mode hides the other long phases: the scoring bars (one per head, with rate and ETA), datasets' tokenizing
bars, weight loading and the before/after report's generation keep their progress bars. They are silenced only
when the user asks: ``disable_tqdm: true``, ``TQDM_DISABLE=1``, ``HF_DATASETS_DISABLE_PROGRESS_BARS=1`` or
``HF_HUB_DISABLE_PROGRESS_BARS=1``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from transformers import TrainerCallback

#: The columns of the compact table, as ``(metric key, heading)``; a column shows when some logged step has it.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("loss", "loss"),
    ("rewards/accuracies", "pref. acc"),
    ("rewards/margins", "margin"),
    ("kl", "kl"),
    ("upo/aux_loss", "aux loss"),
    ("upo/weight/max", "max weight"),
    ("learning_rate", "lr"),
)
#: Where the full log history goes, in ``output_dir``.
LOG_FILE = "log_history.json"


def _cell(value: Any) -> str:
    if not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        return "-" if value is None else str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.2e}"
    return f"{value:.4f}"


def format_table(rows: list[tuple[int, dict[str, Any]]]) -> str:
    """The compact table of logged steps: one row per logging step, the :data:`COLUMNS` that were logged.

    Args:
        rows: ``(global step, logs)`` per logging step.

    Returns:
        The table (empty when nothing was logged).
    """
    cols = [(k, h) for k, h in COLUMNS if any(k in logs for _, logs in rows)]
    if not rows or not cols:
        return ""
    width = max(10, *(len(h) for _, h in cols))
    lines = [f"{'step':>6}" + "".join(f"{h:>{width + 2}}" for _, h in cols)]
    for step, logs in rows:
        lines.append(f"{step:>6}" + "".join(f"{_cell(logs.get(k)):>{width + 2}}" for k, _ in cols))
    return "\n".join(lines)


class CompactConsole(TrainerCallback):
    """A progress bar (``tqdm``, off with ``disable_tqdm`` or ``TQDM_DISABLE=1``) and, at the end, the compact table
    of the logged steps (:func:`format_table`) with the run's time; on the main process only."""

    def __init__(self) -> None:
        self.bar = None
        self.rows: list[tuple[int, dict[str, Any]]] = []
        self.summary: dict[str, Any] = {}
        self.start_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        """Open the progress bar."""
        self.start_step = state.global_step  # after a resume: the checkpoint's step
        if state.is_world_process_zero and not args.disable_tqdm:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                            dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        """Advance the progress bar."""
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Keep the step's metrics for the table; show the loss on the bar."""
        if not state.is_world_process_zero or not logs:
            return
        if "train_runtime" in logs:
            self.summary = dict(logs)
        elif any(k in logs for k, _ in COLUMNS):
            self.rows.append((state.global_step, dict(logs)))
            if self.bar is not None and "loss" in logs:
                self.bar.set_postfix(loss=_cell(logs["loss"]), refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        """Close the bar, print the table and write the full log history to ``output_dir``."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not state.is_world_process_zero:
            return
        table = format_table(self.rows)
        runtime = self.summary.get("train_runtime")
        ran = state.global_step - self.start_step
        resumed = f" (resumed at step {self.start_step}, now at {state.global_step})" if self.start_step else ""
        done = f"Trained {ran} steps{resumed}" + (f" in {float(runtime):.1f} s" if runtime else "") + "."
        path = os.path.join(args.output_dir, LOG_FILE)
        os.makedirs(args.output_dir, exist_ok=True)
        from trl_upo.atomic import atomic_write

        with atomic_write(path) as f:  # a symlink planted at the path is replaced, not followed
            json.dump(state.log_history, f, indent=1, default=str)
        print("\n".join(x for x in (table, done + f" Every metric: {path} (and report_to).") if x), flush=True)


def use_compact_console(trainer) -> CompactConsole:
    """Replace transformers' printing callbacks (``PrinterCallback``, ``ProgressCallback``) with
    :class:`CompactConsole` on ``trainer``; return it."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    console = CompactConsole()
    trainer.add_callback(console)
    return console


def silence_upstream_deprecations() -> None:
    """Hide the deprecation warnings that TRL's own code triggers and no recipe can avoid.

    transformers 5.23 renamed ``is_gradient_checkpointing`` to ``is_activation_checkpointing`` and warns when the
    old property is read; TRL (1.9 to 1.16) reads it in ``disable_gradient_checkpointing`` at every reference
    forward, whatever the recipe says. Our recipes use the new key names (``activation_checkpointing``), so a
    ``FutureWarning`` about a key the user wrote still shows.
    """
    import warnings

    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def checkpointing_off() -> dict[str, bool]:
    """``{<installed name of activation checkpointing>: False}`` for a config built in Python, so that no deprecated
    name is set (``gradient_checkpointing`` before transformers 5.23, ``activation_checkpointing`` from it)."""
    from transformers import TrainingArguments

    names = TrainingArguments.__dataclass_fields__
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}
