"""``UPOTrainer``: TRL's ``DPOTrainer`` plus the UPO auxiliary term, by subclassing and hooking (``UPOKTOTrainer``,
in ``trl_upo.kto``, is the same mixin on ``KTOTrainer``). What it adds, top to bottom:

1. ``__init__``: scores the train and eval sets with every reward head (cached), fits the normalisation statistics
   on the train split, then hands everything to ``DPOTrainer.__init__`` unchanged.
2. The normalised scores and auxiliary reward of every response depend only on the fitted statistics, so they are
   computed once for the whole dataset (vectorised, ``trl_upo.collator``) and stored next to the raw scores. These
   columns survive TRL's column pruning (``_set_signature_columns_if_needed``) and are stacked into the batch by a
   wrapping collator; they are popped in ``compute_loss`` before TRL forwards the inputs to the model. A step only
   computes what depends on the batch: advantages, weights and the weighted log-likelihood.
3. A forward hook on the policy module captures the per-token log-probabilities of the forward TRL already runs
   (no second forward, no second model copy); the auxiliary term is computed from them (``trl_upo.objective``)
   and added to TRL's loss.
4. ``save_model`` writes ``upo_state.json`` (resolved heads and statistics; ``trl_upo.state``) to the output dir and
   every checkpoint; ``train(resume_from_checkpoint=...)`` reads it back so a resumed run uses the same scale (and
   recomputes the normalised columns with it).
"""

from __future__ import annotations

import inspect
import logging
import math
import textwrap
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from transformers import AutoProcessor, ProcessorMixin
from transformers.trainer_utils import get_last_checkpoint
from trl import DPOTrainer
from trl.trainer.utils import get_config_model_id

from .collator import VALUES_COLUMN, VALUES_KEY, UPODataCollator, add_values_column, head_signs_and_weights
from .collator import step_value_layout
from .config import UPOArguments, UPOConfig
from .heads import HeadSpec, build_head
from .compat import (
    FUSED,
    TESTED_TRL,
    LogProbCapture,
    TRLContractError,
    check_trl,
    is_peft_model as _is_peft_model,
    policy_modules as _policy_modules,
    trl_version,
)
from .objective import awr_term, margin_correction, masked_mean_rows, sequence_loglik
from .scoring import ROLES, fit_head_statistics, score_column, score_dataset
from .state import STATE_FILE, build_state, load_upo_state, resume_statistics, save_state

__all__ = ["STATE_FILE", "VALUES_COLUMN", "VALUES_KEY", "UPODataCollator", "UPOMixin", "UPOTrainer", "load_upo_state",
           "step_value_layout"]
logger = logging.getLogger(__name__)

_UPO_CITATION = textwrap.dedent("""\
    @article{badrinath2025unified,
        title        = {{Unified Preference Optimization: Language Model Alignment Beyond the Preference Frontier}},
        author       = {Anirudhan Badrinath and Prabhat Agarwal and Jiajing Xu},
        year         = 2025,
        journal      = {Transactions on Machine Learning Research},
        eprint       = {2405.17956},
        archivePrefix= {arXiv},
    }""")


#: The constructor parameters of ``DPOTrainer``, in order: how the mixin reads positional arguments.
_DPO_PARAMETERS = [n for n in inspect.signature(DPOTrainer.__init__).parameters if n != "self"]


class UPOMixin:
    """UPO for any ``DPOTrainer`` (or subclass of it): put it first among the bases.

    ``class UPOTrainer(UPOMixin, DPOTrainer)`` is this package's trainer; a ``class MyDPO(DPOTrainer)`` of your own (or
    another framework's, such as axolotl's), with its own ``compute_loss`` or other overrides, gains UPO as
    ``class MyUPO(UPOMixin, MyDPO)``. The mixin scores the datasets before the trainer's constructor runs, wraps the
    collator after it, and wraps ``compute_loss``: it reads the policy's log-probs from the forward TRL runs inside
    whatever ``compute_loss`` the next class provides, and adds ``alpha * L_aux``. Its constructor takes the next
    class's arguments (by keyword, or positionally in ``DPOTrainer``'s order); ``args`` must be a
    :class:`~trl_upo.UPOConfig` (or subclass) for reward heads, and any other config trains without them.
    """

    #: The response columns of a row (paired data: chosen and rejected); ``UPOKTOMixin`` has one, the completion.
    _upo_roles: tuple[str, ...] = ROLES
    #: The constructor parameters of the TRL trainer, in order (how positional arguments are read).
    _upo_parameters: list[str] = _DPO_PARAMETERS
    #: The config built when none is given.
    _upo_config_class: type = UPOConfig
    #: Drop a step statistic that is NaN (over no row of its kind: KTO batches may hold no desirable completion).
    _upo_drop_nan = False

    @classmethod
    def _upo_trl_class(cls) -> type:
        """The TRL trainer whose loss UPO reads (``check_trl``, ``LogProbCapture``)."""
        return DPOTrainer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        parameters = self._upo_parameters
        if len(args) > len(parameters):
            raise TypeError(f"{type(self).__name__} takes at most {len(parameters)} positional arguments")
        named = {**dict(zip(parameters, args)), **kwargs}
        model = named.get("model")
        if named.get("args") is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            named["args"] = self._upo_config_class(f"{model_name.split('/')[-1]}-UPO")
        config = named["args"]
        self._upo_setup_heads(config)
        if self._upo_heads:
            # Before any scoring: a TRL that UPO cannot read fails here.
            trl_class = self._upo_trl_class()
            self._upo_path = check_trl(config) if trl_class is DPOTrainer else check_trl(config, trl_class)
            if named.get("processing_class") is None:
                # The processor DPOTrainer would load (and then does not load again); loaded here because heads may
                # need the tokenizer.
                model_id = model if isinstance(model, str) else get_config_model_id(model.config)
                named["processing_class"] = AutoProcessor.from_pretrained(
                    model_id, trust_remote_code=config.trust_remote_code
                )
            named["train_dataset"], named["eval_dataset"] = self._upo_prepare_datasets(
                config, named.get("train_dataset"), named.get("eval_dataset"), _tokenizer_of(named["processing_class"])
            )
        super().__init__(**named)
        self._upo_capture = None
        self._upo_hook_handles: list[Any] = []
        if self._upo_heads:
            trl_class = self._upo_trl_class()
            self._upo_capture = LogProbCapture(self._upo_path, None if trl_class is DPOTrainer else trl_class)
            self._upo_check_parallelism()
            self.data_collator = UPODataCollator(
                self.data_collator, [s.name for s in self._upo_specs], roles=self._upo_roles
            )
            if self.args.upo_alpha > 0:
                self._upo_attach_hooks()

    def _upo_attach_hooks(self) -> None:
        """Fused path: hook the policy (and an explicit reference model) to read their log-probs. Done at
        construction when ``upo_alpha > 0``, or at the first step that needs it (``upo_alpha`` raised after
        construction); nothing hooks the model while the term is off."""
        if self._upo_path != FUSED or self._upo_hook_handles:
            return
        for module in _policy_modules(self.model):
            self._upo_capture.attach(module, self._upo_capture.policy)
        if self.ref_model is not None:
            self._upo_capture.attach(self.accelerator.unwrap_model(self.ref_model), self._upo_capture.ref)
        self._upo_hook_handles = self._upo_capture.handles

    def _upo_setup_heads(self, args) -> None:
        """Build the heads of ``args`` (none without a ``UPOConfig``) and the names of a step's per-pair values."""
        specs: list[HeadSpec] = args.head_specs if isinstance(args, UPOArguments) else []
        if specs and not isinstance(args, self._upo_config_class):  # before any scoring, not after it
            raise TypeError(f"{type(self).__name__} needs a {self._upo_config_class.__name__} (or subclass) for reward "
                            f"heads, got a {type(args).__name__}: build the same settings with the right config.")
        if not isinstance(args, UPOArguments):
            logger.info("%s got a %s, not a %s: no reward heads, training as %s.", type(self).__name__,
                        type(args).__name__, self._upo_config_class.__name__, self._upo_trl_class().__name__)
        self._upo_specs = specs
        self._upo_heads = [build_head(s) for s in specs]
        self._upo_stats: list[dict] = []
        self._upo_signs, self._upo_weights = head_signs_and_weights(specs)
        self._upo_path = None
        roles = self._upo_roles
        self._upo_value_names = step_value_layout([s.name for s in specs], roles)
        # The order the per-pair metrics are logged in: head by head.
        self._upo_log_order = [
            f"upo/{s.name}/{m}" for s in specs for m in (*roles, *(f"{r}_norm" for r in roles))
        ] + [f"upo/reward_aux/{r}" for r in roles]
        self._upo_score_report: dict[str, dict[str, str]] = {}

    def _upo_prepare_datasets(self, args: UPOConfig, train_dataset, eval_dataset, tokenizer) -> tuple[Any, Any]:
        """Score the train and eval sets (cached), fit the statistics on the train split, add the per-pair values,
        then free the heads' models before training starts."""
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        train_dataset = self._upo_score(train_dataset, "train", args, tokenizer)
        self._upo_stats = fit_head_statistics(
            train_dataset, self._upo_specs, args.upo_normalization, roles=self._upo_roles
        )
        train_dataset = self._upo_add_normalized(train_dataset)
        if eval_dataset is not None:
            eval_dataset = self._upo_prepare_eval(eval_dataset, "eval", args, tokenizer)
        for head in self._upo_heads:
            head.release()
        return train_dataset, eval_dataset

    def _upo_check_parallelism(self) -> None:
        pc = self.accelerator.parallelism_config
        if pc is not None and ((pc.cp_size or 1) > 1 or (getattr(pc, "sp_size", None) or 1) > 1):
            raise NotImplementedError(
                "UPOTrainer with reward heads does not support context or sequence parallelism yet: the "
                "per-response log-likelihoods are sharded across ranks. Use data parallelism (DDP, ZeRO, FSDP)."
            )

    # ------------------------------------------------------------------------------------------------------------
    # Scoring (before training)
    # ------------------------------------------------------------------------------------------------------------

    def _upo_score(self, dataset, split: str, args: UPOConfig, tokenizer) -> Dataset:
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                f"Reward heads score the whole {split} dataset before training and normalise over the train split, "
                f"which an IterableDataset does not allow. Load it as a map-style Dataset (streaming=False), or "
                f"train without reward heads."
            )
        if not isinstance(dataset, Dataset):
            raise TypeError(f"The {split} dataset must be a `datasets.Dataset`, got {type(dataset).__name__}.")
        if "image" in dataset.column_names or "images" in dataset.column_names:
            raise NotImplementedError(
                "Reward heads on vision-language preference data are not supported yet; train this dataset with "
                "DPOTrainer, or without reward heads."
            )
        # Every rank scores its share and gets all the scores (one gather): no rank waits for another to score all.
        scored, report = score_dataset(
            dataset,
            self._upo_heads,
            self._upo_specs,
            split=split,
            tokenizer=tokenizer,
            batch_size=args.upo_score_batch_size,
            cache_dir=args.upo_score_cache_dir,
            use_cache=args.upo_use_score_cache,
            num_proc=args.dataset_num_proc,
            roles=self._upo_roles,
            distributed=args.world_size > 1,
        )
        self._upo_score_report[split] = report.status
        return scored

    def _upo_prepare_eval(self, dataset, split: str, args: UPOConfig, tokenizer):
        """Score an evaluation dataset (or a dict of them) and normalise it with the train statistics."""
        if isinstance(dataset, dict):
            return {k: self._upo_prepare_eval(v, k, args, tokenizer) for k, v in dataset.items()}
        return self._upo_add_normalized(self._upo_score(dataset, split, args, tokenizer))

    def _upo_add_normalized(self, dataset: Dataset) -> Dataset:
        """Add the per-pair values computed with the current statistics (``trl_upo.collator.add_values_column``)."""
        return add_values_column(dataset, self._upo_specs, self._upo_stats, self._upo_roles)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._upo_specs:
            extra = [score_column(s.name, r) for s in self._upo_specs for r in self._upo_roles] + [VALUES_COLUMN]
            self._signature_columns = list(self._signature_columns) + [
                c for c in extra if c not in self._signature_columns
            ]

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """The next class's ``evaluate``; a dataset passed here is scored first, with the train statistics."""
        # A dataset passed here directly is scored like the ones given at construction, with the train statistics.
        if self._upo_heads and eval_dataset is not None and not isinstance(eval_dataset, str):
            tokenizer = _tokenizer_of(self.processing_class)
            eval_dataset = self._upo_prepare_eval(eval_dataset, metric_key_prefix, self.args, tokenizer)
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def compute_ref_log_probs(self, model, inputs):
        """The next class's reference log-probs of a batch, without the UPO values (the model never sees them)."""
        inputs = {k: v for k, v in inputs.items() if k != VALUES_KEY}
        return super().compute_ref_log_probs(model, inputs)

    # ------------------------------------------------------------------------------------------------------------
    # The loss
    # ------------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The next class's loss (TRL's DPO loss) plus ``alpha * L_aux``, from the log-probs of TRL's own forward."""
        values = inputs.pop(VALUES_KEY, None)
        loss_kwargs = {"return_outputs": return_outputs, "num_items_in_batch": num_items_in_batch}
        if not self._upo_heads:
            return super().compute_loss(model, inputs, **loss_kwargs)
        if values is None:
            raise ValueError(
                "The batch has no UPO scores. A custom `data_collator` replaced the one UPOTrainer wraps after "
                "construction; pass it to the constructor instead so that the scores are added to it."
            )
        mode = "train" if self.model.training else "eval"
        if self.args.upo_alpha == 0:
            result = super().compute_loss(model, inputs, **loss_kwargs)
            rows, mask, _ = self._upo_gather_step(values)
            self._upo_log(mode, self._upo_value_means(rows, mask))
            return result
        self._upo_attach_hooks()  # no-op unless upo_alpha was raised from 0 after construction
        peft_reference = self.ref_model is None and _is_peft_model(self.accelerator.unwrap_model(self.model))
        with self._upo_capture.capturing() as capture:
            result = super().compute_loss(model, inputs, **loss_kwargs)
            policy_logps, ref_logps = capture.logps(peft_reference)
        loss, outputs = result if return_outputs else (result, None)
        loss = loss + self._upo_term(mode, inputs, values, policy_logps, ref_logps)
        return (loss, outputs) if return_outputs else loss

    def _upo_gather_step(self, values: torch.Tensor, *columns: torch.Tensor) -> tuple[torch.Tensor, Any, slice]:
        """The per-pair values (and further per-pair ``columns``) of the global batch, in ONE collective.

        Every process pads its rows to the same number (the per-device batch size) and flags the real ones, so a
        single ``all_gather`` of one fixed-shape tensor brings every process everything the step's statistics and
        the batch-wide advantage baseline and weight normalisation need, without a host sync.

        Returns:
            ``(rows, mask, local)``: ``(G, C)`` float64 rows of the global batch, the ``(G,)`` bool mask of real rows
            (None on one process: every row is real), and the slice of ``rows`` that is this process's batch.
        """
        own = torch.cat([values, *(c.detach().to(torch.float64).reshape(values.size(0), -1) for c in columns)], dim=1)
        n = own.size(0)
        if self.accelerator.num_processes == 1:
            return own, None, slice(0, n)
        capacity = max(self.args.per_device_train_batch_size, self.args.per_device_eval_batch_size)
        if n > capacity:
            raise ValueError(
                f"A batch of {n} pairs is larger than the per-device batch size ({capacity}) that UPO pads to when "
                f"gathering a step's values across processes; set per_device_train_batch_size (and "
                f"per_device_eval_batch_size) to the largest batch the data loader gives."
            )
        padded = own.new_zeros(capacity, own.size(1) + 1)
        padded[:n, 0] = 1.0
        padded[:n, 1:] = own
        gathered = self.accelerator.gather(padded)
        start = self.accelerator.process_index * capacity
        return gathered[:, 1:], gathered[:, 0] > 0, slice(start, start + n)

    def _upo_value_means(self, rows: torch.Tensor, mask: Any) -> dict[str, torch.Tensor]:
        """The batch means of the per-pair values (raw and normalised scores, r_aux), by metric name."""
        width = len(self._upo_value_names)
        means = rows[:, :width].mean(0) if mask is None else masked_mean_rows(rows[:, :width], mask)
        return {tuple(self._upo_value_names): means}

    def _upo_term(self, mode: str, inputs, values, policy_logps, ref_logps) -> torch.Tensor:
        """The auxiliary term of one batch (``alpha * L_aux``, or the margin correction), and its metrics.

        ``values``: the ``(B, 4K + 2)`` per-pair values the collator hands over (raw and normalised scores, r_aux;
        precomputed for the whole dataset).
        """
        args: UPOConfig = self.args
        shift_mask = inputs["completion_mask"][:, 1:]
        seq_len = shift_mask.size(1)
        if policy_logps is None or policy_logps.size(0) != shift_mask.size(0) or policy_logps.size(1) < seq_len:
            raise TRLContractError(
                f"UPO did not see the policy's per-token log-probabilities in this step (TRL {trl_version()}, read "
                f"through its {self._upo_path} path): TRL computed them in a way UPO does not know. trl-upo is tested "
                f"with TRL {TESTED_TRL[0]} to {TESTED_TRL[1]}; see docs/compatibility.md."
            )
        # Aligned with the shifted mask already on every supported TRL; slicing only when not (a slice adds a node
        # to the backward graph).
        per_token = policy_logps if policy_logps.size(1) == seq_len else policy_logps[:, -seq_len:]
        k2 = 4 * len(self._upo_specs)
        if args.upo_combine == "margin":
            return self._upo_margin_term(mode, inputs, values, per_token, ref_logps, shift_mask)
        ll = sequence_loglik(per_token, shift_mask, args.upo_loglik)  # (2B,): chosen, then rejected
        rows, mask, local = self._upo_gather_step(values, ll.detach().view(2, -1).T)
        width = len(self._upo_value_names)
        term = awr_term(
            rows[:, k2].to(ll.dtype),
            rows[:, k2 + 1].to(ll.dtype),
            ll,
            local=local,
            all_loglik=None if mask is None else rows[:, width:].T.to(ll.dtype),
            mask=mask,
            baseline=args.upo_baseline,
            applies_to=args.upo_applies_to,
            temperature=args.upo_temperature,
            weight_cap=args.upo_weight_cap,
            normalize=args.upo_normalize_weights,
        )
        # The log-likelihood means stay in their dtype so that they equal TRL's logged `logps/chosen|rejected`
        # exactly under `upo_loglik="sum"`.
        if mask is None:
            loglik = ll.detach().view(2, -1).mean(1)
        else:
            loglik = masked_mean_rows(rows[:, width:].to(ll.dtype), mask)
        metrics = {**self._upo_value_means(rows, mask), ("upo/loglik/chosen", "upo/loglik/rejected"): loglik}
        metrics.update({f"upo/{name}": value for name, value in term.stats.items()})
        self._upo_log(mode, metrics)
        return args.upo_alpha * term.loss

    def _upo_margin_term(self, mode, inputs, values, per_token, ref_logps, shift_mask) -> torch.Tensor:
        """``upo_combine="margin"``: the correction that turns TRL's sigmoid loss into the MODPO-style margin loss."""
        logps_c, logps_r = sequence_loglik(per_token, shift_mask, "sum").chunk(2)
        if self.precompute_ref_logps:
            ref_c, ref_r = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            if ref_logps is None:
                raise RuntimeError("UPOTrainer did not see the reference forward needed by upo_combine='margin'.")
            ref_c, ref_r = sequence_loglik(ref_logps[:, -shift_mask.size(1) :], shift_mask, "sum").chunk(2)
        delta = (logps_c - ref_c.to(logps_c)) - (logps_r - ref_r.to(logps_r))
        k2 = 4 * len(self._upo_specs)
        reward_margin = (values[:, k2] - values[:, k2 + 1]).to(delta)
        per_pair = margin_correction(delta, reward_margin, beta=self.beta, alpha=self.args.upo_alpha, reduction="none")
        per_pair = per_pair * self.loss_weights[0]
        rows, mask, _ = self._upo_gather_step(values, per_pair)
        width = len(self._upo_value_names)
        correction = rows[:, width].mean() if mask is None else masked_mean_rows(rows[:, width:], mask)[0]
        self._upo_log(mode, {**self._upo_value_means(rows, mask), "upo/margin_correction": correction})
        return per_pair.mean()

    def _upo_log(self, mode: str, metrics: dict[str | tuple[str, ...], torch.Tensor]) -> None:
        """Append a step's metrics, given by name, to ``self._metrics[mode]`` with one host sync (one ``.tolist()``).

        A key is a metric's name (its value a scalar tensor), or a tuple of names (its value a 1-D tensor with one
        entry per name, such as the means of the per-pair values): reductions stay vectorised, names stay explicit.
        """
        names = [n for key in metrics for n in ((key,) if isinstance(key, str) else key)]
        parts = [value.reshape(-1).to(torch.float64) for value in metrics.values()]
        logged = dict(zip(names, torch.cat(parts).tolist(), strict=True))
        if self._upo_drop_nan:  # unpaired data: a statistic over no row of its kind in this batch is not logged
            logged = {k: v for k, v in logged.items() if k in self._upo_log_order or math.isfinite(v)}
        out = self._metrics[mode]
        for name in self._upo_log_order:
            out[name].append(logged.pop(name))
        if "upo/margin_correction" in logged:
            # The mean reward margin is the difference of the two mean rewards: no reduction of its own.
            out["upo/reward_margin"].append(out["upo/reward_aux/chosen"][-1] - out["upo/reward_aux/rejected"][-1])
        for name in _LOG_ORDER:
            if name in logged:
                out[name].append(logged.pop(name))
        for name, value in logged.items():
            out[name].append(value)

    # ------------------------------------------------------------------------------------------------------------
    # Saving and resuming
    # ------------------------------------------------------------------------------------------------------------

    def upo_state(self) -> dict[str, Any]:
        """The resolved heads, their fingerprints and normalisation statistics, and the UPO settings."""
        return build_state(self._upo_specs, self._upo_heads, self._upo_stats, self.args)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save the model as the next class does, and ``upo_state.json`` next to it (with reward heads)."""
        super().save_model(output_dir, _internal_call)
        if self._upo_specs and self.args.should_save:
            save_state(output_dir or self.args.output_dir, self.upo_state())

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Train as the next class does; a resumed run first adopts the checkpoint's ``upo_state.json``."""
        if isinstance(self.args, UPOArguments):
            # The upo_* fields may have been changed since the config was built (trainer.args.upo_alpha = ...).
            self.args.validate_upo()
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if checkpoint and self._upo_specs:
            self._upo_load_state(str(checkpoint))
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    def _upo_load_state(self, checkpoint: str) -> None:
        """Adopt the checkpoint's statistics (after checking its heads); recompute the per-pair values if they
        differ from the ones fitted on this run's train split."""
        stats = resume_statistics(checkpoint, self.upo_state())
        if stats is None or stats == self._upo_stats:
            return
        self._upo_stats = stats
        self.train_dataset = self._upo_add_normalized(self.train_dataset)
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {k: self._upo_add_normalized(v) for k, v in self.eval_dataset.items()}
        elif self.eval_dataset is not None:
            self.eval_dataset = self._upo_add_normalized(self.eval_dataset)


#: The order the step statistics follow the per-pair metrics in the logs.
_LOG_ORDER = ["upo/loglik/chosen", "upo/loglik/rejected", "upo/aux_loss", "upo/advantage/mean", "upo/advantage/max",
              "upo/weight/mean", "upo/weight/max", "upo/weight/capped_frac", "upo/margin_correction"]


def _tokenizer_of(processing_class: Any) -> Any:
    """The tokenizer of a processing class (a processor's ``.tokenizer``, or the tokenizer itself)."""
    return processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class


class UPOTrainer(UPOMixin, DPOTrainer):
    """
    Trainer for Unified Preference Optimization (UPO): TRL's DPO loss plus an advantage-weighted log-likelihood
    term driven by reward heads (designer objectives), ``L = L_pref + alpha * L_aux``.

    The constructor is DPOTrainer's. With no reward heads (or ``upo_alpha=0``) it trains exactly like
    ``DPOTrainer``. Paper: [Unified Preference Optimization](https://huggingface.co/papers/2405.17956). To add UPO
    to another ``DPOTrainer`` subclass, use :class:`UPOMixin`.

    Example:

    ```python
    from trl_upo import UPOConfig, UPOTrainer

    args = UPOConfig(
        output_dir="out",
        reward_heads=[{"name": "length", "weight": 1.0, "params": {"direction": "shorter"}}],
        upo_alpha=1.0,
    )
    trainer = UPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    ```
    """

    _tag_names = ["trl", "dpo", "upo"]
    _name = "UPO"
    _paper = {
        "title": "Unified Preference Optimization: Language Model Alignment Beyond the Preference Frontier",
        "id": "2405.17956",
        "citation": _UPO_CITATION + "\n\n" + DPOTrainer._paper["citation"],
    }
