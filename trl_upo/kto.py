"""``UPOKTOTrainer``: TRL's ``KTOTrainer`` plus the UPO auxiliary term, for unpaired (desirable / undesirable) data.

The UPO paper puts its auxiliary term on top of KTO. This module is :class:`~trl_upo.UPOMixin` on ``KTOTrainer``:
the same heads, scoring (once, cached), statistics (fitted on the train split, saved in ``upo_state.json``), collator
and logging, with one response per row (the ``completion``, role ``UNPAIRED_ROLES``) instead of two. What differs:

- the data: a paired dataset (``chosen``/``rejected``) is unpaired first, as ``KTOTrainer`` would unpair it; an
  unpaired one must have a boolean ``label``; both are checked before any scoring (:func:`unpaired_dataset`);
- the term: ``L = L_KTO + alpha * L_aux`` with ``L_aux`` the advantage-weighted mean log-likelihood of the desirable
  completions of the global batch (``upo_applies_to="all"``: of every completion), from the policy forward KTO
  already runs (:func:`trl_upo.objective.unpaired_awr_term`);
- KTO's KL-estimate forward (the policy and the reference on mismatched completions, ``_compute_kl_logps``) is not
  captured: the capture is paused while it runs, so it is never mistaken for the policy forward.

See ``docs/kto.md``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from datasets import Dataset, Value
from trl import KTOTrainer

from .compat import TESTED_TRL, TRLContractError, trl_version
from .config import UPOArguments, UPOKTOConfig
from .formats import DataError
from .objective import masked_mean, sequence_loglik, unpaired_awr_term
from .scoring import UNPAIRED_ROLES
from .trainer import _UPO_CITATION, UPOMixin

__all__ = ["UPOKTOConfig", "UPOKTOMixin", "UPOKTOTrainer", "unpaired_dataset"]

#: The constructor parameters of ``KTOTrainer``, in order: how the mixin reads positional arguments.
_KTO_PARAMETERS = [n for n in inspect.signature(KTOTrainer.__init__).parameters if n != "self"]


def unpaired_dataset(dataset: Any, split: str, *, train: bool, applies_to: str, num_proc: int | None = None) -> Any:
    """The unpaired rows UPO scores, checked before any scoring.

    A paired dataset (``chosen`` and ``rejected``, no ``completion``) is unpaired exactly as ``KTOTrainer`` unpairs it
    (TRL's ``extract_prompt`` for an implicit prompt, then ``unpair_preference_dataset``): the chosen answer becomes a
    desirable row, the rejected one an undesirable row. An unpaired dataset needs ``prompt``, ``completion`` and a
    boolean ``label`` (True: desirable). Anything that is not a ``datasets.Dataset`` is returned unchanged (the
    scoring step rejects it with its own message).

    Args:
        dataset: the train or an eval dataset.
        split: its name, for the messages.
        train: the train split: it must hold desirable and undesirable rows.
        applies_to: ``upo_applies_to`` (``desirable`` needs desirable rows in the train split).
        num_proc: processes for the unpairing map (``dataset_num_proc``, as KTOTrainer uses).

    Raises:
        ValueError: no ``completion``/``label`` columns, a label that is not boolean or missing, an empty train split,
            or a train split with only desirable (or, for ``applies_to="desirable"``, no desirable) rows.
    """
    if not isinstance(dataset, Dataset):
        return dataset
    cols = set(dataset.column_names)
    if "completion" not in cols and {"chosen", "rejected"} <= cols:
        from trl.data_utils import extract_prompt, unpair_preference_dataset

        if "prompt" not in cols:
            dataset = dataset.map(extract_prompt, num_proc=num_proc, desc=f"Extracting prompt from {split} dataset")
        dataset = unpair_preference_dataset(dataset, num_proc=num_proc, desc=f"Unpairing {split} dataset")
        cols = set(dataset.column_names)
    if "completion" not in cols or "label" not in cols:
        missing = [c for c in ("completion", "label") if c not in cols]
        raise DataError(
            f"UPOKTOTrainer needs unpaired data: a 'prompt', a 'completion' and a boolean 'label' column (True: "
            f"desirable, False: undesirable), or preference pairs ('chosen' and 'rejected'), which it unpairs as "
            f"KTOTrainer does. The {split} dataset has no {missing}; its columns: {sorted(cols)}. Add the column "
            f"(e.g. dataset.add_column('label', [...])) or rename yours (dataset.rename_column(old, 'label'))."
        )
    feature = dataset.features["label"]
    if not (isinstance(feature, Value) and feature.dtype == "bool"):
        raise DataError(
            f"The 'label' column of the {split} dataset must be boolean (True: desirable, False: undesirable); it is "
            f"{feature}. Convert it explicitly, e.g. dataset.map(lambda r: {{'label': r['label'] == 'good'}}) (then "
            f"cast_column('label', Value('bool'))), so that no value is misread."
        )
    labels = dataset["label"]
    if any(v is None for v in labels):
        first = next(i for i, v in enumerate(labels) if v is None)
        raise DataError(
            f"The {split} dataset has rows without a label (row {first} is the first): label every row True or False, "
            f"or filter those rows out (dataset.filter(lambda r: r['label'] is not None))."
        )
    if train:
        desirable = sum(labels)
        if len(labels) == 0:
            raise DataError("The train dataset is empty.")
        if desirable == len(labels):
            raise DataError(
                f"Every row of the train dataset is desirable (label True, {desirable} rows): KTO learns from both "
                f"kinds, and its loss needs undesirable rows (label False) too, such as the rejected answers of your "
                f"preference data. With desirable answers only, train with SFT."
            )
        if desirable == 0 and applies_to == "desirable":
            raise DataError(
                f"No row of the train dataset is desirable (label True, out of {len(labels)}): the auxiliary term "
                f"applies to the desirable completions (upo_applies_to='desirable') and would never train. Add "
                f"desirable rows, or set upo_applies_to='all'."
            )
    return dataset


class UPOKTOMixin(UPOMixin):
    """UPO for any ``KTOTrainer`` (or subclass of it) on unpaired data: put it first among the bases, as
    ``class MyUPOKTO(UPOKTOMixin, MyKTO)``. Its constructor takes ``KTOTrainer``'s arguments; ``args`` must be a
    :class:`~trl_upo.UPOKTOConfig` (or subclass) for reward heads."""

    _upo_roles = UNPAIRED_ROLES
    _upo_parameters = _KTO_PARAMETERS
    _upo_config_class = UPOKTOConfig
    _upo_drop_nan = True

    @classmethod
    def _upo_trl_class(cls) -> type:
        return KTOTrainer

    def _upo_setup_heads(self, args) -> None:
        """As for pairs; a ``UPOConfig`` (DPO's) with heads is refused: its ``upo_applies_to`` choices are for
        pairs."""
        if isinstance(args, UPOArguments) and not isinstance(args, UPOKTOConfig) and args.head_specs:
            raise TypeError(
                f"{type(self).__name__} trains on unpaired data and needs a UPOKTOConfig for reward heads, got a "
                f"{type(args).__name__}; build the same settings with UPOKTOConfig (upo_applies_to: desirable or all)."
            )
        super()._upo_setup_heads(args)

    def _upo_prepare_datasets(self, args, train_dataset, eval_dataset, tokenizer) -> tuple[Any, Any]:
        """Unpair and check every split before any scoring, then score, fit and add the values as for pairs."""
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        kw = dict(applies_to=args.upo_applies_to, num_proc=args.dataset_num_proc)
        train_dataset = unpaired_dataset(train_dataset, "train", train=True, **kw)
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: unpaired_dataset(v, k, train=False, **kw) for k, v in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = unpaired_dataset(eval_dataset, "eval", train=False, **kw)
        return super()._upo_prepare_datasets(args, train_dataset, eval_dataset, tokenizer)

    def _upo_score(self, dataset, split: str, args, tokenizer) -> Dataset:
        """Score the completions of an (unpaired, checked) dataset; a dataset passed to ``evaluate`` comes here
        directly, so it is unpaired and checked here too (a no-op for one already prepared)."""
        dataset = unpaired_dataset(
            dataset, split, train=False, applies_to=args.upo_applies_to, num_proc=args.dataset_num_proc
        )
        return super()._upo_score(dataset, split, args, tokenizer)

    def _compute_kl_logps(self, model, batch):
        """KTO's KL-estimate forward (mismatched completions), with the log-prob capture paused: it is not the
        policy forward whose log-likelihoods the auxiliary term trains."""
        capture = getattr(self, "_upo_capture", None)
        if capture is None:
            return super()._compute_kl_logps(model, batch)
        with capture.paused():
            return super()._compute_kl_logps(model, batch)

    def _upo_term(self, mode: str, inputs, values, policy_logps, ref_logps) -> torch.Tensor:
        """``alpha * L_aux`` of one batch of unpaired rows, and its metrics.

        ``values``: the ``(B, 2K + 1)`` per-row values (raw and normalised scores, r_aux of the completion). One
        collective gathers them with each row's label and log-likelihood.
        """
        args: UPOKTOConfig = self.args
        shift_mask = inputs["completion_mask"][:, 1:]
        seq_len = shift_mask.size(1)
        if policy_logps is None or policy_logps.size(0) != shift_mask.size(0) or policy_logps.size(1) < seq_len:
            raise TRLContractError(
                f"UPO did not see the policy's per-token log-probabilities in this step (TRL {trl_version()}'s "
                f"KTOTrainer, read through its {self._upo_path} path): TRL computed them in a way UPO does not know. "
                f"trl-upo is tested with TRL {TESTED_TRL[0]} to {TESTED_TRL[1]}; see docs/compatibility.md."
            )
        per_token = policy_logps if policy_logps.size(1) == seq_len else policy_logps[:, -seq_len:]
        ll = sequence_loglik(per_token, shift_mask, args.upo_loglik)  # (B,)
        labels = inputs["label"].to(torch.float64)
        rows, mask, local = self._upo_gather_step(values, labels, ll.detach())
        width = len(self._upo_value_names)
        real = torch.ones_like(rows[:, 0], dtype=torch.bool) if mask is None else mask
        desirable = (rows[:, width] > 0.5) & real
        undesirable = ~desirable & real
        selected = desirable if args.upo_applies_to == "desirable" else real
        r_aux, all_ll = rows[:, width - 1], rows[:, width + 1]
        term = unpaired_awr_term(
            r_aux,
            selected,
            ll,
            local=local,
            all_loglik=all_ll,
            num_processes=self.accelerator.num_processes,
            baseline=args.upo_baseline,
            temperature=args.upo_temperature,
            weight_cap=args.upo_weight_cap,
            normalize=args.upo_normalize_weights,
        )
        metrics = {
            **self._upo_value_means(rows, mask),
            "upo/reward_aux/desirable": masked_mean(r_aux, desirable),
            "upo/reward_aux/undesirable": masked_mean(r_aux, undesirable),
            "upo/loglik/desirable": masked_mean(all_ll, desirable),
            "upo/loglik/undesirable": masked_mean(all_ll, undesirable),
        }
        metrics.update({f"upo/{name}": value for name, value in term.stats.items()})
        self._upo_log(mode, metrics)
        return args.upo_alpha * term.loss


class UPOKTOTrainer(UPOKTOMixin, KTOTrainer):
    """
    Trainer for Unified Preference Optimization on unpaired data: TRL's KTO loss plus an advantage-weighted
    log-likelihood term driven by reward heads (designer objectives), ``L = L_KTO + alpha * L_aux``.

    The constructor is KTOTrainer's. With no reward heads (or ``upo_alpha=0``) it trains exactly like
    ``KTOTrainer``. Paper: [Unified Preference Optimization](https://huggingface.co/papers/2405.17956), whose
    experiments put the term on KTO. To add UPO to another ``KTOTrainer`` subclass, use :class:`UPOKTOMixin`.

    Example:

    ```python
    from trl_upo import UPOKTOConfig, UPOKTOTrainer

    args = UPOKTOConfig(
        output_dir="out",
        reward_heads=[{"name": "length", "weight": 1.0, "params": {"direction": "shorter"}}],
        upo_alpha=1.0,
    )
    # rows: prompt, completion, label (True: desirable); or chosen/rejected pairs, unpaired as KTOTrainer does
    trainer = UPOKTOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    ```
    """

    _tag_names = ["trl", "kto", "upo"]
    _name = "UPO-KTO"
    _paper = {
        "title": "Unified Preference Optimization: Language Model Alignment Beyond the Preference Frontier",
        "id": "2405.17956",
        "citation": _UPO_CITATION + "\n\n" + KTOTrainer._paper["citation"],
    }
