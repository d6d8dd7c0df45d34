"""The reward-head protocol: what a head is, what it takes and what it returns.

A reward head scores text (or dataset columns) for one designer objective: higher is better. It takes its parameters
as keyword arguments of ``__init__``, returns one float per response from :meth:`RewardHead.score`, and says what it
reads: the response text (``needs_text``) and dataset columns (:meth:`RewardHead.required_columns`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

from ..fingerprints import stable_repr
from . import schema


class RewardHead:
    """Base class of reward heads.

    Subclasses set ``name`` (through :func:`register_head`), take their parameters as keyword arguments of
    ``__init__`` and implement :meth:`score`. The ``__init__`` signature is the parameter schema
    (:mod:`trl_upo.heads.schema`: names, defaults, types, and ``Annotated[..., Param(...)]`` for the allowed values,
    docs and speed-only flags); parameters are validated against it when a :class:`~trl_upo.UPOConfig` is built,
    before any model is loaded.
    """

    name: ClassVar[str] = ""
    #: Whether the head reads the response text; a head that only reads dataset columns sets this to False.
    needs_text: ClassVar[bool] = True
    #: Whether the head may score shards of a dataset in several worker processes (pure CPU text heads). Model heads
    #: and arbitrary user functions keep the default, False.
    parallel_safe: ClassVar[bool] = False
    #: Whether the head may read the trainer's tokenizer (then the tokenizer keys its cached and recorded scores).
    #: None: decided by scoring (model heads bring their own tokenizer: no; any other head: yes). A head that never
    #: reads it sets False, so its scores survive a change of policy tokenizer.
    reads_tokenizer: ClassVar[bool | None] = None

    def __new__(cls, *args: Any, **kwargs: Any):
        # Record the constructor arguments, so that a head built directly (not from a spec) still fingerprints on
        # its parameters and the score cache cannot mix up two configurations of the same head.
        obj = super().__new__(cls)
        try:
            bound = inspect.signature(cls.__init__).bind_partial(None, *args, **kwargs)
            obj._params = dict(list(bound.arguments.items())[1:])
        except TypeError:
            obj._params = dict(kwargs)
        return obj

    def __init__(self, **params: Any) -> None:
        if params:
            raise TypeError(f"{type(self).__name__} takes no parameters, got {sorted(params)}")

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        *,
        role: str,
        columns: dict[str, list[Any]],
        tokenizer: Any = None,
    ) -> list[float]:
        """Score a batch of responses.

        Args:
            prompts: the prompts (strings, or message lists for conversational data).
            completions: the responses to score, aligned with ``prompts`` (same formats).
            role: ``"chosen"`` or ``"rejected"`` (which response of each pair is being scored), or
                ``"completion"`` (the one response of an unpaired row).
            columns: the dataset's other columns for these rows, by name.
            tokenizer: the trainer's tokenizer, or None.

        Returns:
            One float per response, higher is better. ``None`` is read as NaN, which the trainer rejects.
        """
        raise NotImplementedError

    def required_columns(self) -> list[str]:
        """Dataset columns this head reads from ``columns`` in :meth:`score`; scoring checks they exist first. A head
        that scores only the response text reads none."""
        return []

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        """Rules between parameters (the schema checks each one alone), run when the config is built; a head with
        such rules raises ValueError here and calls this from its constructor too. The default has none."""

    def load(self) -> Any:
        """Load what the head scores with (a model) now, so that a wrong model id fails before any other work; the
        data builders call it before generating. The default loads nothing; model heads load once and return what
        they loaded."""
        return None

    def release(self) -> None:
        """Free what the head loaded to score (a model); it loads again if it scores again. The trainer calls this
        once the datasets are scored, so a scoring model does not stay in memory during training."""

    def fingerprint(self) -> str:
        """A string that changes whenever the scores could change; the score cache is keyed on it. It covers the
        head's class and :meth:`semantic_config` (speed-only parameters such as ``batch_size`` are left out);
        heads whose scores follow content (a model's weights, a function's code) add a digest of it."""
        return f"{type(self).__module__}.{type(self).__qualname__}:{stable_repr(self.semantic_config())}"

    def config(self) -> dict[str, Any]:
        """The head's parameters as given (used for the saved head list)."""
        return dict(getattr(self, "_params", {}))

    def semantic_config(self) -> dict[str, Any]:
        """The parameters that decide the scores: defaults filled in, speed-only parameters left out."""
        return schema.semantic_params(type(self), self.config())

    @classmethod
    def validate_params(cls, params: dict[str, Any]) -> None:
        """Check parameters against the schema of ``__init__`` without building the head (no model is loaded):
        names (with a did-you-mean), required ones, types, allowed values and minimums.

        Raises:
            ValueError: naming the head, the parameter and what is allowed.
        """
        schema.validate_params(cls, params, cls.name or cls.__name__)
