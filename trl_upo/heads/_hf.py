"""Shared by the model-based heads (``classifier``, ``reward_model``): lazy loading of a Hugging Face
sequence-classification model and its tokenizer, batched forwards, pickling without the weights, and a
fingerprint that follows the model files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from ..models import DTYPES, check_model_path, default_device, ensure_pad_token, load_tokenizer, pretrained_kwargs
from ..fingerprints import stable_repr
from .protocol import RewardHead

logger = logging.getLogger(__name__)
#: Parameters that change how fast a model head scores, never its scores: not part of the fingerprint.
SPEED_PARAMS = ("batch_size", "device")


#: Files of a model directory that never change its outputs: documentation, training leftovers, hidden files.
_IGNORED_SUFFIXES = (".md", ".txt.lock", ".lock")
_IGNORED_NAMES = ("training_args.bin",)
#: Content hashes already computed, by (path, inode, size, mtime, ctime): a file is hashed again only when it was touched.
_HASHES: dict[str, str] = {}
_INDEX_MAX = 20_000


def _hash_index_path() -> str:
    from huggingface_hub import constants

    return os.path.join(constants.HF_HOME, "trl_upo", "file_hashes.json")


def _load_index() -> None:
    if _HASHES:
        return
    try:
        with open(_hash_index_path()) as f:
            data = json.load(f)
        if isinstance(data, dict):
            _HASHES.update({str(k): str(v) for k, v in data.items()})
    except (OSError, ValueError):
        pass


def _save_index() -> None:
    """Keep the content hashes for the next process (best effort: an unwritable HF home only costs re-hashing)."""
    path = _hash_index_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(dict(list(_HASHES.items())[-_INDEX_MAX:]), f)
        os.replace(tmp, path)
    except OSError:
        pass


def file_sha256(path: str) -> str:
    """SHA-256 of a file's content; remembered (in memory and under ``$HF_HOME/trl_upo/file_hashes.json``) by the
    file's path, inode, size, modification and status-change times (a copy tool can restore a modification time, not
    a status-change time), so an untouched file is never read twice and a touched or replaced file is hashed again
    but, its content being the same, hashes the same."""
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
    _load_index()
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
        _save_index()
    return _HASHES[key]


def _local_files_digest(path: str) -> str:
    """Digest of the contents of a local model directory's files (weights, config, tokenizer, remote code; not
    README files or hidden files): the same files anywhere give the same digest, re-saving different weights under
    the same path changes it, and touching a file does not."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name in _IGNORED_NAMES or name.endswith(_IGNORED_SUFFIXES):
                continue
            full = os.path.join(root, name)
            h.update(f"{os.path.relpath(full, path)}:{file_sha256(full)};".encode())
    return h.hexdigest()[:16]


def _hub_identity(model: str, revision: str | None) -> str:
    """A Hub model as ``id@<commit>``: the commit of the snapshot in the local Hub cache that ``revision`` (default
    ``main``) points to; when the model is not downloaded yet, the commit the Hub resolves ``revision`` to (so the
    key does not change once the model is downloaded); ``id@<revision>`` only when offline or the Hub cannot say."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - an unusual id or cache layout falls back to the name
        found = None
    if isinstance(found, str):
        return f"{model}@{os.path.basename(os.path.dirname(found))}"
    try:
        from huggingface_hub import HfApi, constants

        if not constants.HF_HUB_OFFLINE:
            sha = HfApi().model_info(model, revision=revision).sha
            if sha:
                return f"{model}@{sha}"
    except Exception:  # noqa: BLE001 - no network, a private or unknown id: the name and revision
        pass
    return f"{model}@{revision or 'main'}"


def model_identity(model: str, revision: str | None = None) -> str:
    """What decides a model's outputs: ``sha256:<digest of its files>`` for a local directory, ``<id>@<commit>``
    for a Hub id."""
    if os.path.isdir(model):
        return f"sha256:{_local_files_digest(model)}"
    return _hub_identity(model, revision)


@contextlib.contextmanager
def _whole_model_under_zero3():
    """Load a head's model whole while DeepSpeed ZeRO-3 is configured. transformers partitions every model that
    ``from_pretrained`` builds while a ZeRO-3 config is registered (the trainer registers it), but a head scores with
    plain forward passes on each rank, outside the DeepSpeed engine: partitioned weights fail ("'weight' must be
    2-D"). transformers has a public ``unset_hf_deepspeed_config`` but no public getter of the registered config,
    hence the private weak reference, restored afterwards."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    if ref is None or not hf_deepspeed.is_deepspeed_zero3_enabled():
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = ref

def check_trust_remote_code(value: Any, kind: str) -> bool:
    """The ``trust_remote_code`` parameter of a model head: true or false (a string such as ``"yes"`` is refused)."""
    if not isinstance(value, bool):
        raise ValueError(f"{kind} head: trust_remote_code must be true or false, got {value!r}.")
    return value


def needs_remote_code(error: Exception, trusted: bool) -> bool:
    """Whether loading failed because the model has custom code and the head was not allowed to run it."""
    return not trusted and "trust_remote_code" in str(error)


def remote_code_message(kind: str, model: str) -> str:
    """The fix for a model with custom code: the head's own ``trust_remote_code`` parameter, and what it allows."""
    return (
        f"{kind} head: {model!r} has custom code (an `auto_map` in its config) that runs only when allowed. Read the "
        f"model's Python files, then set `trust_remote_code: true` in the head's params (e.g. "
        f"`{{name: rm, type: {kind}, params: {{model: {model}, trust_remote_code: true}}}}`): loading the head runs "
        f"that code on every rank (docs/trust.md). The policy's own `trust_remote_code` does not apply to heads."
    )


class LazyModelMixin:
    """Shared by the model-backed heads: what they load is freed by :meth:`release`, left out of pickles (loaded
    again lazily), and the fingerprint names the model by content (:func:`model_identity`)."""

    model_name: str
    _lazy_attrs: tuple[str, ...] = ("_model",)

    def release(self) -> None:
        """Free the model (it is loaded again if the head scores again)."""
        for attr in self._lazy_attrs:
            setattr(self, attr, None)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for attr in self._lazy_attrs:
            state[attr] = None  # reloaded lazily wherever the head is unpickled
        return state

    def fingerprint(self) -> str:
        """The head's class, the parameters that decide its scores, and its model by content
        (:func:`model_identity`): not by path or file times; ``batch_size`` and ``device`` are left out."""
        params = getattr(self, "semantic_config", self.config)()
        params = {k: v for k, v in params.items() if k not in (*SPEED_PARAMS, "model", "revision")}
        model = model_identity(self.model_name, getattr(self, "revision", None))
        return f"{type(self).__module__}.{type(self).__qualname__}:{stable_repr(params)}:model={model}"


class HFSequenceClassifierHead(LazyModelMixin, RewardHead):
    """Base of heads that run an ``AutoModelForSequenceClassification``. The model is loaded on the first call of
    :meth:`logits` (building a config never loads it), dropped when pickled, and freed by :meth:`release`.

    Subclasses call ``self._init_model(...)`` from ``__init__`` and :meth:`logits` from ``score``, and set
    ``_truncation_side``: the end of a too-long input that is cut.
    """

    _kind = "model"
    _truncation_side = "right"
    _lazy_attrs = ("_model", "_tokenizer")

    def _init_model(
        self,
        model: str,
        batch_size: int,
        device: str | None,
        max_length: int | None,
        dtype: str | None,
        revision: str | None,
        trust_remote_code: bool = False,
        /,
    ) -> None:
        if not isinstance(model, str) or not model:
            raise ValueError(
                f"{self._kind} head: model must be a local path or a Hugging Face Hub model id, got {model!r}."
            )
        check_model_path(model, f"{self._kind} head")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"{self._kind} head: batch_size must be an integer >= 1, got {batch_size!r}.")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
            raise ValueError(f"{self._kind} head: max_length must be an integer >= 2 or null, got {max_length!r}.")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"{self._kind} head: dtype must be one of {list(DTYPES)} or null, got {dtype!r}.")
        self.model_name, self.batch_size, self.max_length = model, batch_size, max_length
        self.device, self.dtype, self.revision = device, dtype, revision
        self.trust_remote_code = check_trust_remote_code(trust_remote_code, self._kind)
        self._model = None
        self._tokenizer = None

    # -- loading -------------------------------------------------------------------------------------------------

    def _device(self) -> str:
        return self.device or default_device()

    def load(self) -> tuple[Any, Any]:
        """Load (once) and return ``(model, tokenizer)``."""
        if self._model is None:
            from transformers import AutoModelForSequenceClassification

            try:
                tokenizer = load_tokenizer(self.model_name, revision=self.revision, padding_side="right", hint="",
                                           trust_remote_code=self.trust_remote_code)
                kwargs = pretrained_kwargs(dtype=self.dtype, revision=self.revision,
                                           trust_remote_code=self.trust_remote_code)
                with _whole_model_under_zero3():
                    model = AutoModelForSequenceClassification.from_pretrained(self.model_name, **kwargs)
            except (OSError, ValueError) as e:
                if needs_remote_code(e, self.trust_remote_code):
                    raise ValueError(remote_code_message(self._kind, self.model_name)) from e
                raise ValueError(
                    f"{self._kind} head: cannot load {self.model_name!r} as a sequence-classification model and "
                    f"tokenizer: {e}. params.model must be a local directory written by save_pretrained or a Hub id."
                ) from e
            ensure_pad_token(tokenizer, f"{self._kind} head: the tokenizer of {self.model_name!r}")
            if model.config.pad_token_id is None:
                # Decoder classifiers (Llama, Qwen, ...) read the last non-pad token and need to know the pad id.
                model.config.pad_token_id = tokenizer.pad_token_id
            tokenizer.truncation_side = self._truncation_side
            model.eval().to(self._device())
            self._on_load(model, tokenizer)
            self._model, self._tokenizer = model, tokenizer
        return self._model, self._tokenizer

    def _on_load(self, model: Any, tokenizer: Any) -> None:
        """Hook for checks that need the loaded model (e.g. label names); raise ValueError on a mismatch."""

    # -- forward -------------------------------------------------------------------------------------------------

    def logits(
        self,
        texts: Sequence[str] | None = None,
        *,
        pairs: Sequence[tuple[str, str]] | None = None,
        add_special_tokens: bool = True,
    ):
        """``(N, num_labels)`` float32 logits on the CPU, for ``texts`` or for ``(first, second)`` text pairs, in the
        order given.

        The inputs are tokenised once and batched longest first (batches of similar lengths carry little padding; an
        out-of-memory error shows on the first batch). On a CUDA out-of-memory error the batch size halves (down to
        1) and scoring goes on; the smaller batch size is kept for the rest of the run and logged once per halving.
        """
        import torch

        model, tokenizer = self.load()
        items = list(pairs) if pairs is not None else list(texts or [])
        if not items:
            return torch.zeros((0, model.config.num_labels))
        enc_args = ([a for a, _ in items], [b for _, b in items]) if pairs is not None else (items,)
        enc = tokenizer(*enc_args, padding=False, truncation=self.max_length is not None, max_length=self.max_length,
                        add_special_tokens=add_special_tokens)
        keys = [k for k in enc.keys() if k != "token_type_ids" or "token_type_ids" in _forward_args(model)]
        order = sorted(range(len(items)), key=lambda i: -len(enc["input_ids"][i]))
        out = torch.empty((len(items), model.config.num_labels), dtype=torch.float32)
        done = 0
        while done < len(order):
            idx = order[done : done + self._current_batch_size()]
            try:
                out[idx] = self._forward(model, tokenizer, [{k: enc[k][i] for k in keys} for i in idx])
            except torch.cuda.OutOfMemoryError:
                self._halve_batch_size(len(idx))
                continue
            done += len(idx)
        return out

    def _current_batch_size(self) -> int:
        return getattr(self, "_oom_batch_size", None) or self.batch_size

    def _halve_batch_size(self, failed: int) -> None:
        """After a CUDA out-of-memory error on a batch of ``failed`` inputs: halve the batch size, free the cache."""
        import torch

        if failed <= 1:
            raise torch.cuda.OutOfMemoryError(
                f"{self._kind} head: out of CUDA memory on a single input of {self.model_name!r}. Lower max_length, "
                f"use dtype: bfloat16, or score on a larger GPU."
            )
        smaller = self._current_batch_size() // 2
        while smaller >= failed:
            smaller //= 2
        self._oom_batch_size = max(1, smaller)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.warning("%s head %r: out of CUDA memory at batch size %d; going on with batch size %d.",
                       self._kind, self.model_name, failed, self._oom_batch_size)

    def _forward(self, model: Any, tokenizer: Any, features: list[dict[str, Any]]):
        """The float32 logits of one batch of tokenised inputs (padded here)."""
        import torch

        enc = tokenizer.pad(features, padding=True, return_tensors="pt")
        _fill_empty_rows(enc, tokenizer)
        device = next(model.parameters()).device
        with torch.inference_mode():
            logits = model(**{k: v.to(device) for k, v in enc.items()}).logits
        return logits.float().cpu()


def _fill_empty_rows(enc: Any, tokenizer: Any) -> None:
    """Give a text that encodes to no tokens at all (an empty response, for a tokenizer that adds no special
    tokens) one end-of-sequence token, so that the model has something to classify instead of failing."""
    import torch

    ids, mask = enc["input_ids"], enc["attention_mask"]
    if ids.shape[1] == 0:
        ids = torch.full((ids.shape[0], 1), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
    empty = mask.sum(dim=1) == 0
    if empty.any():
        fill = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
        ids, mask = ids.clone(), mask.clone()
        ids[empty, 0] = fill
        mask[empty, 0] = 1
    enc["input_ids"], enc["attention_mask"] = ids, mask
    if "token_type_ids" in enc and enc["token_type_ids"].shape != ids.shape:
        enc["token_type_ids"] = torch.zeros_like(ids)


def _forward_args(model: Any) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)
