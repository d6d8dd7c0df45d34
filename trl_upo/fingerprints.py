"""Stable fingerprints: JSON-safe stand-ins for parameter values, and the short hashes that key the score cache and
``upo_state.json``."""

from __future__ import annotations

import functools
import hashlib
import json
import pickle
from typing import Any


def jsonable(v: Any) -> Any:
    """A JSON-safe stand-in for a parameter value (callables become their dotted path)."""
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (set, frozenset)):  # iteration order depends on the process's hash seed: sort
        return sorted((jsonable(x) for x in v), key=lambda x: json.dumps(x, sort_keys=True))
    if isinstance(v, MissingCallable):
        return v.description
    if isinstance(v, SavedCallable):
        v = v.fn
    if callable(v):
        module = getattr(v, "__module__", None)
        qual = getattr(v, "__qualname__", None) or type(v).__qualname__
        return f"{module}:{qual}" if module else repr(v)
    if type(v).__repr__ is object.__repr__:  # the default repr holds a memory address: describe the object instead
        cls = type(v)
        try:
            attrs = jsonable(getattr(v, "__dict__", None) or None)
        except RecursionError:  # an object graph with a cycle: its class alone
            attrs = "<cyclic>"
        return {"object": f"{cls.__module__}:{cls.__qualname__}", "attrs": attrs}
    return repr(v)


def stable_repr(v: Any) -> str:
    """Canonical JSON of ``v`` (keys sorted, callables as their dotted path)."""
    return json.dumps(jsonable(v), sort_keys=True)


def short_hash(text: str) -> str:
    """First 16 hex digits of the SHA-256 of ``text``: the fingerprints in cache keys and ``upo_state.json``."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe_callable(fn: Any) -> str:
    """What a callable is, in words a user recognises: its kind, name, and the file and line it was defined at."""
    if isinstance(fn, functools.partial):
        return f"functools.partial of {describe_callable(fn.func)}"
    target = getattr(fn, "__func__", fn)
    code = getattr(target, "__code__", None)
    if code is not None:
        name = getattr(target, "__qualname__", code.co_name)
        kind = "lambda" if code.co_name == "<lambda>" else "closure" if "<locals>" in name else "function"
        return f"{kind} {getattr(target, '__module__', '?')}:{name} defined at {code.co_filename}:{code.co_firstlineno}"
    cls = type(fn)
    return f"callable object of class {cls.__module__}:{cls.__qualname__}"


class SavedCallable:
    """A callable given in a head's ``params``, as the config keeps it: it calls through to the callable while the
    run lives, and pickles (``training_args.bin``, in every checkpoint) as the callable itself when that can be
    pickled, else as a :class:`MissingCallable` that says what it was. A lambda or a closure therefore never stops a
    checkpoint from being written."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn.fn if isinstance(fn, SavedCallable) else fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __reduce__(self):
        try:
            pickle.dumps(self.fn)
        except Exception:  # noqa: BLE001 - lambdas, closures, local classes: whatever pickle refuses
            return (MissingCallable, (describe_callable(self.fn),))
        return (SavedCallable, (self.fn,))

    def __copy__(self) -> SavedCallable:
        return self

    def __deepcopy__(self, memo: dict) -> SavedCallable:
        return self  # a deep copy of the config (TRL makes some) keeps the live callable

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SavedCallable) and other.fn == self.fn

    def __hash__(self) -> int:
        return hash(self.fn)

    def __repr__(self) -> str:
        return f"SavedCallable({describe_callable(self.fn)})"


class MissingCallable:
    """What an unpicklable callable in a head's ``params`` becomes in a pickled config: its description. Calling it
    fails with a message that says what the callable was and how to pass it again."""

    def __init__(self, description: str) -> None:
        self.description = description

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError(
            f"This reward function could not be pickled with the training arguments ({self.description}), so only "
            f"its description was saved. Pass the function again (reward_heads=[...]) when you rebuild the trainer, "
            f"or define it at module level / give its dotted path 'package.module:function' so it can be saved."
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MissingCallable) and other.description == self.description

    def __hash__(self) -> int:
        return hash(self.description)

    def __repr__(self) -> str:
        return f"<unpicklable {self.description}>"
