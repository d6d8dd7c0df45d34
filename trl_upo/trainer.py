"""``UPOTrainer``: TRL's ``DPOTrainer`` plus the UPO auxiliary term, by subclassing and hooking.

What it adds, top to bottom:

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

import logging
import textwrap
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from transformers import AutoProcessor, ProcessorMixin
from transformers.trainer_utils import get_last_checkpoint
from trl import DPOTrainer
from trl.trainer.utils import get_config_model_id

from .collator import (
    VALUES_COLUMN,
    VALUES_KEY,
    UPODataCollator,
    add_values_column,
    head_signs_and_weights,
    step_value_layout,
)
from .config import UPOConfig
from .heads import HeadSpec, build_head
from .objective import advantages, awr_loss, awr_weights, margin_correction, sequence_loglik
from .scoring import ROLES, fit_head_statistics, score_column, score_dataset
from .state import STATE_FILE, build_state, load_upo_state, resume_statistics, save_state

__all__ = ["STATE_FILE", "VALUES_COLUMN", "VALUES_KEY", "UPODataCollator", "UPOTrainer", "load_upo_state",
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


def _is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


class _LogProbCapture:
    """Forward hooks that keep the per-token log-probs of the fused-LM-head forwards TRL runs in one loss call."""

    def __init__(self) -> None:
        self.armed = False
        self.policy: list[torch.Tensor] = []
        self.ref: list[torch.Tensor] = []

    def attach(self, module: torch.nn.Module, into: list[torch.Tensor]) -> Any:
        """Hook ``module``'s fused-LM-head forwards, appending their log-probs to ``into`` (``self.policy`` or
        ``self.ref``) while armed; returns the hook handle."""

        def hook(module, args, kwargs, output):
            if self.armed and kwargs.get("fused_lm_head"):
                into.append(output.log_probs)

        return module.register_forward_hook(hook, with_kwargs=True)

    def arm(self) -> None:
        self.policy.clear()
        self.ref.clear()
        self.armed = True

    def disarm(self) -> None:
        self.armed = False
        self.policy.clear()
        self.ref.clear()


class UPOTrainer(DPOTrainer):
    """
    Trainer for Unified Preference Optimization (UPO): TRL's DPO loss plus an advantage-weighted log-likelihood
    term driven by reward heads (designer objectives), ``L = L_pref + alpha * L_aux``.

    The constructor is DPOTrainer's. With no reward heads (or ``upo_alpha=0``) it trains exactly like
    ``DPOTrainer``. Paper: [Unified Preference Optimization](https://huggingface.co/papers/2405.17956).

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

    def __init__(
        self,
        model,
        ref_model=None,
        args: UPOConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = UPOConfig(f"{model_name.split('/')[-1]}-UPO")
        self._upo_setup_heads(args)
        if self._upo_heads:
            if processing_class is None:
                # The processor DPOTrainer would load (and then does not load again); loaded here because heads may
                # need the tokenizer.
                model_id = model if isinstance(model, str) else get_config_model_id(model.config)
                processing_class = AutoProcessor.from_pretrained(model_id, trust_remote_code=args.trust_remote_code)
            train_dataset, eval_dataset = self._upo_prepare_datasets(
                args, train_dataset, eval_dataset, _tokenizer_of(processing_class)
            )

        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )

        self._upo_capture = _LogProbCapture()
        self._upo_hook_handles: list[Any] = []
        if self._upo_heads:
            self._upo_check_parallelism()
            self.data_collator = UPODataCollator(self.data_collator, [s.name for s in self._upo_specs])
            if self.args.upo_alpha > 0:
                policy = self.model.get_base_model() if _is_peft_model(self.model) else self.model
                self._upo_hook_handles.append(self._upo_capture.attach(policy, self._upo_capture.policy))
                if self.ref_model is not None:
                    ref = self.accelerator.unwrap_model(self.ref_model)
                    self._upo_hook_handles.append(self._upo_capture.attach(ref, self._upo_capture.ref))

    def _upo_setup_heads(self, args) -> None:
        """Build the heads of ``args`` (none for a plain ``DPOConfig``) and the metric layout of a step."""
        specs: list[HeadSpec] = args.head_specs if isinstance(args, UPOConfig) else []
        if not isinstance(args, UPOConfig):
            logger.info("UPOTrainer got a %s, not a UPOConfig: no reward heads, training as DPO.", type(args).__name__)
        self._upo_specs = specs
        self._upo_heads = [build_head(s) for s in specs]
        self._upo_stats: list[dict] = []
        self._upo_signs, self._upo_weights = head_signs_and_weights(specs)
        # (metric, column of the per-pair values), in the order the metrics are logged: head by head.
        layout = step_value_layout([s.name for s in specs])
        order = [f"upo/{s.name}/{m}" for s in specs for m in ("chosen", "rejected", "chosen_norm", "rejected_norm")]
        order += ["upo/reward_aux/chosen", "upo/reward_aux/rejected"]
        self._upo_value_metrics = [(key, layout.index(key)) for key in order]
        self._upo_score_report: dict[str, dict[str, str]] = {}

    def _upo_prepare_datasets(self, args: UPOConfig, train_dataset, eval_dataset, tokenizer) -> tuple[Any, Any]:
        """Score the train and eval sets (cached), fit the statistics on the train split, add the per-pair values,
        then free the heads' models before training starts."""
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        train_dataset = self._upo_score(train_dataset, "train", args, tokenizer)
        self._upo_stats = fit_head_statistics(train_dataset, self._upo_specs, args.upo_normalization)
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
        with args.main_process_first(desc=f"UPO scoring of the {split} dataset"):
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
            )
        self._upo_score_report[split] = report.status
        logger.info("UPO scores for the %s dataset: %s", split, report.status)
        return scored

    def _upo_prepare_eval(self, dataset, split: str, args: UPOConfig, tokenizer):
        """Score an evaluation dataset (or a dict of them) and normalise it with the train statistics."""
        if isinstance(dataset, dict):
            return {k: self._upo_prepare_eval(v, k, args, tokenizer) for k, v in dataset.items()}
        return self._upo_add_normalized(self._upo_score(dataset, split, args, tokenizer))

    def _upo_add_normalized(self, dataset: Dataset) -> Dataset:
        """Add the per-pair values computed with the current statistics (``trl_upo.collator.add_values_column``)."""
        return add_values_column(dataset, self._upo_specs, self._upo_stats)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._upo_specs:
            extra = [score_column(s.name, r) for s in self._upo_specs for r in ROLES] + [VALUES_COLUMN]
            self._signature_columns = list(self._signature_columns) + [
                c for c in extra if c not in self._signature_columns
            ]

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        # A dataset passed here directly is scored like the ones given at construction, with the train statistics.
        if self._upo_heads and eval_dataset is not None and not isinstance(eval_dataset, str):
            tokenizer = _tokenizer_of(self.processing_class)
            eval_dataset = self._upo_prepare_eval(eval_dataset, metric_key_prefix, self.args, tokenizer)
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def compute_ref_log_probs(self, model, inputs):
        inputs = {k: v for k, v in inputs.items() if k != VALUES_KEY}
        return super().compute_ref_log_probs(model, inputs)

    # ------------------------------------------------------------------------------------------------------------
    # The loss
    # ------------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        values = inputs.pop(VALUES_KEY, None)
        if not self._upo_heads:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if values is None:
            raise ValueError(
                "The batch has no UPO scores. A custom `data_collator` replaced the one UPOTrainer wraps after "
                "construction; pass it to the constructor instead so that the scores are added to it."
            )
        capture = self._upo_capture
        capture.arm()
        try:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
            policy_logps = capture.policy[0] if capture.policy else None
            if self.ref_model is not None:
                ref_logps = capture.ref[0] if capture.ref else None
            else:  # PEFT: the second forward of the policy module is the adapter-disabled reference
                ref_logps = capture.policy[1] if len(capture.policy) > 1 else None
        finally:
            capture.disarm()
        loss, outputs = result if return_outputs else (result, None)
        loss = loss + self._upo_term(inputs, values, policy_logps, ref_logps)
        return (loss, outputs) if return_outputs else loss

    def _upo_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate a 1-D tensor across processes (sizes may differ between ranks)."""
        if self.accelerator.num_processes == 1:
            return t
        size = torch.tensor([t.numel()], device=t.device)
        sizes = self.accelerator.gather(size)
        padded = self.accelerator.pad_across_processes(t.contiguous(), dim=0)
        gathered = self.accelerator.gather(padded)
        width = padded.numel()
        return torch.cat([gathered[i * width : i * width + int(n)] for i, n in enumerate(sizes.tolist())])

    def _upo_gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate a ``(n, M)`` tensor's rows across processes."""
        if self.accelerator.num_processes == 1:
            return t
        return self._upo_gather(t.reshape(-1)).view(-1, t.size(1))

    def _upo_term(self, inputs, values, policy_logps, ref_logps) -> torch.Tensor | float:
        """The auxiliary term of one batch, and its metrics.

        ``values``: the ``(B, 4K + 2)`` per-pair values the collator hands over (raw and normalised scores, r_aux;
        precomputed for the whole dataset). The metrics are reduced with as few tensor operations as possible and
        converted to Python numbers with one host sync: on a small model, a step's fixed cost is per-operation
        overhead, and on a GPU each ``.item()`` waits for the device.
        """
        args: UPOConfig = self.args
        mode = "train" if self.model.training else "eval"
        k2 = 4 * len(self._upo_specs)
        r_c, r_r = values[:, k2], values[:, k2 + 1]

        if args.upo_alpha == 0:
            self._upo_log(mode, self._upo_gather_rows(values).mean(0), {})
            return 0.0
        if policy_logps is None:
            raise RuntimeError(
                "UPOTrainer did not see the policy's log-probabilities in this step: TRL's forward no longer goes "
                "through the hooked module. This TRL version is not supported; see the TRL range in pyproject.toml."
            )
        gather = self._upo_gather
        shift_mask = inputs["completion_mask"][:, 1:]
        seq_len = shift_mask.size(1)
        # TRL's log-probs are aligned with the shifted mask already; slicing only when not (a slice adds a node to
        # the backward graph).
        per_token = policy_logps if policy_logps.size(1) == seq_len else policy_logps[:, -seq_len:]

        if args.upo_combine == "margin":
            logps_c, logps_r = sequence_loglik(per_token, shift_mask, "sum").chunk(2)
            if self.precompute_ref_logps:
                ref_c, ref_r = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:
                if ref_logps is None:
                    raise RuntimeError("UPOTrainer did not see the reference forward needed by upo_combine='margin'.")
                ref_c, ref_r = sequence_loglik(ref_logps[:, -seq_len:], shift_mask, "sum").chunk(2)
            delta = (logps_c - ref_c.to(logps_c)) - (logps_r - ref_r.to(logps_r))
            reward_margin = (r_c - r_r).to(delta)
            term = margin_correction(delta, reward_margin, beta=self.beta, alpha=args.upo_alpha) * self.loss_weights[0]
            means = self._upo_gather_rows(values).mean(0)
            # The mean reward margin is the difference of the two mean rewards: no reduction of its own.
            extra = {"upo/reward_margin": None, "upo/margin_correction": gather(term.detach().reshape(1)).mean()}
            self._upo_log(mode, means, extra)
            return term

        ll = sequence_loglik(per_token, shift_mask, args.upo_loglik)  # (2B,): chosen, then rejected
        adv = advantages(
            r_c.to(ll.dtype), r_r.to(ll.dtype), baseline=args.upo_baseline, applies_to=args.upo_applies_to,
            gather=gather,
        )
        ws = awr_weights(
            adv,
            temperature=args.upo_temperature,
            weight_cap=args.upo_weight_cap,
            normalize=args.upo_normalize_weights,
            gather=gather,
        )
        aux = awr_loss(ws.weights, ll[: ll.numel() // 2] if args.upo_applies_to == "chosen" else ll)
        # One reduction for the per-pair values, (B, 4K + 2) -> (4K + 2,), and one for the log-likelihoods, kept in
        # their dtype so that they equal TRL's logged `logps/chosen|rejected` exactly under `upo_loglik="sum"`.
        if self.accelerator.num_processes == 1:
            ll_means = ll.detach().view(2, -1).mean(1)
        else:
            ll_means = torch.stack([gather(x).mean() for x in ll.detach().chunk(2)])
        means = torch.cat([self._upo_gather_rows(values).mean(0), ll_means.to(values.dtype)])
        all_adv = gather(adv.detach())
        extra = {
            "upo/loglik/chosen": None,  # read from `means`
            "upo/loglik/rejected": None,
            "upo/aux_loss": gather(aux.detach().reshape(1)).mean(),
            "upo/advantage/mean": all_adv.mean(),
            "upo/advantage/max": all_adv.max(),
            "upo/weight/mean": None,  # read from ws.stats
            "upo/weight/max": None,
            "upo/weight/capped_frac": None,
        }
        self._upo_log(mode, means, extra, ws.stats)
        return args.upo_alpha * aux

    def _upo_log(self, mode: str, means: torch.Tensor, extra: dict, weight_stats: torch.Tensor | None = None) -> None:
        """Append a step's metrics to ``self._metrics[mode]`` with one host sync (one ``.tolist()``).

        ``means``: the column means of the per-pair values (then of the chosen and rejected log-likelihoods, when
        present); ``extra``: further metrics, ``None`` for the ones derived here from ``means`` or ``weight_stats``.
        """
        scalars = [v for v in extra.values() if v is not None]
        parts = [means] + ([weight_stats] if weight_stats is not None else [])
        if scalars:
            parts.append(torch.stack(scalars).to(means.dtype))
        flat = torch.cat(parts).tolist() if len(parts) > 1 else means.tolist()
        k2 = 4 * len(self._upo_specs)
        n_means = means.numel()
        metrics = self._metrics[mode]
        for key, col in self._upo_value_metrics:
            metrics[key].append(flat[col])
        derived = {
            "upo/reward_margin": flat[k2] - flat[k2 + 1],
            "upo/loglik/chosen": flat[k2 + 2] if n_means > k2 + 2 else None,
            "upo/loglik/rejected": flat[k2 + 3] if n_means > k2 + 3 else None,
        }
        if weight_stats is not None:
            derived.update(zip(("upo/weight/mean", "upo/weight/max", "upo/weight/capped_frac"), flat[n_means:n_means + 3]))
        rest = iter(flat[len(flat) - len(scalars):])
        for key, value in extra.items():
            metrics[key].append(derived[key] if value is None else next(rest))

    # ------------------------------------------------------------------------------------------------------------
    # Saving and resuming
    # ------------------------------------------------------------------------------------------------------------

    def upo_state(self) -> dict[str, Any]:
        """The resolved heads, their fingerprints and normalisation statistics, and the UPO settings."""
        return build_state(self._upo_specs, self._upo_heads, self._upo_stats, self.args)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if self._upo_specs and self.args.should_save:
            save_state(output_dir or self.args.output_dir, self.upo_state())

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
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


def _tokenizer_of(processing_class: Any) -> Any:
    """The tokenizer of a processing class (a processor's ``.tokenizer``, or the tokenizer itself)."""
    return processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
