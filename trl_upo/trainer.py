"""``UPOTrainer``: TRL's ``DPOTrainer`` plus the UPO auxiliary term, by subclassing and hooking.

What it adds, top to bottom:

1. ``__init__``: scores the train and eval sets with every reward head (cached), fits the normalisation statistics
   on the train split, then hands everything to ``DPOTrainer.__init__`` unchanged.
2. The normalised scores and auxiliary reward of every response depend only on the fitted statistics, so they are
   computed once for the whole dataset (vectorised) and stored next to the raw scores. These columns survive TRL's
   column pruning (``_set_signature_columns_if_needed``) and are stacked into the batch by a wrapping collator; they
   are popped in ``compute_loss`` before TRL forwards the inputs to the model. A step only computes what depends on
   the batch: advantages, weights and the weighted log-likelihood.
3. A forward hook on the policy module captures the per-token log-probabilities of the forward TRL already runs
   (no second forward, no second model copy); the auxiliary term is computed from them (``trl_upo.objective``)
   and added to TRL's loss.
4. ``save_model`` writes ``upo_state.json`` (resolved heads and statistics) to the output dir and every checkpoint;
   ``train(resume_from_checkpoint=...)`` reads it back so a resumed run uses the same scale (and recomputes the
   normalised columns with it).
"""

from __future__ import annotations

import json
import logging
import os
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset, IterableDataset
from datasets.fingerprint import Hasher
from transformers import AutoProcessor, ProcessorMixin
from transformers.trainer_utils import get_last_checkpoint
from trl import DPOTrainer
from trl.trainer.utils import get_config_model_id

from . import __version__
from .config import UPOConfig
from .heads.base import HeadSpec, build_head
from .objective import (
    advantages,
    aux_reward,
    awr_loss,
    awr_weights,
    margin_correction,
    normalize_scores,
    sequence_loglik,
)
from .scoring import ROLES, fit_head_statistics, score_column, score_dataset

logger = logging.getLogger(__name__)

STATE_FILE = "upo_state.json"
# Batch keys the collator adds (popped before TRL sees the batch): raw scores (B, K), normalised scores (B, K) and
# auxiliary rewards (B,) of the chosen and rejected responses.
SCORES_CHOSEN = "upo_scores_chosen"
SCORES_REJECTED = "upo_scores_rejected"
NORMALIZED_CHOSEN = "upo_normalized_chosen"
NORMALIZED_REJECTED = "upo_normalized_rejected"
REWARD_AUX_CHOSEN = "upo_reward_aux_chosen"
REWARD_AUX_REJECTED = "upo_reward_aux_rejected"
UPO_BATCH_KEYS = (
    SCORES_CHOSEN, SCORES_REJECTED, NORMALIZED_CHOSEN, NORMALIZED_REJECTED, REWARD_AUX_CHOSEN, REWARD_AUX_REJECTED
)


def normalized_column(role: str) -> str:
    """Dataset column with the (K,) normalised scores of the ``role`` responses. Head names start with a letter, so
    the double underscore cannot collide with a head's score column ``upo_<head>_<role>``."""
    return f"upo__normalized_{role}"


def reward_aux_column(role: str) -> str:
    """Dataset column with the auxiliary reward r_aux (eq. 3) of the ``role`` responses."""
    return f"upo__reward_aux_{role}"


UPO_DERIVED_COLUMNS = tuple(f(role) for role in ROLES for f in (normalized_column, reward_aux_column))

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


@dataclass
class UPODataCollator:
    """Wraps a preference collator and adds, for the chosen and the rejected responses, the heads' raw scores
    (``(B, K)`` float32), their normalised scores (``(B, K)`` float64) and the auxiliary reward (``(B,)`` float64),
    read from the columns ``UPOTrainer`` adds to the dataset (``upo_<head>_<role>``, ``upo__normalized_<role>``,
    ``upo__reward_aux_<role>``).

    Args:
        base: the preference collator to wrap (TRL's ``DataCollatorForPreference`` by default).
        head_names: the reward heads' names, in the order of the ``K`` score columns.
    """

    base: Callable[[list[dict[str, Any]]], dict[str, Any]]
    head_names: list[str]

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base(examples)
        for role, raw_key, norm_key, aux_key in (
            ("chosen", SCORES_CHOSEN, NORMALIZED_CHOSEN, REWARD_AUX_CHOSEN),
            ("rejected", SCORES_REJECTED, NORMALIZED_REJECTED, REWARD_AUX_REJECTED),
        ):
            cols = [score_column(n, role) for n in self.head_names]
            norm_col, aux_col = normalized_column(role), reward_aux_column(role)
            try:
                raw = [[float(ex[c]) for c in cols] for ex in examples]
                norm = [ex[norm_col] for ex in examples]
                aux = [ex[aux_col] for ex in examples]
            except KeyError as e:
                raise KeyError(
                    f"A batch lacks the UPO column {e.args[0]!r}. The dataset was not prepared by this trainer, or a "
                    f"custom data pipeline removed the column; keep the 'upo_<head>_chosen/rejected' and "
                    f"'upo__normalized_*' / 'upo__reward_aux_*' columns."
                ) from None
            batch[raw_key] = torch.tensor(raw, dtype=torch.float32)
            batch[norm_key] = torch.tensor(norm, dtype=torch.float64).reshape(len(examples), len(cols))
            batch[aux_key] = torch.tensor(aux, dtype=torch.float64)
        return batch


class _LogProbCapture:
    """Forward hooks that keep the per-token log-probs of the fused-LM-head forwards TRL runs in one loss call."""

    def __init__(self) -> None:
        self.armed = False
        self.policy: list[torch.Tensor] = []
        self.ref: list[torch.Tensor] = []

    def _policy_hook(self, module, args, kwargs, output):
        if self.armed and kwargs.get("fused_lm_head"):
            self.policy.append(output.log_probs)

    def _ref_hook(self, module, args, kwargs, output):
        if self.armed and kwargs.get("fused_lm_head"):
            self.ref.append(output.log_probs)

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
        specs: list[HeadSpec] = args.head_specs if isinstance(args, UPOConfig) else []
        if not isinstance(args, UPOConfig):
            logger.info("UPOTrainer got a %s, not a UPOConfig: no reward heads, training as DPO.", type(args).__name__)
        self._upo_specs = specs
        self._upo_heads = [build_head(s) for s in specs]
        self._upo_stats: list[dict] = []
        self._upo_weights = torch.tensor([s.weight for s in specs], dtype=torch.float64)
        self._upo_signs = torch.tensor([1.0 if s.higher_is_better else -1.0 for s in specs], dtype=torch.float64)
        self._upo_score_report: dict[str, dict[str, str]] = {}

        if self._upo_heads:
            if processing_class is None:
                # The processor DPOTrainer would load (and then does not load again); loaded here because heads may
                # need the tokenizer.
                model_id = model if isinstance(model, str) else get_config_model_id(model.config)
                processing_class = AutoProcessor.from_pretrained(model_id, trust_remote_code=args.trust_remote_code)
            tokenizer = processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
            if train_dataset is None:
                raise ValueError("`train_dataset` is required")
            train_dataset = self._upo_score(train_dataset, "train", args, tokenizer)
            self._upo_stats = fit_head_statistics(train_dataset, specs, args.upo_normalization)
            train_dataset = self._upo_add_normalized(train_dataset)
            if eval_dataset is not None:
                eval_dataset = self._upo_prepare_eval(eval_dataset, "eval", args, tokenizer)
            for head in self._upo_heads:  # model heads free their model before training starts
                head.release()

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
            pc = self.accelerator.parallelism_config
            if pc is not None and ((pc.cp_size or 1) > 1 or (getattr(pc, "sp_size", None) or 1) > 1):
                raise NotImplementedError(
                    "UPOTrainer with reward heads does not support context or sequence parallelism yet: the "
                    "per-response log-likelihoods are sharded across ranks. Use data parallelism (DDP, ZeRO, FSDP)."
                )
            self.data_collator = UPODataCollator(self.data_collator, [s.name for s in specs])
            if self.args.upo_alpha > 0:
                policy = self.model.get_base_model() if _is_peft_model(self.model) else self.model
                self._upo_hook_handles.append(
                    policy.register_forward_hook(self._upo_capture._policy_hook, with_kwargs=True)
                )
                if self.ref_model is not None:
                    ref = self.accelerator.unwrap_model(self.ref_model)
                    self._upo_hook_handles.append(
                        ref.register_forward_hook(self._upo_capture._ref_hook, with_kwargs=True)
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
        """Eqs. (2)-(3) once per response for the whole dataset: add the normalised scores and r_aux as columns.

        They depend only on the raw scores and the statistics, so no step recomputes them. Existing columns of these
        names (from an earlier trainer, or from statistics replaced on resume) are replaced.
        """
        names = [s.name for s in self._upo_specs]
        # The fingerprint covers the statistics, weights and signs instead of hashing the new columns' values.
        fingerprint = Hasher.hash(
            (dataset._fingerprint, self._upo_stats, self._upo_weights.tolist(), self._upo_signs.tolist())
        )
        stale = [c for c in UPO_DERIVED_COLUMNS if c in dataset.column_names]
        if stale:
            dataset = dataset.remove_columns(stale)
        for role in ROLES:
            # Raw scores rounded to float32 first: the precision the batch carries them in (and the logged raw
            # metrics); normalised in float64.
            raw = np.stack([np.asarray(dataset[score_column(n, role)], dtype=np.float32) for n in names], axis=1)
            norm = normalize_scores(torch.from_numpy(raw).to(torch.float64), self._upo_stats, self._upo_signs)
            r_aux = aux_reward(norm, self._upo_weights)
            dataset = dataset.add_column(
                normalized_column(role), norm.tolist(), new_fingerprint=Hasher.hash((fingerprint, role, "norm"))
            )
            dataset = dataset.add_column(
                reward_aux_column(role), r_aux.tolist(), new_fingerprint=Hasher.hash((fingerprint, role, "aux"))
            )
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._upo_specs:
            extra = [score_column(s.name, r) for s in self._upo_specs for r in ROLES] + list(UPO_DERIVED_COLUMNS)
            self._signature_columns = list(self._signature_columns) + [
                c for c in extra if c not in self._signature_columns
            ]

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        # A dataset passed here directly is scored like the ones given at construction, with the train statistics.
        if self._upo_heads and eval_dataset is not None and not isinstance(eval_dataset, str):
            tokenizer = getattr(self, "_tokenizer", None)
            eval_dataset = self._upo_prepare_eval(eval_dataset, metric_key_prefix, self.args, tokenizer)
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def compute_ref_log_probs(self, model, inputs):
        inputs = {k: v for k, v in inputs.items() if k not in UPO_BATCH_KEYS}
        return super().compute_ref_log_probs(model, inputs)

    # ------------------------------------------------------------------------------------------------------------
    # The loss
    # ------------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        upo_batch = {k: inputs.pop(k) for k in UPO_BATCH_KEYS if k in inputs}
        if not self._upo_heads:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if len(upo_batch) != len(UPO_BATCH_KEYS):
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
        loss = loss + self._upo_term(inputs, upo_batch, policy_logps, ref_logps)
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

    def _upo_term(self, inputs, upo_batch, policy_logps, ref_logps) -> torch.Tensor | float:
        args: UPOConfig = self.args
        mode = "train" if self.model.training else "eval"
        gather = self._upo_gather
        # Metrics stay tensors until the end of the step, then one host sync converts them all (one `.tolist()`
        # instead of one `.item()` per metric; on a GPU each of those would wait for the device).
        pending: dict[str, torch.Tensor] = {}

        def log_mean(key: str, t: torch.Tensor) -> None:
            pending[key] = gather(t).mean()

        def flush() -> None:
            values = torch.stack([v.detach().to(torch.float64) for v in pending.values()]).tolist()
            metrics = self._metrics[mode]
            for key, value in zip(pending, values, strict=True):
                metrics[key].append(value)

        scores_c, scores_r = upo_batch[SCORES_CHOSEN], upo_batch[SCORES_REJECTED]
        norm_c, norm_r = upo_batch[NORMALIZED_CHOSEN], upo_batch[NORMALIZED_REJECTED]
        r_c, r_r = upo_batch[REWARD_AUX_CHOSEN], upo_batch[REWARD_AUX_REJECTED]
        for k, spec in enumerate(self._upo_specs):
            prefix = f"upo/{spec.name}"
            log_mean(f"{prefix}/chosen", scores_c[:, k])
            log_mean(f"{prefix}/rejected", scores_r[:, k])
            log_mean(f"{prefix}/chosen_norm", norm_c[:, k])
            log_mean(f"{prefix}/rejected_norm", norm_r[:, k])
        log_mean("upo/reward_aux/chosen", r_c)
        log_mean("upo/reward_aux/rejected", r_r)

        if args.upo_alpha == 0:
            flush()
            return 0.0
        if policy_logps is None:
            raise RuntimeError(
                "UPOTrainer did not see the policy's log-probabilities in this step: TRL's forward no longer goes "
                "through the hooked module. This TRL version is not supported; see the TRL range in pyproject.toml."
            )
        shift_mask = inputs["completion_mask"][:, 1:]
        seq_len = shift_mask.size(1)
        per_token = policy_logps[:, -seq_len:]

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
            log_mean("upo/reward_margin", reward_margin)
            log_mean("upo/margin_correction", term.detach().reshape(1))
            flush()
            return term

        ll_c, ll_r = sequence_loglik(per_token, shift_mask, args.upo_loglik).chunk(2)
        adv = advantages(
            r_c.to(ll_c.dtype), r_r.to(ll_c.dtype), baseline=args.upo_baseline, applies_to=args.upo_applies_to,
            gather=gather,
        )
        ws = awr_weights(
            adv,
            temperature=args.upo_temperature,
            weight_cap=args.upo_weight_cap,
            normalize=args.upo_normalize_weights,
            gather=gather,
        )
        ll = ll_c if args.upo_applies_to == "chosen" else torch.cat([ll_c, ll_r])
        aux = awr_loss(ws.weights, ll)
        all_adv = gather(adv.detach())
        log_mean("upo/loglik/chosen", ll_c.detach())
        log_mean("upo/loglik/rejected", ll_r.detach())
        log_mean("upo/aux_loss", aux.detach().reshape(1))
        pending["upo/advantage/mean"] = all_adv.mean()
        pending["upo/advantage/max"] = all_adv.max()
        pending["upo/weight/mean"], pending["upo/weight/max"], pending["upo/weight/capped_frac"] = ws.stats.unbind()
        flush()
        return args.upo_alpha * aux

    # ------------------------------------------------------------------------------------------------------------
    # Saving and resuming
    # ------------------------------------------------------------------------------------------------------------

    def upo_state(self) -> dict[str, Any]:
        """The resolved heads, their fingerprints and normalisation statistics, and the UPO settings."""
        args = self.args
        return {
            "format": 1,
            "trl_upo_version": __version__,
            "heads": [s.to_dict() for s in self._upo_specs],
            "head_fingerprints": [h.fingerprint() for h in self._upo_heads],
            "statistics": self._upo_stats,
            "settings": {
                k: getattr(args, k, None)
                for k in (
                    "upo_alpha",
                    "upo_temperature",
                    "upo_weight_cap",
                    "upo_normalize_weights",
                    "upo_baseline",
                    "upo_applies_to",
                    "upo_loglik",
                    "upo_normalization",
                    "upo_combine",
                )
            },
        }

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if self._upo_specs and self.args.should_save:
            out = output_dir or self.args.output_dir
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, STATE_FILE), "w") as f:
                json.dump(self.upo_state(), f, indent=2)

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
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.exists(path):
            logger.warning(
                "Checkpoint %s has no %s (it was not written by UPOTrainer with reward heads); the normalisation "
                "statistics fitted on this run's train split are used.",
                checkpoint,
                STATE_FILE,
            )
            return
        with open(path) as f:
            state = json.load(f)
        saved = state["heads"]
        # Compared in their JSON form: names, types, weights, signs, normalisation and parameters must all match.
        current = json.loads(json.dumps([s.to_dict() for s in self._upo_specs]))
        if saved != current or state.get("head_fingerprints") != [h.fingerprint() for h in self._upo_heads]:
            raise ValueError(
                f"Checkpoint {checkpoint} was trained with reward heads {state['heads']}, but this run has "
                f"{[s.to_dict() for s in self._upo_specs]}. Resuming would change the objective mid-run: use the "
                f"same reward_heads, or start a new run (without resume_from_checkpoint)."
            )
        now = self.upo_state()["settings"]
        changed = {k: (v, now.get(k)) for k, v in state.get("settings", {}).items() if now.get(k) != v}
        if changed:
            logger.warning(
                "Resuming from %s with UPO settings that differ from the checkpoint's (saved, now): %s. The run "
                "continues with the new settings.",
                checkpoint,
                changed,
            )
        if state["statistics"] != self._upo_stats:
            logger.warning(
                "The normalisation statistics saved in %s differ from the ones fitted on this run's train split "
                "(the data changed?); the checkpoint's are used so that the resumed run keeps its scale.",
                checkpoint,
            )
            self._upo_stats = state["statistics"]
            # The normalised scores and r_aux columns were computed with the fitted statistics: recompute them.
            self.train_dataset = self._upo_add_normalized(self.train_dataset)
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self._upo_add_normalized(v) for k, v in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = self._upo_add_normalized(self.eval_dataset)
        self._upo_stats = state["statistics"]


def load_upo_state(path: str) -> dict[str, Any]:
    """Read ``upo_state.json`` from an output directory or checkpoint."""
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)
