"""Stable fingerprints: JSON-safe stand-ins for parameter values, and the short hashes that key the score cache and
``upo_state.json``."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def jsonable(v: Any) -> Any:
    """A JSON-safe stand-in for a parameter value (callables become their dotted path)."""
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if callable(v):
        module = getattr(v, "__module__", None)
        qual = getattr(v, "__qualname__", None) or type(v).__qualname__
        return f"{module}:{qual}" if module else repr(v)
    return repr(v)


def stable_repr(v: Any) -> str:
    """Canonical JSON of ``v`` (keys sorted, callables as their dotted path)."""
    return json.dumps(jsonable(v), sort_keys=True)


def short_hash(text: str) -> str:
    """First 16 hex digits of the SHA-256 of ``text``: the fingerprints in cache keys and ``upo_state.json``."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]
