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
from .atomic import atomic_write
from .fingerprints import jsonable
from .formats import loads_json
from .heads import HeadSpec, RewardHead
from .heads.registry import resolve_head_class
from .heads.schema import semantic_params

logger = logging.getLogger(__name__)

STATE_FILE = "upo_state.json"
#: Set to 1 to resume from a checkpoint that has no ``upo_state.json`` (this run's statistics are used).
RESUME_WITHOUT_STATE_ENV = "TRL_UPO_RESUME_WITHOUT_STATE"
#: What identifies a head for the resume guard, besides its parameters and content fingerprint.
IDENTITY_KEYS = ("type", "weight", "normalize", "higher_is_better")
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


def head_identity(spec: HeadSpec, head: RewardHead) -> dict[str, Any]:
    """What the resume guard compares for one head: what decides its scores and their place in the objective.

    That is its name, type, weight, sign and normalisation, the parameters that decide the scores (defaults filled
    in; speed-only parameters such as ``batch_size`` and ``device`` left out) and its content fingerprint
    (:meth:`RewardHead.fingerprint`: a function's code and module source, a model's weights)."""
    return {
        "name": spec.name,
        **{k: getattr(spec, k) for k in IDENTITY_KEYS},
        "params": jsonable(head.semantic_config()),
        "fingerprint": head.fingerprint(),
    }


def build_state(specs: Sequence[HeadSpec], heads: Sequence[RewardHead], stats: list[dict], args: Any,
                source: dict | None = None) -> dict:
    """The state of a run.

    Args:
        specs: the resolved head specs.
        heads: the built heads (for their identities and fingerprints).
        stats: the normalisation statistics, one per head.
        args: the run's ``UPOConfig`` (its :data:`SETTINGS` are recorded).
        source: where the statistics came from (``StatisticsSource.to_dict()``: the whole train split, the first
            rows of a stream, a score summary or an earlier state), recorded as ``statistics_source``.

    Returns:
        The JSON-serialisable state.
    """
    return {
        "format": 2,
        "trl_upo_version": __version__,
        "heads": [s.to_dict() for s in specs],
        "head_identity": [head_identity(s, h) for s, h in zip(specs, heads, strict=True)],
        "head_fingerprints": [h.fingerprint() for h in heads],
        "statistics": stats,
        **({"statistics_source": source} if source is not None else {}),
        "settings": {k: getattr(args, k, None) for k in SETTINGS},
    }


def save_state(directory: str, state: dict) -> None:
    """Write ``state`` to ``directory/upo_state.json`` (creating the directory). The file is written under a
    temporary name and renamed, so a run killed mid-save never leaves a truncated state behind."""
    os.makedirs(directory, exist_ok=True)
    with atomic_write(os.path.join(directory, STATE_FILE)) as f:
        json.dump(state, f, indent=2)


def load_upo_state(path: str) -> dict[str, Any]:
    """Read and check ``upo_state.json`` from an output directory or checkpoint.

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: the file is not valid JSON (a cut-off write) or lacks what a state holds; the message names
            the file and what is wrong.
    """
    file = os.path.join(path, STATE_FILE)
    fix = (f"Resume from another checkpoint, or (to resume with this run's statistics) delete {file} and set "
           f"{RESUME_WITHOUT_STATE_ENV}=1.")
    with open(file) as f:
        text = f.read()
    state = loads_json(text, file, f"it is truncated or damaged, e.g. by a save that was interrupted. {fix}")
    problem = _state_problem(state)
    if problem:
        raise ValueError(f"{file} is not a complete UPO state: {problem}. {fix}")
    return state


def _state_problem(state: Any) -> str | None:
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a mapping"
    for key in ("heads", "statistics"):
        if not isinstance(state.get(key), list):
            return f"its {key!r} entry is missing or not a list"
    if not all(isinstance(h, dict) and isinstance(h.get("name"), str) for h in state["heads"]):
        return "an entry of 'heads' is not a mapping with a 'name'"
    if len(state["statistics"]) != len(state["heads"]):
        return f"{len(state['heads'])} heads but {len(state['statistics'])} statistics"
    ident = state.get("head_identity")
    if ident is not None and (not isinstance(ident, list) or len(ident) != len(state["heads"])):
        return "its 'head_identity' entry does not list one identity per head"
    return None


def _saved_identity(state: dict) -> list[dict]:
    """The head identities of a saved state; for a state written before they were saved (format 1), derived from
    its head list, without content fingerprints."""
    if state.get("head_identity") is not None:
        return state["head_identity"]
    out = []
    for h in state["heads"]:
        params = h.get("params") or {}
        try:
            params = jsonable(semantic_params(resolve_head_class(str(h.get("type") or h["name"])), params))
        except ValueError:
            pass
        out.append({"name": h["name"], **{k: h.get(k) for k in IDENTITY_KEYS}, "params": params, "fingerprint": None})
    return out


def head_differences(saved: list[dict], now: list[dict]) -> list[str]:
    """What differs between two lists of head identities (:func:`head_identity`), one line per difference."""
    lines = []
    names_saved, names_now = [h["name"] for h in saved], [h["name"] for h in now]
    if names_saved != names_now:
        lines.append(f"heads: {names_saved} in the checkpoint, {names_now} in this run")
    by_name = {h["name"]: h for h in now}
    for old in saved:
        new = by_name.get(old["name"])
        if new is None:
            continue
        before = len(lines)
        for key in IDENTITY_KEYS:
            if old.get(key) != new.get(key):
                lines.append(f"head {old['name']!r}: {key} {old.get(key)!r} in the checkpoint, {new.get(key)!r} now")
        p_old, p_new = old.get("params") or {}, new.get("params") or {}
        for key in sorted(set(p_old) | set(p_new)):
            if p_old.get(key) != p_new.get(key):
                lines.append(
                    f"head {old['name']!r}: params.{key} {p_old.get(key, '(not set)')!r} in the checkpoint, "
                    f"{p_new.get(key, '(not set)')!r} now"
                )
        fp_old, fp_new = old.get("fingerprint"), new.get("fingerprint")
        if len(lines) == before and fp_old is not None and fp_old != fp_new:
            lines.append(
                f"head {old['name']!r}: same parameters, but its content changed (fingerprint {fp_old} in the "
                f"checkpoint, {fp_new} now): the reward function's code or module source, or the model's weights"
            )
    return lines


def _trained_with_heads(checkpoint: str) -> bool | None:
    """Whether the checkpoint's ``trainer_state.json`` logged UPO head metrics (None: no readable log)."""
    try:
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            history = json.load(f).get("log_history", [])
    except (OSError, ValueError, AttributeError):
        return None
    return any(isinstance(h, dict) and any(str(k).startswith("upo/") for k in h) for h in history)


def _missing_state(checkpoint: str) -> None:
    """A checkpoint without ``upo_state.json``: refuse, unless the override is set (then warn)."""
    with_heads = _trained_with_heads(checkpoint)
    how = {
        True: "it was trained with reward heads (its trainer_state.json logs upo/ metrics), but the file is missing "
        "(an interrupted save, or copied without it)",
        False: "it was trained without reward heads (no upo/ metrics in its trainer_state.json)",
        None: "it has no readable trainer_state.json either, so it may not be a checkpoint at all",
    }[with_heads]
    if os.environ.get(RESUME_WITHOUT_STATE_ENV) == "1":
        logger.warning(
            "Checkpoint %s has no %s (%s); %s=1 is set, so the heads are not checked and the normalisation statistics "
            "fitted on this run's train split are used.", checkpoint, STATE_FILE, how, RESUME_WITHOUT_STATE_ENV,
        )
        return
    raise ValueError(
        f"Checkpoint {checkpoint} has no {STATE_FILE}: {how}. Without it the reward heads and the normalisation "
        f"statistics it trained with cannot be checked, and resuming with other heads would change the objective "
        f"mid-run. Resume from a checkpoint that has the file, or, if this run's reward_heads are the ones it "
        f"trained with, set {RESUME_WITHOUT_STATE_ENV}=1 to resume with the statistics fitted on this run's data."
    )


def resume_statistics(checkpoint: str, current: dict) -> list[dict] | None:
    """The normalisation statistics a run resumed from ``checkpoint`` must use, after checking that its heads match.

    The check compares each head's identity (:func:`head_identity`: name, type, weight, sign, normalisation, the
    parameters that decide scores, content fingerprint); speed-only parameters, file times and comments do not
    count. The UPO settings may differ (a warning names them).

    Args:
        checkpoint: the checkpoint directory.
        current: this run's state (:func:`build_state`), with the statistics fitted on its own train split.

    Returns:
        The checkpoint's statistics, or None when the checkpoint has no state file and
        ``TRL_UPO_RESUME_WITHOUT_STATE=1`` is set (then this run's are used, with a warning).

    Raises:
        ValueError: the checkpoint was trained with other reward heads (the message lists each difference), it has
            no ``upo_state.json``, or that file is damaged.
    """
    if not os.path.isdir(checkpoint):
        raise ValueError(
            f"Checkpoint {checkpoint!r} is not a directory. resume_from_checkpoint takes a checkpoint directory "
            f"(e.g. output_dir/checkpoint-500), or True for the last checkpoint in output_dir."
        )
    if not os.path.exists(os.path.join(checkpoint, STATE_FILE)):
        _missing_state(checkpoint)
        return None
    state = load_upo_state(checkpoint)
    saved_ident = _saved_identity(state)
    diffs = head_differences(saved_ident, json.loads(json.dumps(current["head_identity"])))
    if diffs:
        raise ValueError(
            f"Checkpoint {checkpoint} was trained with other reward heads than this run's:\n  - "
            + "\n  - ".join(diffs)
            + "\nResuming would change the objective mid-run: use the checkpoint's reward_heads, or start a new run "
            "(without resume_from_checkpoint). Speed-only parameters (batch_size, device), file times and comments "
            "are not compared."
        )
    if any(h.get("fingerprint") is None for h in saved_ident):
        logger.warning("%s was written by an older trl-upo without head identities: the heads' parameters were "
                       "compared, their content fingerprints were not.", os.path.join(checkpoint, STATE_FILE))
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
