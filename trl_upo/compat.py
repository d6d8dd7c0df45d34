"""Which TRL is installed, and how UPO reads the policy's per-token log-probabilities from it.

UPO's auxiliary term needs the per-token log-probs of the forward DPO (or KTO) already runs (no second forward, no
second log-softmax over the vocabulary). TRL produces them in one of two ways, found by looking at ``DPOTrainer`` (or
``KTOTrainer``) itself rather than at its version string:

- **fused** (TRL 1.15 and later): ``DPOTrainer._compute_loss`` calls ``model(..., fused_lm_head=True)``, whose output
  carries ``log_probs``; a forward hook on the policy module (and on an explicit ``ref_model``) keeps them.
- **logits** (TRL 1.9 to 1.14): ``_compute_loss`` computes them from the logits with the module-level functions
  ``selective_log_softmax`` (and, from 1.14, ``selective_log_softmax_and_entropy`` for the policy). While a loss is
  computed, :class:`LogProbCapture` puts wrappers in their place that keep what they return and return it unchanged.

:func:`check_trl` runs when a trainer is built, before any scoring, and fails with a message that names the installed
version and the tested range when TRL no longer offers what UPO relies on. Every function takes the TRL trainer class
it reads (``DPOTrainer`` by default, ``KTOTrainer`` for unpaired data). KTO also runs a no-gradient KL-estimate
forward on mismatched completions (``KTOTrainer._compute_kl_logps``); :meth:`LogProbCapture.paused` keeps it out of
what is captured.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import warnings
from collections.abc import Iterator
from typing import Any

import torch

#: The oldest and the newest TRL release CI tests (every minor release between them is supported).
TESTED_TRL = ("1.9.0", "1.16.0")
FUSED, LOGITS = "fused", "logits"
#: Module-level functions of ``trl.trainer.dpo_trainer`` that compute per-token log-probs from logits (logits path).
POLICY_FN, SHARED_FN = "selective_log_softmax_and_entropy", "selective_log_softmax"
#: ``DPOTrainer`` methods and attributes UPO calls or reads, on every path.
REQUIRED_METHODS = ("compute_loss", "_compute_loss", "compute_ref_log_probs", "_set_signature_columns_if_needed")


class TRLContractError(RuntimeError):
    """The installed TRL does not offer what UPO relies on; the message names the version and the tested range."""


def trl_version() -> str:
    """The installed TRL version string."""
    import trl

    return str(getattr(trl, "__version__", "unknown"))


def _range_hint() -> str:
    return (
        f"trl-upo is tested with TRL {TESTED_TRL[0]} to {TESTED_TRL[1]} (pip install 'trl>={TESTED_TRL[0]},"
        f"<={TESTED_TRL[1]}'); see docs/compatibility.md"
    )


def _code_strings(code: Any) -> set[str]:
    """Every string constant of a code object, including keyword-argument names of calls."""
    out: set[str] = set()
    for const in code.co_consts:
        if isinstance(const, str):
            out.add(const)
        elif isinstance(const, tuple):
            out.update(c for c in const if isinstance(c, str))
    return out


def _trainer_class(trainer_class: Any = None) -> Any:
    """The TRL trainer class UPO reads: ``trainer_class``, or ``DPOTrainer``."""
    if trainer_class is not None:
        return trainer_class
    from trl import DPOTrainer

    return DPOTrainer


def _dpo_compute_loss(trainer_class: Any = None) -> Any:
    fn = getattr(_trainer_class(trainer_class), "_compute_loss", None)
    return inspect.unwrap(fn) if fn is not None else None


def logprob_path(trainer_class: Any = None, hooks: tuple[str, ...] = ()) -> str:
    """How the installed TRL computes the policy's per-token log-probs: :data:`FUSED` or :data:`LOGITS`.

    Args:
        trainer_class: the TRL trainer whose loss UPO reads (``DPOTrainer`` when None, or ``KTOTrainer``).
        hooks: the methods of ``trainer_class`` an adapter hooks besides :data:`REQUIRED_METHODS` (its
            ``upo_trl_hooks``: ``("_compute_kl_logps",)`` for KTO); each must exist.

    Raises:
        TRLContractError: neither way is there (a TRL that UPO does not know).
    """
    cls = _trainer_class(trainer_class)
    required = (*REQUIRED_METHODS, *hooks)
    missing = [name for name in required if not callable(getattr(cls, name, None))]
    fn = _dpo_compute_loss(cls)
    if missing or fn is None:
        raise TRLContractError(
            f"TRL {trl_version()}'s {cls.__name__} has no {missing}, which UPO hooks. {_range_hint()}."
        )
    module_globals = fn.__globals__
    if "fused_lm_head" in _code_strings(fn.__code__) and callable(module_globals.get("add_fused_lm_head")):
        return FUSED
    if SHARED_FN in fn.__code__.co_names and callable(module_globals.get(SHARED_FN)):
        if POLICY_FN in fn.__code__.co_names and not callable(module_globals.get(POLICY_FN)):
            raise TRLContractError(f"TRL {trl_version()} names {POLICY_FN} but does not define it. {_range_hint()}.")
        return LOGITS
    raise TRLContractError(
        f"TRL {trl_version()}'s {cls.__name__} computes per-token log-probabilities in a way UPO does not know (neither "
        f"the fused LM head nor {SHARED_FN}), so the auxiliary term cannot read them without a second forward. "
        f"{_range_hint()}."
    )


def check_trl(args: Any = None, trainer_class: Any = None, hooks: tuple[str, ...] = ()) -> str:
    """Check, before any scoring, that the installed TRL offers what UPO relies on; return the log-prob path.

    Args:
        args: the trainer's config (checked for options the path cannot serve: ``use_liger_kernel`` on the logits
            path, which gives no per-token log-probs).
        trainer_class: the TRL trainer UPO hooks (``DPOTrainer`` when None, or ``KTOTrainer``).
        hooks: as in :func:`logprob_path`.

    Raises:
        TRLContractError: an unknown TRL, TRL 1.15's fused head without Triton, or Liger on the logits path.
    """
    from packaging.version import InvalidVersion, Version

    path = logprob_path(trainer_class, hooks) if trainer_class is not None or hooks else logprob_path()
    version = trl_version()
    try:
        parsed = Version(version)
    except InvalidVersion:
        parsed = None
    if path == FUSED:
        utils = importlib.import_module("trl.trainer.utils")
        if getattr(utils, "_ChunkedLogProbFunction", object()) is None:
            raise TRLContractError(
                f"TRL {version}'s fused LM head needs Triton, which is not installed here (no CUDA GPU?): DPO and UPO "
                f"would fail at the first step. Upgrade to trl>=1.16.0 (it falls back to PyTorch), or install "
                f"Triton on a CUDA machine. {_range_hint()}."
            )
    elif args is not None and getattr(args, "use_liger_kernel", False):
        raise TRLContractError(
            f"use_liger_kernel=True with reward heads on TRL {version}: Liger's fused loss returns sequence sums, not "
            f"the per-token log-probabilities UPO's auxiliary term reads. Set use_liger_kernel=False, or upgrade "
            f"to trl>=1.15.0."
        )
    if parsed is not None and parsed > Version(TESTED_TRL[1]) and parsed.major == Version(TESTED_TRL[1]).major:
        warnings.warn(
            f"TRL {version} is newer than the newest release trl-upo was tested with ({TESTED_TRL[1]}); its contract "
            f"checks pass, and the equivalence tests are the ones to run if anything looks off.",
            stacklevel=3,
        )
    return path


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a PEFT model (its reference is then the adapter-disabled policy, without a ``ref_model``)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def policy_modules(model: Any) -> list[Any]:
    """The modules that TRL's policy forward goes through by ``__call__`` (so that forward hooks see it): the model;
    under PEFT the base model and the tuner around it (depending on the PEFT version and task type, one or the
    other is called directly, past its hooks; a forward seen by both is kept once)."""
    if not is_peft_model(model):
        return [model]
    base, tuner = model.get_base_model(), model.base_model
    return [base] if tuner is base else [base, tuner]


class LogProbCapture:
    """Keeps the per-token log-probs of the policy (and the reference) computed inside one ``compute_loss`` call.

    Args:
        path: :data:`FUSED` or :data:`LOGITS` (from :func:`check_trl`).
        trainer_class: the TRL trainer whose loss is read (``DPOTrainer`` when None, or ``KTOTrainer``).
    """

    def __init__(self, path: str, trainer_class: Any = None) -> None:
        self.path = path
        self.armed = False
        # Logits path: the namespace of TRL's `_compute_loss`, whose log-prob functions are swapped while armed.
        self._module_globals = _dpo_compute_loss(trainer_class).__globals__ if path == LOGITS else {}
        self.has_policy_fn = POLICY_FN in self._module_globals
        self.policy: list[torch.Tensor] = []  # fused: every hooked policy-module forward; logits: see _wrap
        self.ref: list[torch.Tensor] = []
        self.handles: list[Any] = []

    def attach(self, module: torch.nn.Module, into: list[torch.Tensor]) -> None:
        """Fused path: hook ``module``'s fused-LM-head forwards, appending their log-probs to ``into``
        (``self.policy`` or ``self.ref``) while armed."""

        def hook(module, args, kwargs, output):
            # One forward can pass two hooked modules (a PEFT tuner and the model it wraps): keep it once.
            if self.armed and kwargs.get("fused_lm_head") and not (into and into[-1] is output.log_probs):
                into.append(output.log_probs)

        self.handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def _wrap(self, fn: Any, policy: bool) -> Any:
        """Logits path: ``fn`` keeping what it returns. The policy function (``..._and_entropy``) returns
        ``(logps, entropy)``; the shared one is called for the policy first, then for the reference."""

        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            if not self.armed:  # paused (KTO's KL-estimate forward)
                return out
            if policy:
                self.policy.append(out[0])
            elif self.has_policy_fn or self.policy:
                self.ref.append(out)
            else:
                self.policy.append(out)
            return out

        return wrapped

    @contextlib.contextmanager
    def capturing(self) -> Iterator[LogProbCapture]:
        """Arm the capture for one loss computation; on the logits path, swap the log-prob functions of TRL's
        ``dpo_trainer`` module for capturing wrappers, and put them back afterwards (also on an error)."""
        self.policy.clear()
        self.ref.clear()
        swapped: dict[str, Any] = {}
        module_globals = self._module_globals
        try:
            for name, policy in ((POLICY_FN, True), (SHARED_FN, False)):
                if name in module_globals:
                    swapped[name] = module_globals[name]
                    module_globals[name] = self._wrap(swapped[name], policy)
            self.armed = True
            yield self
        finally:
            self.armed = False
            module_globals.update(swapped)
            self.policy.clear()
            self.ref.clear()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Capture nothing while the block runs (KTO's KL-estimate forwards, on mismatched completions), then go
        back to the state before it."""
        armed, self.armed = self.armed, False
        try:
            yield
        finally:
            self.armed = armed

    def logps(self, peft_reference: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(policy, reference)`` per-token log-probs of the current loss call (None when not computed).

        Args:
            peft_reference: the reference is the policy with its adapter disabled (PEFT, no ``ref_model``): on the
                fused path it is the second forward of the hooked policy module.
        """
        policy = self.policy[0] if self.policy else None
        if self.ref:
            return policy, self.ref[0]
        if self.path == FUSED and peft_reference and len(self.policy) > 1:
            return policy, self.policy[1]
        return policy, None

    def remove(self) -> None:
        """Remove the forward hooks."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
