"""``function``: any callable with TRL's reward-function signature, as an object or a dotted path.

TRL's convention (``GRPOTrainer``): ``f(prompts=..., completions=..., completion_ids=..., **columns,
trainer_state=..., log_extra=..., log_metric=...)`` returns one float (or None) per completion. Existing TRL
reward functions work unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from ..fingerprints import stable_repr
from ..formats import completion_text
from .protocol import RewardHead
from .registry import import_dotted, register_head


def _code_digest(fn: Any) -> str:
    """A digest of a function's code and captured state (closure cells, defaults, partial arguments, a callable
    object's attributes), so that editing or re-configuring the function invalidates cached scores."""
    if isinstance(fn, functools.partial):
        text = f"{_code_digest(fn.func)}|{stable_repr(list(fn.args))}|{stable_repr(fn.keywords)}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]
    state = ""
    t = getattr(fn, "__func__", fn)
    if inspect.isfunction(t):
        cells = [c.cell_contents for c in (t.__closure__ or ())]
        state = stable_repr([cells, list(t.__defaults__ or ()), t.__kwdefaults__ or {}])
    elif hasattr(fn, "__dict__"):
        state = stable_repr(vars(fn))
    return hashlib.sha256((_code_digest_only(fn) + state).encode()).hexdigest()[:16]


def _code_digest_only(fn: Any) -> str:
    target = getattr(fn, "__func__", fn)
    code = getattr(target, "__code__", None)
    if code is None:
        code = getattr(getattr(target, "__call__", None), "__code__", None)
    if code is None:
        return "nocode"
    try:
        src = inspect.getsource(target)
    except (OSError, TypeError):
        src = repr(code.co_code) + repr(code.co_consts)
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def _noop_log_extra(*args: Any, **kwargs: Any) -> None:
    return None


def _noop_log_metric(*args: Any, **kwargs: Any) -> None:
    return None


@register_head("function")
class FunctionHead(RewardHead):
    """Wraps a TRL-style reward function.

    Args:
        function: the callable, or its dotted path (``"package.module:function"``).
        batch_size: at most this many responses per call of the function (None: the whole scoring batch,
            ``upo_score_batch_size``).
    """

    def __init__(self, function: Callable[..., Any] | str, batch_size: int | None = None) -> None:
        self._path = function if isinstance(function, str) else None
        fn = import_dotted(function) if isinstance(function, str) else function
        if not callable(fn):
            raise ValueError(f"function head: {function!r} is not callable.")
        try:
            import torch.nn as nn

            if isinstance(fn, nn.Module):
                raise ValueError(
                    "function head: got a torch Module. Reward models are scored by the 'reward_model' head; "
                    "the function head takes a plain reward function."
                )
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"function head: batch_size must be >= 1, got {batch_size}")
        self.fn = fn
        self.batch_size = batch_size

    def fingerprint(self) -> str:
        return f"{super().fingerprint()}:{_code_digest(self.fn)}"

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        *,
        role: str,
        columns: dict[str, list[Any]],
        tokenizer: Any = None,
    ) -> list[float]:
        step = self.batch_size or len(completions) or 1
        scores: list[float] = []
        for i in range(0, len(completions), step):
            scores.extend(
                self._call(
                    prompts[i : i + step],
                    completions[i : i + step],
                    {k: v[i : i + step] for k, v in columns.items()},
                    tokenizer,
                )
            )
        return scores

    def _call(self, prompts, completions, columns, tokenizer) -> list[float]:
        if tokenizer is not None:
            texts = [completion_text(c) for c in completions]
            completion_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        else:
            completion_ids = None
        out = self.fn(
            prompts=list(prompts),
            completions=list(completions),
            completion_ids=completion_ids,
            **columns,
            trainer_state=None,
            log_extra=_noop_log_extra,
            log_metric=_noop_log_metric,
        )
        try:
            out = list(out)
        except TypeError:
            raise ValueError(
                f"function head: {getattr(self.fn, '__name__', self.fn)!r} returned {type(out).__name__}; a reward "
                f"function must return one float per completion."
            ) from None
        if len(out) != len(completions):
            raise ValueError(
                f"function head: {getattr(self.fn, '__name__', self.fn)!r} returned {len(out)} rewards for "
                f"{len(completions)} completions; it must return exactly one per completion."
            )
        return [float("nan") if v is None else float(v) for v in out]
