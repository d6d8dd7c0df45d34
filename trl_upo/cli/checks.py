"""Checks ``trl-upo`` commands run before anything heavy starts (loading, scoring, training), so that a path the
user mistyped fails in a second with a message naming the fix, instead of after scoring or deep inside a library.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from trl_upo.cli.common import UsageError
from trl_upo.resources import PATH_PREFIXES

#: Values of ``resume_from_checkpoint`` that mean "the last checkpoint in output_dir" (as in ``Trainer.train``).
RESUME_LAST = ("true", "yes", "1", "last")
#: Values of ``resume_from_checkpoint`` that mean "do not resume".
RESUME_NONE = ("false", "no", "0", "none", "")


def expand_home(path: Any) -> Any:
    """``path`` with a leading ``~`` expanded (``os.path.expanduser``); other values (None, a Hub id) unchanged."""
    return os.path.expanduser(path) if isinstance(path, str) and path.startswith("~") else path


def check_output_dir(path: str, key: str = "output_dir") -> None:
    """Make sure ``path`` is a directory this process can write into, or one it can create (nothing is created).

    Args:
        path: The output directory.
        key: The option that named it, for the message.

    Raises:
        UsageError: ``path`` is a file, is under a file, or is (under) a directory that is not writable.
    """
    if not path:
        raise UsageError(f"no `{key}`: give the directory the run writes to (--{key} outputs/my-run).")
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(full) and not os.path.isdir(full):
        raise UsageError(f"`{key}` {path!r} is a file, not a directory: give a directory path (--{key} DIR).")
    existing = full
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"`{key}` {path!r} is under {existing!r}, which is a file: give a directory path "
                         f"(--{key} DIR).")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == full else f"cannot be created: {existing!r} is not writable"
        raise UsageError(f"`{key}` {path!r} {what}: choose a directory you can write to (--{key} DIR).")


def looks_local(name: str) -> bool:
    """Whether a model or dataset name is meant as a local path (``/``, ``./``, ``../``, ``~``, or more than one
    ``/``) rather than a Hub id (``org/name``)."""
    return name.startswith(PATH_PREFIXES) or name.count("/") > 1 or name.endswith("/")


def check_model_path(name: Any, key: str = "model_name_or_path") -> None:
    """Refuse a local model path that does not exist (``from_pretrained`` would call it a malformed Hub id).

    Args:
        name: The model name or path (``upo://`` names already resolved).
        key: The option that named it, for the message.

    Raises:
        UsageError: ``name`` is meant as a local path and does not exist, or is a file.
    """
    if not isinstance(name, str) or not name:
        return
    path = os.path.expanduser(name)
    if os.path.isfile(path):
        raise UsageError(f"`{key}` {name!r} is a file: give the model's directory (with config.json) or a Hub id.")
    if looks_local(name) and not os.path.exists(path):
        raise UsageError(
            f"`{key}` {name!r} does not exist: give an existing model directory (with config.json), a PEFT "
            f"adapter directory, or a Hub id such as Qwen/Qwen2.5-0.5B-Instruct."
        )


def resolve_resume(value: Any, output_dir: str) -> str | None:
    """The checkpoint ``resume_from_checkpoint`` names: ``true`` (or ``last``) is the last ``checkpoint-*`` in
    ``output_dir``, as ``Trainer.train(resume_from_checkpoint=True)`` means it; ``false`` is none; else a path.

    Args:
        value: The option's value.
        output_dir: The run's output directory.

    Returns:
        The checkpoint directory, or None.

    Raises:
        UsageError: ``true`` with no checkpoint in ``output_dir``, or a path that is not a directory.
    """
    if value is None or value is False:
        return None
    text = str(value).strip()
    if text.lower() in RESUME_NONE:
        return None
    from trl_upo.checkpoints import checkpoint_problem, last_complete_checkpoint

    if value is True or text.lower() in RESUME_LAST:
        last, skipped = last_complete_checkpoint(output_dir)
        for path, why in skipped:
            print(f"resume_from_checkpoint: skipping {path}, an incomplete checkpoint: {why}.", file=sys.stderr)
        if last is None:
            raise UsageError(
                f"resume_from_checkpoint: {text} resumes from the last checkpoint-* in output_dir {output_dir!r} "
                f"whose save finished, and there is none{' (every one is incomplete, see above)' if skipped else ''}: "
                f"check output_dir, give a checkpoint directory, or start without resume_from_checkpoint."
            )
        return last
    if not os.path.isdir(text):
        raise UsageError(
            f"resume_from_checkpoint {text!r} is not a directory: give a checkpoint directory (output_dir/"
            f"checkpoint-N), or `true` for the last checkpoint in output_dir."
        )
    problem = checkpoint_problem(text, require_state=False)
    if problem:
        raise UsageError(
            f"resume_from_checkpoint {text!r} is not a complete checkpoint: {problem}. Resume from an earlier "
            f"checkpoint-N, or `true` for the last complete one."
        )
    return text


def preflight(script_args, training_args, model_args) -> None:
    """Everything that can be checked before loading: the model path, the output directory, the checkpoint to
    resume from, and the before/after report. Nothing is written to disk; a leading ``~`` in ``model_name_or_path``
    and ``output_dir`` is expanded in the parsed arguments."""
    from trl_upo.cli.report import check_report

    if not model_args.model_name_or_path:
        raise UsageError("no model: give `model_name_or_path` (hub name, local path or upo://...).")
    # `~` is expanded here, where the paths are used (bash leaves `--key=~/x` as it is; YAML never expands it).
    model_args.model_name_or_path = expand_home(model_args.model_name_or_path)
    training_args.output_dir = expand_home(training_args.output_dir)
    check_report(script_args, training_args, model_args)
    check_model_path(model_args.model_name_or_path)
    check_output_dir(training_args.output_dir)
    training_args.resume_from_checkpoint = resolve_resume(training_args.resume_from_checkpoint,
                                                          training_args.output_dir)
