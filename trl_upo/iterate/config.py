"""The settings of an iterative run (``trl-upo iterate``, :func:`trl_upo.iterate.run_rounds`), checked before any model
loads: every key, every round's trainer configuration, the judge and the generation settings."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..resources import resolve_resource

TRAINERS = ("dpo", "kto")
FORMS = ("pairs", "unpaired")
REFERENCES = ("previous", "original")
#: ``kto_weights`` of rounds >= 2 with ``form: unpaired``: ``balanced`` sets KTO's ``desirable_weight`` and
#: ``undesirable_weight`` from the round's counts; ``none`` leaves them as ``training`` / ``later_rounds`` set them.
KTO_WEIGHTS = ("balanced", "none")


class IterateConfigError(ValueError):
    """A setting of an iterative run that cannot work; the message names the key and the fix."""


@dataclass
class IterateConfig:
    """Settings of an iterative run.

    Attributes:
        model: the starting policy (a model directory, Hub id or ``upo://`` asset).
        dataset: the user's data (``trl_upo.data.loading.load_splits``): its train split trains round 1 and gives the
            prompts of later rounds; its test split gives the evaluation prompts and held-out rows.
        output_dir: where ``round-<k>/`` directories, ``iterate.json``, ``rounds.json`` and the plot go.
        rounds: R >= 1 rounds; round 1 trains on ``dataset``, rounds 2..R on samples of the previous policy.
        trainer: the round-1 trainer: ``dpo`` (``UPOTrainer``, pairs) or ``kto`` (``UPOKTOTrainer``, unpaired rows).
        form: the data of rounds >= 2: ``unpaired`` (every sample a row, desirable when the judge accepts it;
            ``UPOKTOTrainer``) or ``pairs`` (per prompt, the judge's best sample against its worst; ``UPOTrainer``).
        reference: the reference policy of rounds >= 2: ``previous`` (the round k-1 policy, a trust region that moves)
            or ``original`` (``model``, a fixed anchor).
        training: trainer-config fields (``UPOConfig`` / ``UPOKTOConfig``) for every round, ``reward_heads`` included.
        first_round: overrides of ``training`` for round 1.
        later_rounds: overrides of ``training`` for rounds >= 2.
        judge: a reward-head spec that scores samples (``function``, ``reward_model``, ``classifier``, or any head
            that scores text), plus ``threshold``: a sample is accepted when its score (negated for
            ``higher_is_better: false``) is >= ``threshold``.
        samples_per_prompt: K responses sampled per prompt in rounds >= 2.
        prompts_per_round: distinct train prompts per round (drawn with the round's seed); None: all of them.
        generation: ``trl_upo.data.GenerationSettings`` fields other than ``model`` (backend, max_new_tokens,
            temperature, top_p, dtype, device, stop).
        generation_batch_size: prompts per generation call (each gives ``samples_per_prompt`` sequences).
        eval_num_prompts: test prompts (and held-out rows) in each round's report.
        eval_num_samples: answers sampled per test prompt in the report.
        eval_max_new_tokens: length limit of the report's sampled answers.
        kto_weights: KTO's class weights in rounds >= 2 with ``form: unpaired`` (the judge's rows are mostly of one
            kind): ``balanced`` sets ``desirable_weight`` and ``undesirable_weight`` from the round's counts
            (:func:`balanced_kto_weights`: the weighted totals in the ratio 7/6, the middle of the range TRL's
            KTOTrainer recommends; the mean weight per row stays 1), recorded in the round's ``report.json``;
            ``none`` (the default: balanced weights measured no better, see docs/iterate.md) leaves KTO's weights
            as ``training`` / ``later_rounds`` set them (TRL's default: 1 and 1), also recorded.
        replay: the share of the original train rows (round 1's data) added to each round >= 2's own rows, in [0, 1]:
            ``replay * N`` of the ``N`` rows (rounded half up, at least 1; 1: all of them), drawn per round with the
            run's seed (:mod:`trl_upo.iterate.replay`). In the unpaired form a pair gives two rows (chosen desirable,
            rejected undesirable). 0 (the default): rounds >= 2 train on the judged samples only. The round's
            ``train.jsonl`` marks each row's ``source`` (``sample`` or ``replay``); its report counts them.
        seed: the seed of every round's training, sampling and evaluation.
        torch_num_threads: ``torch.set_num_threads`` in each process; None: torch's default.
    """

    model: str = "upo://tiny-llama"
    dataset: str = "upo://quickstart-data"
    output_dir: str = "outputs/iterate"
    rounds: int = 3
    trainer: str = "dpo"
    form: str = "unpaired"
    reference: str = "previous"
    training: dict = field(default_factory=dict)
    first_round: dict = field(default_factory=dict)
    later_rounds: dict = field(default_factory=dict)
    judge: dict = field(default_factory=dict)
    samples_per_prompt: int = 8
    prompts_per_round: int | None = None
    generation: dict = field(default_factory=dict)
    generation_batch_size: int = 8
    eval_num_prompts: int = 128
    eval_num_samples: int = 4
    eval_max_new_tokens: int = 16
    kto_weights: str = "none"
    replay: float = 0.0
    seed: int = 0
    torch_num_threads: int | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "the iterate config") -> IterateConfig:
        """Build from a mapping (a YAML file's content); unknown keys are an error naming the closest valid one."""
        from ..cli.common import did_you_mean

        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in values if k not in names]
        if unknown:
            hints = "; ".join(f"unknown key {k!r} in {where}.{did_you_mean(str(k), names)}" for k in unknown)
            raise IterateConfigError(f"{hints} Valid keys: {', '.join(names)}.")
        return cls(**values)

    def __post_init__(self) -> None:
        _choice("trainer", self.trainer, TRAINERS)
        _choice("form", self.form, FORMS)
        _choice("reference", self.reference, REFERENCES)
        _choice("kto_weights", self.kto_weights, KTO_WEIGHTS)
        _share("replay", self.replay)
        for key in ("rounds", "samples_per_prompt", "generation_batch_size", "eval_num_prompts", "eval_num_samples",
                    "eval_max_new_tokens"):
            _positive_int(key, getattr(self, key))
        if self.prompts_per_round is not None:
            _positive_int("prompts_per_round", self.prompts_per_round)
        if self.torch_num_threads is not None:
            _positive_int("torch_num_threads", self.torch_num_threads)
        if self.form == "pairs" and self.samples_per_prompt < 2:
            raise IterateConfigError("form: pairs needs samples_per_prompt >= 2 (a best and a worst sample).")
        for key in ("training", "first_round", "later_rounds", "generation", "judge"):
            value = getattr(self, key)
            if value is None:
                setattr(self, key, {})
            elif not isinstance(value, dict):
                raise IterateConfigError(f"`{key}` must be a mapping, got {type(value).__name__}.")
        for key in ("training", "first_round", "later_rounds"):
            if "output_dir" in getattr(self, key) or "seed" in getattr(self, key):
                raise IterateConfigError(f"`{key}` sets output_dir or seed: set them at the top level (each round "
                                         f"trains in <output_dir>/round-<k>).")
        # ``upo://`` names stay as given (in ``iterate.json`` too, so a reinstalled package resumes the run); they are
        # resolved at use (:attr:`model_path`, :attr:`dataset_path`, :meth:`round_fields`), and checked here.
        for key in ("model", "dataset", "training", "first_round", "later_rounds"):
            resolve_resource(getattr(self, key))
        if self.kto_weights == "balanced" and self.form == "unpaired" and self.rounds > 1:
            both = {**self.training, **self.later_rounds}
            set_by_user = [k for k in ("desirable_weight", "undesirable_weight") if k in both]
            if set_by_user:
                raise IterateConfigError(
                    f"`training` or `later_rounds` sets {', '.join(set_by_user)}, and `kto_weights: balanced` sets "
                    f"them from each round's counts: remove {' and '.join(set_by_user)}, or set `kto_weights: none` "
                    f"to use your weights."
                )

    @property
    def model_path(self) -> str:
        """``model`` with a ``upo://`` name resolved to the installed package's path."""
        return resolve_resource(self.model)

    @property
    def dataset_path(self) -> str:
        """``dataset`` with a ``upo://`` name resolved to the installed package's path."""
        return resolve_resource(self.dataset)

    def round_trainer(self, k: int) -> str:
        """``dpo`` or ``kto``: the trainer of round ``k``."""
        if k == 1:
            return self.trainer
        return "kto" if self.form == "unpaired" else "dpo"

    def round_fields(self, k: int) -> dict[str, Any]:
        """The trainer-config fields of round ``k`` (``training`` updated by the round's overrides), ``upo://`` names
        resolved."""
        return resolve_resource({**self.training, **(self.first_round if k == 1 else self.later_rounds)})

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict (function objects as their repr)."""
        import json

        return json.loads(json.dumps(dataclasses.asdict(self), default=repr))


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise IterateConfigError(f"`{key}` must be one of {list(choices)}, got {value!r}.")


def _positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise IterateConfigError(f"`{key}` must be an integer >= 1, got {value!r}.")


def _share(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= 1:
        raise IterateConfigError(f"`{key}` must be a number in [0, 1] (the share of the original train rows each round "
                                 f">= 2 replays; 0: none, 1: all), got {value!r}.")


def config_class(trainer: str) -> type:
    """``UPOConfig`` for ``dpo``, ``UPOKTOConfig`` for ``kto``."""
    from .. import UPOConfig, UPOKTOConfig

    return UPOKTOConfig if trainer == "kto" else UPOConfig


def trainer_class(trainer: str) -> type:
    """``UPOTrainer`` for ``dpo``, ``UPOKTOTrainer`` for ``kto``."""
    from .. import UPOKTOTrainer, UPOTrainer

    return UPOKTOTrainer if trainer == "kto" else UPOTrainer


#: ``desirable_weight * n_desirable / (undesirable_weight * n_undesirable)`` of ``kto_weights: balanced``: the middle
#: of the range TRL's KTOTrainer recommends, [1, 4/3]. Not 1, its edge: TRL rounds the bounds it checks to two
#: decimals, so weights at ratio 1 are reported out of range about half the time.
BALANCED_KTO_RATIO = 7 / 6


def balanced_kto_weights(rows: list[dict]) -> dict[str, Any]:
    """KTO's class weights for unpaired ``rows`` (``label`` True / False): the desirable rows weigh
    :data:`BALANCED_KTO_RATIO` times the undesirable ones in total (inside the range TRL's KTOTrainer recommends) and
    the mean weight per row is 1: ``desirable_weight = r n / ((1 + r) n_desirable)``, ``undesirable_weight =
    n / ((1 + r) n_undesirable)``. Returns the weights, the counts and the ratio.

    Raises:
        IterateConfigError: the rows hold only one kind.
    """
    n_des = sum(bool(r["label"]) for r in rows)
    n_und = len(rows) - n_des
    if n_des == 0 or n_und == 0:
        raise IterateConfigError(f"balanced KTO weights need desirable and undesirable rows; got {n_des} and {n_und}.")
    r = BALANCED_KTO_RATIO
    return {"mode": "balanced", "desirable": n_des, "undesirable": n_und, "ratio": r,
            "desirable_weight": r * len(rows) / ((1 + r) * n_des), "undesirable_weight": len(rows) / ((1 + r) * n_und)}


def build_training_args(config: IterateConfig, k: int, output_dir: str, extra: dict | None = None) -> Any:
    """The trainer config of round ``k``, writing to ``output_dir`` (``extra``: fields the run sets for this round,
    e.g. balanced KTO weights).

    Raises:
        IterateConfigError: a field the round's config class does not take (naming the closest one and the round),
            or a value it rejects.
    """
    from ..cli.common import did_you_mean, rename_keys

    trainer = config.round_trainer(k)
    cls = config_class(trainer)
    names = [f.name for f in dataclasses.fields(cls)]
    where = "first_round" if k == 1 else "later_rounds"
    # A renamed key (gradient_checkpointing / activation_checkpointing, ...) takes the installed stack's name.
    fields = {**rename_keys(config.round_fields(k), names, f"in `training` or `{where}`"), **(extra or {})}
    unknown = [key for key in fields if key not in names]
    if unknown:
        hints = "; ".join(f"{key!r}{did_you_mean(str(key), names)}" for key in unknown)
        raise IterateConfigError(
            f"round {k} trains with {cls.__name__} (trainer {trainer!r}), which has no field {hints}. Move a key "
            f"that only one trainer takes from `training` to `{where}` of the other rounds, or remove it."
        )
    try:
        return cls(output_dir=output_dir, seed=config.seed, **fields)
    except (TypeError, ValueError) as e:
        raise IterateConfigError(f"round {k}: {cls.__name__} rejects the training settings: {e}") from e
