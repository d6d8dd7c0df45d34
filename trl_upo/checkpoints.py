"""Complete checkpoints only: a marker written after a save, checked before a resume.

A save cut short (a full disk, a kill) leaves a ``checkpoint-N`` directory with some of its files, or files cut
short; ``transformers``' ``get_last_checkpoint`` picks it anyway, and the resume then fails deep in a library, naming
no file. Here:

- :class:`CheckpointMarker` (a ``TrainerCallback``; ``on_save`` runs after the whole checkpoint is written) writes
  :data:`MARKER` into the checkpoint: the name and size of every file, atomically. :func:`mark_complete` does the
  same for the final model in ``output_dir``.
- :func:`checkpoint_problem` says why a directory is not a complete checkpoint: a marker whose files are missing or
  of another size, or (a checkpoint saved without a marker) a ``.safetensors`` file whose header promises more bytes
  than it has, or a ``torch.save`` archive (``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``, ``*.bin``) without
  its zip directory. The message names the file.
- :func:`save_final` saves the final model and marks it; a save cut short is an :class:`IncompleteSaveError` that
  names the directory and its files.
- :func:`last_complete_checkpoint` is the newest ``checkpoint-N`` without a problem; the skipped ones are returned
  too, so that the command can name them.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zipfile

from .atomic import atomic_write

#: The marker file written into a checkpoint once it is complete.
MARKER = "upo_complete.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _files(directory: str) -> dict[str, int]:
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel != MARKER and not os.path.islink(path):
                out[rel] = os.path.getsize(path)
    return out


def mark_complete(directory: str) -> None:
    """Write :data:`MARKER` into ``directory``: every file's name and size, after they are all written."""
    files = _files(directory)
    with atomic_write(os.path.join(directory, MARKER)) as f:
        json.dump({"format": 1, "files": files}, f, indent=1, sort_keys=True)


class IncompleteSaveError(OSError):
    """The final save stopped part-way (a full disk, a quota): the message names the directory, what it holds, and
    the fix."""


def save_final(trainer, output_dir: str) -> None:
    """Save the trained model into ``output_dir`` and mark it complete (:data:`MARKER`, on the main process).

    The card and a push are left to the caller (``save_model(..., _internal_call=True)``). An earlier marker there is
    removed first: it would vouch for files this save replaces. A save that fails part-way leaves config files that
    look like a model next to missing or short weights; it is raised as :class:`IncompleteSaveError`, naming the files
    there, instead of a library traceback.

    Raises:
        IncompleteSaveError: the save failed with an ``OSError`` (no space left, a quota, an I/O error).
    """
    main = trainer.accelerator.is_main_process
    if main and os.path.isfile(os.path.join(output_dir, MARKER)):
        os.remove(os.path.join(output_dir, MARKER))
    try:
        trainer.save_model(output_dir, _internal_call=True)
    except OSError as e:
        if isinstance(e, IncompleteSaveError):
            raise
        present = sorted(_files(output_dir)) if os.path.isdir(output_dir) else []
        raise IncompleteSaveError(
            e.errno, f"The final save to {output_dir} failed ({e.strerror or e}): the directory holds an incomplete "
            f"model ({', '.join(present) or 'no files'}; no {MARKER}), do not load it. Free space (or set another "
            f"output_dir) and train again, or resume from the last complete checkpoint (resume_from_checkpoint: "
            f"true)."
        ) from e
    if main:
        mark_complete(output_dir)


def _safetensors_problem(path: str) -> str | None:
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "shorter than its 8-byte header length"
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                return f"its header needs {8 + n} bytes and the file has {size}"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"unreadable header ({e})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and "data_offsets" in v]
    need = 8 + n + max(ends, default=0)
    return f"truncated: {size} of {need} bytes" if size < need else None


def file_problem(path: str) -> str | None:
    """Why the checkpoint file at ``path`` is cut short or unreadable (None: it looks whole). Checks the
    safetensors header against the file size, and that a ``torch.save`` archive has its zip directory."""
    name = os.path.basename(path)
    if name.endswith(".safetensors"):
        return _safetensors_problem(path)
    if name.endswith((".pt", ".pth", ".bin")):
        if os.path.getsize(path) == 0:
            return "empty"
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"
        if zipped and not zipfile.is_zipfile(path):
            return "truncated (its zip directory is missing)"
    return None


def checkpoint_problem(directory: str, require_state: bool = True) -> str | None:
    """Why ``directory`` is not a complete checkpoint, naming the file (None: complete).

    Args:
        directory: The checkpoint directory.
        require_state: Whether a checkpoint without a marker must have ``trainer_state.json``.
    """
    marker = os.path.join(directory, MARKER)
    if os.path.isfile(marker):
        try:
            with open(marker) as f:
                expected = json.load(f)["files"]
        except (OSError, ValueError, KeyError) as e:
            return f"{marker} is unreadable ({e})"
        actual = _files(directory)
        for rel, size in sorted(expected.items()):
            if rel not in actual:
                return f"{os.path.join(directory, rel)} is missing"
            if actual[rel] != size:
                return f"{os.path.join(directory, rel)} has {actual[rel]} bytes, {size} when it was saved"
        return None
    if require_state and not os.path.isfile(os.path.join(directory, "trainer_state.json")):
        return f"{directory} has no trainer_state.json (the save did not finish)"
    for rel in sorted(_files(directory)):
        problem = file_problem(os.path.join(directory, rel))
        if problem:
            return f"{os.path.join(directory, rel)}: {problem}"
    return None


def last_complete_checkpoint(output_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest complete ``checkpoint-N`` in ``output_dir``, and the newer incomplete ones it skipped.

    A checkpoint without a marker is judged by its files (see :func:`checkpoint_problem`); once any checkpoint of
    the run has a marker, one without it is incomplete.

    Returns:
        ``(path or None, [(skipped path, why), ...])``.
    """
    try:
        names = os.listdir(output_dir)
    except OSError:
        return None, []
    found = sorted(((int(m.group(1)), os.path.join(output_dir, n)) for n in names
                    if (m := _CHECKPOINT_RE.match(n)) and os.path.isdir(os.path.join(output_dir, n))), reverse=True)
    marked = any(os.path.isfile(os.path.join(p, MARKER)) for _, p in found)
    skipped = []
    for _, path in found:
        problem = checkpoint_problem(path)
        if problem is None and marked and not os.path.isfile(os.path.join(path, MARKER)):
            problem = f"{path} has no {MARKER} (its save did not finish)"
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def marker_callback():
    """A ``transformers.TrainerCallback`` that writes :data:`MARKER` into each checkpoint once it is saved (on the
    main process). Built lazily so that this module imports without transformers."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class CheckpointMarker(TrainerCallback):
        """Marks each checkpoint complete after the trainer wrote all of it (``on_save`` runs after the save)."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                path = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
                if os.path.isdir(path):
                    mark_complete(path)

    return CheckpointMarker()
