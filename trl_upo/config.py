"""``UPOConfig`` (every ``DPOConfig`` field) and ``UPOKTOConfig`` (every ``KTOConfig`` field), plus the UPO fields.

The UPO fields are declared once, in the dataclass mixin :class:`UPOArguments`, and validated when a config is built
(and again when training starts, so that a field changed after construction is checked too); the two configs only
narrow the choices that differ between paired and unpaired data.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from trl import DPOConfig, KTOConfig

from .heads import HeadSpec, parse_head_specs, weight_cap_warning
from .objective import (
    APPLIES_TO,
    BASELINES,
    COMBINE_MODES,
    LOGLIK_REDUCTIONS,
    NORMALIZATIONS,
    UNPAIRED_APPLIES_TO,
    UNPAIRED_BASELINES,
)


def _choices(help_: str, choices: tuple[str, ...]) -> dict[str, Any]:
    """The metadata of a string field limited to ``choices``: the help lists them, the parser and ``__post_init__``
    check them. (The default stays a literal ``field(default=...)``, so the API reference shows it as a value.)"""
    return {"help": f"{help_}: {', '.join(choices)}.", "choices": list(choices)}


@dataclass
class UPOArguments:
    """The UPO fields shared by :class:`UPOConfig` (DPO) and :class:`UPOKTOConfig` (KTO), declared once.

    A mixin: it is put before the TRL config among the bases (``class UPOConfig(UPOArguments, DPOConfig)``), so its
    fields come after the TRL config's and its ``__post_init__`` runs the TRL config's first. Field by field
    documentation: :class:`UPOConfig`.
    """

    reward_heads: list[dict[str, Any]] | str | None = field(
        default=None,
        metadata={
            "help": "Reward heads for the designer objectives: a list of mappings (YAML) or a JSON string of one "
            "(command line), each with name, type, weight, normalize, higher_is_better, params."
        },
    )
    upo_alpha: float = field(
        default=0.5,
        metadata={"help": "Coefficient of the UPO auxiliary term, relative to the preference loss (weight 1)."},
    )
    upo_temperature: float = field(
        default=0.25, metadata={"help": "Temperature tau of the advantage weights exp(A / tau)."}
    )
    upo_weight_cap: float = field(default=100.0, metadata={"help": "Cap on one response's advantage weight."})
    upo_normalize_weights: bool = field(
        default=True, metadata={"help": "Normalise the weights to mean 1 over the global batch."}
    )
    upo_baseline: str = field(default="batch", metadata=_choices("Advantage baseline", BASELINES))
    upo_applies_to: str = field(default="chosen",
        metadata=_choices("Responses the auxiliary term trains on", APPLIES_TO))
    upo_loglik: str = field(default="mean", metadata=_choices("Per-response log-likelihood", LOGLIK_REDUCTIONS))
    upo_normalization: str = field(default="zscore",
        metadata=_choices("Default per-head normalisation", NORMALIZATIONS))
    upo_combine: str = field(default="awr",
        metadata=_choices("How designer rewards enter (awr: UPO; margin: MODPO-style)", COMBINE_MODES))
    upo_score_batch_size: int = field(default=256, metadata={"help": "Responses per head call when scoring."})
    upo_score_cache_dir: str | None = field(default=None, metadata={"help": "Directory of the score cache."})
    upo_use_score_cache: bool = field(default=True, metadata={"help": "Reuse cached scores."})
    upo_stream_stats_rows: int = field(
        default=1000,
        metadata={"help": "With a streamed (IterableDataset) train set: the first rows of the stream the "
                  "normalisation statistics are fitted on (scored once more when training reads them)."},
    )
    upo_statistics_from: str | None = field(
        default=None,
        metadata={"help": "Read the normalisation statistics instead of fitting them: a trl-upo score --output "
                  "directory (its upo_statistics.json) or an earlier run's directory or checkpoint (its "
                  "upo_state.json), made with the same heads."},
    )

    def __post_init__(self):
        if "activation_checkpointing" in type(self).__dataclass_fields__ and self.activation_checkpointing is None:
            # transformers >= 5.23 renamed gradient_checkpointing (TRL's configs default it to True) and warns when the
            # old name is set and the new one is not: carry the value over to the new name, so no FutureWarning.
            self.activation_checkpointing = self.gradient_checkpointing
        super().__post_init__()
        self._head_specs: list[HeadSpec] = parse_head_specs(self.reward_heads)
        # Keep the user's objects (a callable in params) but in one normalised shape.
        self.reward_heads = [
            {**spec.to_dict(), "params": dict(spec.params)} for spec in self._head_specs
        ]
        self.validate_upo()
        if (message := weight_cap_warning(self.upo_weight_cap, self.upo_normalize_weights)) is not None:
            warnings.warn(message, UserWarning, stacklevel=2)  # once, here: validate_upo runs again at train()

    def validate_upo(self) -> None:
        """Check the ``upo_*`` values (run at construction and again when training starts).

        Raises:
            ValueError: naming the field, the value and what it must be.
        """
        for name in ("upo_alpha", "upo_temperature", "upo_weight_cap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}.")
        if self.upo_alpha < 0:
            raise ValueError(f"upo_alpha must be >= 0, got {self.upo_alpha}.")
        if self.upo_temperature <= 0:
            raise ValueError(f"upo_temperature must be > 0, got {self.upo_temperature}.")
        if self.upo_weight_cap <= 0:
            raise ValueError(f"upo_weight_cap must be > 0, got {self.upo_weight_cap}.")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if f.name.startswith("upo_") and choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {list(choices)}, got {getattr(self, f.name)!r}.")
        if self.upo_score_batch_size < 1:
            raise ValueError(f"upo_score_batch_size must be >= 1, got {self.upo_score_batch_size}.")
        if isinstance(self.upo_stream_stats_rows, bool) or not isinstance(self.upo_stream_stats_rows, int) or \
                self.upo_stream_stats_rows < 1:
            raise ValueError(f"upo_stream_stats_rows must be a whole number >= 1, got {self.upo_stream_stats_rows!r}.")

    @property
    def head_specs(self) -> list[HeadSpec]:
        """The validated reward heads."""
        return list(self._head_specs)

    def to_dict(self) -> dict[str, Any]:
        """The TRL config's ``to_dict``, with each reward head in its normalised form: callables given in head params
        are replaced by their dotted path, so the config stays JSON-serialisable for loggers and
        ``trainer_state.json``."""
        d = super().to_dict()
        d["reward_heads"] = [spec.to_dict() for spec in self._head_specs]
        return d


@dataclass
class UPOConfig(UPOArguments, DPOConfig):
    r"""
    Configuration for [`UPOTrainer`]: all of [`~trl.DPOConfig`], plus the Unified Preference Optimization fields.

    The total loss is ``L = L_pref + upo_alpha * L_aux`` where ``L_pref`` is TRL's configured DPO loss (every
    ``loss_type`` and ``loss_weights``) and ``L_aux`` the advantage-weighted log-likelihood of the responses,
    weighted by the reward heads' scores (see ``docs/objective.md``).

    Parameters:
        reward_heads (`list[dict]` or `str`, *optional*):
            The designer objectives. Each entry is a mapping with ``name``, ``type`` (registry name, entry point or
            dotted path; defaults to ``name``), ``weight`` (>= 0, default 1), ``normalize`` (``zscore``, ``rank``
            or ``none``; default ``upo_normalization``), ``higher_is_better`` (default true) and ``params`` (the
            head's own parameters). On the command line, a JSON string of the same list.
        upo_alpha (`float`, *optional*, defaults to `0.5`):
            Coefficient of the auxiliary term, relative to the preference loss (weight 1). 0 disables it. The
            default comes from the frontier sweep (``docs/evaluation.md``).
        upo_temperature (`float`, *optional*, defaults to `0.25`):
            Temperature tau of the advantage weights ``exp(A / tau)`` (on z-scored rewards).
        upo_weight_cap (`float`, *optional*, defaults to `100.0`):
            Upper bound of a single response's weight.
        upo_normalize_weights (`bool`, *optional*, defaults to `True`):
            Divide ``exp(A / tau)`` by its mean over the global batch, so that weights average 1 and ``upo_alpha``
            stays a graded knob.
        upo_baseline (`str`, *optional*, defaults to `"batch"`):
            ``batch`` (mean over the global batch), ``pair`` (mean of the two responses to a prompt) or ``none``.
        upo_applies_to (`str`, *optional*, defaults to `"chosen"`):
            ``chosen`` or ``both``: which responses the weighted likelihood term trains on.
        upo_loglik (`str`, *optional*, defaults to `"mean"`):
            ``mean`` (per-token average) or ``sum`` log-likelihood of a response.
        upo_normalization (`str`, *optional*, defaults to `"zscore"`):
            Default per-head normalisation over the training split: ``zscore``, ``rank`` or ``none``.
        upo_combine (`str`, *optional*, defaults to `"awr"`):
            ``awr`` (the UPO objective) or ``margin`` (MODPO-style: the designer reward inside the sigmoid loss's
            logit; ``loss_type`` must be ``sigmoid``).
        upo_score_batch_size (`int`, *optional*, defaults to `256`):
            Responses per call when the heads score the dataset before training.
        upo_score_cache_dir (`str`, *optional*):
            Where scores are cached (default ``$HF_HOME/trl_upo/scores``).
        upo_use_score_cache (`bool`, *optional*, defaults to `True`):
            Reuse cached scores of the same dataset and head.
        upo_stream_stats_rows (`int`, *optional*, defaults to `1000`):
            With a streamed (``IterableDataset``) train set: the normalisation statistics are fitted on the stream's
            first rows, this many (see docs/streaming.md).
        upo_statistics_from (`str`, *optional*):
            Read the normalisation statistics instead of fitting them: a ``trl-upo score --output`` directory or an
            earlier run's directory or checkpoint, made with the same heads.
    """

    def validate_upo(self) -> None:
        """The shared checks, and the margin mode's: only defined for TRL's plain sigmoid DPO loss."""
        super().validate_upo()
        if self.upo_combine == "margin":
            problems = []
            if list(self.loss_type) != ["sigmoid"]:
                problems.append(f"loss_type={self.loss_type} (must be ['sigmoid'])")
            if self.f_divergence_type != "reverse_kl":
                problems.append(f"f_divergence_type={self.f_divergence_type!r} (must be 'reverse_kl')")
            if self.use_weighting:
                problems.append("use_weighting=True (must be False)")
            if self.ld_alpha is not None:
                problems.append(f"ld_alpha={self.ld_alpha} (must be None)")
            if problems:
                raise ValueError(
                    "upo_combine='margin' puts the designer reward inside the sigmoid DPO logit and is only defined "
                    f"for the plain sigmoid loss; incompatible settings: {'; '.join(problems)}. Use "
                    "upo_combine='awr' with other losses."
                )


@dataclass
class UPOKTOConfig(UPOArguments, KTOConfig):
    r"""
    Configuration for [`UPOKTOTrainer`]: all of [`~trl.KTOConfig`], plus the UPO fields of [`UPOConfig`] that apply to
    unpaired data (same names, same meaning; see ``docs/kto.md``).

    The total loss is ``L = L_KTO + upo_alpha * L_aux``: ``L_KTO`` is TRL's configured KTO loss (``loss_type`` ``kto``
    or ``apo_zero_unpaired``, ``desirable_weight``, ``undesirable_weight``) and ``L_aux`` the advantage-weighted
    log-likelihood of the completions the term applies to. The parameters below are those whose default or
    choices differ from [`UPOConfig`]'s.

    Parameters:
        upo_alpha (`float`, *optional*, defaults to `0.25`):
            Coefficient of the auxiliary term, relative to the KTO loss (weight 1); 0 disables it. The default comes
            from the sweep on unpaired data (``docs/evaluation.md``): 0.25 keeps KTO's held-out accuracy, 0.5 and
            more cost accuracy for little more designer gain.
        upo_applies_to (`str`, *optional*, defaults to `"desirable"`):
            ``desirable`` (the completions labelled ``True``; the analogue of ``chosen``) or ``all``.
        upo_baseline (`str`, *optional*, defaults to `"batch"`):
            ``batch`` (mean over the term's completions in the global batch) or ``none``; unpaired data has no pair.
        upo_combine (`str`, *optional*, defaults to `"awr"`):
            only ``awr``: the margin mode is defined on pairs.
    """

    upo_alpha: float = field(
        default=0.25,
        metadata={"help": "Coefficient of the UPO auxiliary term, relative to the KTO loss (weight 1)."},
    )
    upo_baseline: str = field(default="batch", metadata=_choices("Advantage baseline", UNPAIRED_BASELINES))
    upo_applies_to: str = field(default="desirable",
        metadata=_choices("Completions the auxiliary term trains on", UNPAIRED_APPLIES_TO))
    upo_combine: str = field(default="awr",
        metadata=_choices("How designer rewards enter (unpaired data: awr only)", ("awr",)))


def check_upo_values(config_class: type = None, **values: Any) -> list[HeadSpec]:
    """Check ``reward_heads`` and the ``upo_*`` values as ``config_class`` (default :class:`UPOConfig`) checks them,
    without building the config: building ``TrainingArguments`` sets up accelerate's distributed state (a process
    group under a launcher), which a framework validating its own config (axolotl) must not have done for it.

    Args:
        config_class: the config whose fields and checks apply.
        **values: the values to check (any of its fields; the others take their defaults).

    Returns:
        The parsed head specs.

    Raises:
        ValueError: the config's own message for the first problem.
    """
    config_class = config_class or UPOConfig
    obj = object.__new__(config_class)
    for f in fields(config_class):
        if f.default is not MISSING:
            object.__setattr__(obj, f.name, f.default)
        elif f.default_factory is not MISSING:
            object.__setattr__(obj, f.name, f.default_factory())
    for name, value in values.items():
        object.__setattr__(obj, name, value)
    if isinstance(getattr(obj, "loss_type", None), str):  # TRL's __post_init__ makes a single loss a list
        object.__setattr__(obj, "loss_type", [obj.loss_type])
    specs = parse_head_specs(obj.reward_heads)
    object.__setattr__(obj, "_head_specs", specs)
    obj.validate_upo()
    return specs

