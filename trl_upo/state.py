"""``upo_state.json``: what a UPO run needs to resume on the same scale (resolved heads, their fingerprints, the
normalisation statistics fitted on the train split, the UPO settings), written with every save and checked on
resume."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from . import __version__
from .heads import HeadSpec, RewardHead

logger = logging.getLogger(__name__)

STATE_FILE = "upo_state.json"
#: The ``UPOConfig`` fields recorded in the state; a resume with other values warns and continues with the new ones.
SETTINGS = (
    "upo_alpha",
    "upo_temperature",
    "upo_weight_cap",
    "upo_normalize_weights",
    "upo_baseline",
    "upo_applies_to",
    "upo_loglik",
    "upo_normalization",
    "upo_combine",
)


def build_state(specs: Sequence[HeadSpec], heads: Sequence[RewardHead], stats: list[dict], args: Any) -> dict:
    """The state of a run.

    Args:
        specs: the resolved head specs.
        heads: the built heads (for their fingerprints).
        stats: the normalisation statistics, one per head.
        args: the run's ``UPOConfig`` (its :data:`SETTINGS` are recorded).

    Returns:
        The JSON-serialisable state.
    """
    return {
        "format": 1,
        "trl_upo_version": __version__,
        "heads": [s.to_dict() for s in specs],
        "head_fingerprints": [h.fingerprint() for h in heads],
        "statistics": stats,
        "settings": {k: getattr(args, k, None) for k in SETTINGS},
    }


def save_state(directory: str, state: dict) -> None:
    """Write ``state`` to ``directory/upo_state.json`` (creating the directory)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump(state, f, indent=2)


def load_upo_state(path: str) -> dict[str, Any]:
    """Read ``upo_state.json`` from an output directory or checkpoint."""
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def resume_statistics(checkpoint: str, current: dict) -> list[dict] | None:
    """The normalisation statistics a run resumed from ``checkpoint`` must use, after checking that its heads match.

    Args:
        checkpoint: the checkpoint directory.
        current: this run's state (:func:`build_state`), with the statistics fitted on its own train split.

    Returns:
        The checkpoint's statistics, or None when the checkpoint has no state file (then this run's are used, with a
        warning).

    Raises:
        ValueError: the checkpoint was trained with other reward heads (names, types, weights, signs,
            normalisation, parameters or head fingerprints).
    """
    if not os.path.exists(os.path.join(checkpoint, STATE_FILE)):
        logger.warning(
            "Checkpoint %s has no %s (it was not written by UPOTrainer with reward heads); the normalisation "
            "statistics fitted on this run's train split are used.",
            checkpoint,
            STATE_FILE,
        )
        return None
    state = load_upo_state(checkpoint)
    # Compared in their JSON form: names, types, weights, signs, normalisation and parameters must all match.
    heads_now = json.loads(json.dumps(current["heads"]))
    if state["heads"] != heads_now or state.get("head_fingerprints") != current["head_fingerprints"]:
        raise ValueError(
            f"Checkpoint {checkpoint} was trained with reward heads {state['heads']}, but this run has "
            f"{current['heads']}. Resuming would change the objective mid-run: use the same reward_heads, or start a "
            f"new run (without resume_from_checkpoint)."
        )
    now = current["settings"]
    changed = {k: (v, now.get(k)) for k, v in state.get("settings", {}).items() if now.get(k) != v}
    if changed:
        logger.warning(
            "Resuming from %s with UPO settings that differ from the checkpoint's (saved, now): %s. The run continues "
            "with the new settings.",
            checkpoint,
            changed,
        )
    if state["statistics"] != current["statistics"]:
        logger.warning(
            "The normalisation statistics saved in %s differ from the ones fitted on this run's train split (the data "
            "changed?); the checkpoint's are used so that the resumed run keeps its scale.",
            checkpoint,
        )
    return state["statistics"]
