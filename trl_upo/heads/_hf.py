"""Shared by the model-based heads (``classifier``, ``reward_model``): lazy loading of a Hugging Face
sequence-classification model and its tokenizer, batched forwards, pickling without the weights, and a
fingerprint that follows the model files."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Sequence
from typing import Any

from ..models import DTYPES, check_model_path, default_device, ensure_pad_token, load_tokenizer, pretrained_kwargs
from .protocol import RewardHead


def _local_files_digest(path: str) -> str:
    """Name, size and modification time of a local model directory's files: re-saving a model under the same path
    changes the digest, so the score cache does not serve the old model's scores."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            st = os.stat(full)
            h.update(f"{os.path.relpath(full, path)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


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

class LazyModelMixin:
    """Shared by the model-backed heads: what they load is freed by :meth:`release`, left out of pickles (loaded
    again lazily), and the fingerprint names the model (for a local folder, its files' sizes and times)."""

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
        where = self.model_name
        if os.path.isdir(self.model_name):
            where = f"{os.path.abspath(self.model_name)}#{_local_files_digest(self.model_name)}"
        return f"{super().fingerprint()}:model={where}"


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
                tokenizer = load_tokenizer(self.model_name, revision=self.revision, padding_side="right", hint="")
                kwargs = pretrained_kwargs(dtype=self.dtype, revision=self.revision)
                with _whole_model_under_zero3():
                    model = AutoModelForSequenceClassification.from_pretrained(self.model_name, **kwargs)
            except (OSError, ValueError) as e:
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
        """``(N, num_labels)`` float32 logits on the CPU, for ``texts`` or for ``(first, second)`` text pairs."""
        import torch

        model, tokenizer = self.load()
        items = list(pairs) if pairs is not None else list(texts or [])
        out = []
        device = next(model.parameters()).device
        for i in range(0, len(items), self.batch_size):
            chunk = items[i : i + self.batch_size]
            enc_args = ([a for a, _ in chunk], [b for _, b in chunk]) if pairs is not None else (chunk,)
            enc = tokenizer(
                *enc_args,
                padding=True,
                truncation=self.max_length is not None,
                max_length=self.max_length,
                add_special_tokens=add_special_tokens,
                return_tensors="pt",
            )
            if "token_type_ids" in enc and "token_type_ids" not in _forward_args(model):
                del enc["token_type_ids"]
            _fill_empty_rows(enc, tokenizer)
            with torch.inference_mode():
                logits = model(**{k: v.to(device) for k, v in enc.items()}).logits
            out.append(logits.float().cpu())
        if not out:
            return torch.zeros((0, model.config.num_labels))
        return torch.cat(out)


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
