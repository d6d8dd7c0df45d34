"""Reward heads: one file per head, one protocol, one registry (see :mod:`trl_upo.heads.base`)."""

from .base import (
    ENTRY_POINT_GROUP,
    HeadSpec,
    RewardHead,
    build_head,
    parse_head_specs,
    register_head,
    registered_heads,
    resolve_head_class,
)
from .column import ColumnHead
from .function import FunctionHead
from .length import LengthHead

__all__ = [
    "ENTRY_POINT_GROUP",
    "ColumnHead",
    "FunctionHead",
    "HeadSpec",
    "LengthHead",
    "RewardHead",
    "build_head",
    "parse_head_specs",
    "register_head",
    "registered_heads",
    "resolve_head_class",
]
