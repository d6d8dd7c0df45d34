"""Loading models and tokenizers: the one home of what every loader in the package shares.

- :func:`load_model`: a causal LM from a model directory, a Hub id or a PEFT adapter directory (evaluation, the data
  builders' generator);
- :func:`load_tokenizer`: the tokenizer saved with a model (or with an adapter's base), with the pad-token fix and the
  padding side a batcher needs;
- :func:`pretrained_kwargs` (``dtype`` strings, revision) and :func:`default_device`, which the reward heads'
  sequence-classification and sentence-embedding models use as well.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from .resources import PATH_PREFIXES

#: The ``dtype`` values a user may write (None: float32 for transformers).
DTYPES = ("auto", "float32", "float16", "bfloat16")


def default_device() -> str:
    """The process's current CUDA device (under accelerate or torchrun, each rank's own GPU), else the CPU."""
    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype | None:
    """A ``dtype`` as ``from_pretrained`` takes it.

    Args:
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` (any ``torch`` dtype name), ``"auto"``, a
            ``torch.dtype``, or None.

    Returns:
        The ``torch.dtype``; ``"auto"`` and None unchanged.

    Raises:
        ValueError: a string that names no ``torch`` dtype.
    """
    if not isinstance(dtype, str) or dtype == "auto":
        return dtype
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype must be one of {list(DTYPES)} (or a torch.dtype), got {dtype!r}.")
    return value


def pretrained_kwargs(*, dtype: str | torch.dtype | None = None, revision: str | None = None,
                      trust_remote_code: bool = False) -> dict[str, Any]:
    """The keyword arguments of ``from_pretrained`` for a dtype and a Hub revision (unset ones are left out).

    Args:
        dtype: see :func:`resolve_dtype`; None keeps transformers' default (float32).
        revision: the Hub revision (branch, tag or commit), or None.
        trust_remote_code: let transformers run the model's own code (its ``auto_map``); off by default.

    Returns:
        ``{"dtype": ..., "revision": ..., "trust_remote_code": True}`` with only the keys that are set.
    """
    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    if dtype is not None:
        kwargs["dtype"] = resolve_dtype(dtype)
    return kwargs


def check_model_path(model: str, owner: str) -> None:
    """Fail early (before anything loads) when ``model`` is written as a local path that does not exist.

    A Hub id (``org/name``) is left to ``from_pretrained``; anything starting with ``/``, ``./``, ``../`` or ``~`` is
    a path.

    Args:
        model: the value the user gave.
        owner: what the value belongs to, for the message (``"classifier head"``).

    Raises:
        ValueError: naming ``owner`` and the path.
    """
    if model.startswith(PATH_PREFIXES) and not os.path.exists(os.path.expanduser(model)):
        raise ValueError(
            f"{owner}: the model path {model!r} does not exist. Give a local directory saved with save_pretrained, "
            f"or a Hugging Face Hub model id."
        )


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the shape of a Hub model id (``name`` or ``org/name``) rather than a local path."""
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not name.startswith((".", "/", "~"))


def _is_adapter_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "adapter_config.json"))


def load_model(
    model: Any,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    revision: str | None = None,
) -> Any:
    """Load a causal LM from a path or Hub id, or return a loaded model unchanged.

    Args:
        model: a loaded ``PreTrainedModel`` / ``PeftModel``, a full model directory or Hub id, or a PEFT adapter
            directory (``adapter_config.json``; its base model is loaded from ``base_model_name_or_path``).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"`` or a ``torch.dtype``; None keeps float32.
        device: where to put a model loaded from a path (default: :func:`default_device`).
        revision: the Hub revision of a model loaded by Hub id.

    Returns:
        The model; one loaded from a path is in eval mode, a loaded model is returned as it is.

    Raises:
        ValueError: a local path that does not exist, or a directory that holds neither a model nor an adapter.
    """
    if not isinstance(model, str):
        return model  # the caller's model keeps its mode; evaluation switches to eval mode and restores it
    from transformers import AutoModelForCausalLM

    path = os.path.expanduser(model)
    kwargs = pretrained_kwargs(dtype=dtype, revision=revision)
    if _is_adapter_dir(path):
        from peft import PeftConfig, PeftModel

        base_path = PeftConfig.from_pretrained(path).base_model_name_or_path
        if not base_path:
            raise ValueError(
                f"The PEFT adapter in {path!r} does not name its base model (base_model_name_or_path is empty); "
                f"load the base model yourself and pass PeftModel.from_pretrained(base, {path!r})."
            )
        base = AutoModelForCausalLM.from_pretrained(base_path, **pretrained_kwargs(dtype=dtype))
        loaded = PeftModel.from_pretrained(base, path)
    elif os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ValueError(
                f"{path!r} holds neither a model (config.json) nor a PEFT adapter (adapter_config.json). Pass the "
                f"directory that trainer.save_model() wrote."
            )
        loaded = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    elif os.path.exists(path) or not is_hub_id(model):
        raise ValueError(
            f"Model path {model!r} does not exist. Pass a model directory, an adapter directory or a Hub id."
        )
    else:
        loaded = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    if getattr(loaded, "hf_device_map", None) is None:
        loaded = loaded.to(device or default_device())
    return loaded.eval()


def model_source(model: Any) -> str | None:
    """Where a model's tokenizer is: the directory or Hub id it came from (for an adapter without a saved tokenizer,
    its base model's).

    Args:
        model: a loaded model, or the path / Hub id / adapter directory it is loaded from.

    Returns:
        A path or Hub id, or None when a loaded model does not say where it came from.
    """
    if isinstance(model, str):
        path = os.path.expanduser(model)
        if _is_adapter_dir(path):
            for name in ("tokenizer_config.json", "tokenizer.json"):
                if os.path.exists(os.path.join(path, name)):
                    return path
            with open(os.path.join(path, "adapter_config.json")) as f:
                return json.load(f).get("base_model_name_or_path")
        return model
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        cfg = next(iter(peft_config.values()))
        if getattr(cfg, "base_model_name_or_path", None):
            return cfg.base_model_name_or_path
    return getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)


def load_tokenizer(
    model: Any,
    tokenizer: Any = None,
    *,
    revision: str | None = None,
    padding_side: str | None = None,
    pad_token: bool = False,
    hint: str = "Pass tokenizer=... (a tokenizer or its path) explicitly.",
    trust_remote_code: bool = False,
) -> Any:
    """Return ``tokenizer`` if given (a tokenizer or a path), else the one saved with ``model`` (or its base).

    A tokenizer that is passed in is returned unchanged; the options below apply to one loaded here.

    Args:
        model: a loaded model, or its path / Hub id / adapter directory (see :func:`model_source`).
        tokenizer: a loaded tokenizer, the path or Hub id of one, or None.
        revision: the Hub revision to load.
        padding_side: ``"left"`` (generation) or ``"right"`` (scoring); None keeps the saved one.
        pad_token: give a tokenizer without a pad token its EOS token (see :func:`ensure_pad_token`).
        hint: the fix the error message suggests when loading fails.
        trust_remote_code: let transformers run the tokenizer's own code; off by default.

    Returns:
        The tokenizer.

    Raises:
        ValueError: when no tokenizer is given and none can be found where the model came from, or (with
            ``pad_token``) the tokenizer has neither a pad nor an EOS token.
    """
    from transformers import AutoTokenizer

    if tokenizer is not None and not isinstance(tokenizer, str):
        return tokenizer
    source = tokenizer or model_source(model)
    if not source:
        raise ValueError(
            "No tokenizer given and the model does not say where it was loaded from; pass tokenizer=... (a tokenizer "
            "or its path)."
        )
    try:
        tok = AutoTokenizer.from_pretrained(
            source, **pretrained_kwargs(revision=revision, trust_remote_code=trust_remote_code)
        )
    except (OSError, ValueError) as e:
        raise ValueError(f"Could not load a tokenizer from {source!r} ({e}). {hint}".rstrip()) from e
    if pad_token:
        ensure_pad_token(tok, f"The tokenizer of {source!r}")
    if padding_side:
        tok.padding_side = padding_side
    return tok


def ensure_pad_token(tokenizer: Any, who: str) -> None:
    """Give ``tokenizer`` its EOS token as pad token when it has none, so batches can be padded.

    Args:
        tokenizer: a tokenizer (changed in place).
        who: names the tokenizer in the message (``"The tokenizer of 'gpt2'"``).

    Raises:
        ValueError: the tokenizer has neither a pad nor an EOS token.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"{who} has neither a pad nor an eos token, so batches cannot be padded. Save the tokenizer with a "
                f"pad token."
            )
        tokenizer.pad_token = tokenizer.eos_token


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS token (the tokenizer is not changed).

    Raises:
        ValueError: the tokenizer has neither.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("The tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token.")
    return int(pad)
