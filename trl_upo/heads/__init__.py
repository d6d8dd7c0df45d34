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
from .classifier import ClassifierHead
from .column import ColumnHead
from .function import FunctionHead
from .length import LengthHead
from .lexicon import LexiconHead
from .readability import ReadabilityHead
from .reward_model import RewardModelHead
from .similarity import SimilarityHead

__all__ = [
    "ENTRY_POINT_GROUP",
    "ClassifierHead",
    "ColumnHead",
    "FunctionHead",
    "HeadSpec",
    "LengthHead",
    "LexiconHead",
    "ReadabilityHead",
    "RewardHead",
    "RewardModelHead",
    "SimilarityHead",
    "build_head",
    "parse_head_specs",
    "register_head",
    "registered_heads",
    "resolve_head_class",
]
