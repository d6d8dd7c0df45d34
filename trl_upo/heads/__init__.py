"""Reward heads: one file per head (registered under its file stem), one protocol (:mod:`.protocol`), one registry
(:mod:`.registry`), and the specs users write (:mod:`.spec`)."""

from .protocol import RewardHead
from .registry import ENTRY_POINT_GROUP, register_head, registered_heads, resolve_head_class
from .schema import Param
from .spec import HeadSpec, build_head, parse_head_specs, weight_cap_warning
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
    "Param",
    "ReadabilityHead",
    "RewardHead",
    "RewardModelHead",
    "SimilarityHead",
    "build_head",
    "parse_head_specs",
    "register_head",
    "registered_heads",
    "resolve_head_class",
    "weight_cap_warning",
]
