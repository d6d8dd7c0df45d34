"""The trainer-agnostic UPO core, and the contract a trainer adapter fills in.

What every UPO trainer shares lives here, once, in :class:`UPOCore`:

1. ``__init__``: builds the heads of the config, scores the train and eval sets (cached, one gather across
   processes), fits the normalisation statistics on the train split and stores each row's values
   (:class:`~trl_upo.layout.ValueLayout`) in one column, then hands everything to the TRL trainer's constructor
   unchanged and wraps its collator.
2. ``compute_loss``: captures the per-token log-probs of the forward TRL already runs (a forward hook, no second
   forward), builds a :class:`~trl_upo.step.UPOStep` and asks the adapter for its term; adds it to TRL's loss and logs
   the step's named values with one host sync.
3. ``save_model`` / ``train(resume_from_checkpoint=...)``: ``upo_state.json`` with the heads and statistics.

An **adapter** (``trl_upo.trainer.UPOMixin`` for DPO, ``trl_upo.kto.UPOKTOMixin`` for KTO) is a small subclass that
declares, and only declares:

- ``upo_trl_class``: the TRL trainer whose loss it reads (``DPOTrainer``, ``KTOTrainer``), and optionally
  ``upo_trl_hooks``, the further methods of it the adapter overrides (checked to exist when a trainer is built);
- ``upo_config_class``: the config it needs for reward heads (``UPOConfig``, ``UPOKTOConfig``);
- ``upo_roles``: the responses of a row (``("chosen", "rejected")``, ``("completion",)``);
- ``upo_term(step) -> (loss, statistics)``: its auxiliary term on one batch, with named statistics;
- optionally ``upo_prepare_split(dataset, split, train=..., args=...)``: its data checks, run before any scoring, and
  ``upo_sparse_statistics``: its statistics may be over no row of their kind in a batch (then not logged).
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from transformers import AutoProcessor, ProcessorMixin
from trl.trainer.utils import get_config_model_id

from .card import UPO_CITATION, save_card, write_upo_section
from .checkpoints import last_complete_checkpoint, marker_callback
from .collator import VALUES_COLUMN, VALUES_KEY, UPODataCollator, add_values_column, head_signs_and_weights
from .compat import FUSED, LogProbCapture, check_trl, is_peft_model, policy_modules
from .config import UPOArguments
from .data.checks import check_prepared_rows, check_splits
from .heads import HeadSpec, build_head
from .layout import ValueLayout
from .scoring import (
    StatisticsSource,
    fit_head_statistics,
    load_statistics,
    rank_share,
    score_column,
    score_dataset,
    score_stream,
    stream_statistics,
)
from .state import build_state, load_upo_state, resume_statistics, save_state
from .step import UPOStep, UPOView
from .watchdog import StuckRankCallback

logger = logging.getLogger(__name__)

def upo_paper(trl_class: type) -> dict[str, str]:
    """The ``_paper`` entry of a UPO trainer on ``trl_class``: the UPO paper, citing the TRL method's paper too."""
    return {
        "title": "Unified Preference Optimization: Language Model Alignment Beyond the Preference Frontier",
        "id": "2405.17956",
        "citation": UPO_CITATION + "\n\n" + trl_class._paper["citation"],
    }


class UPOCore:
    """What every UPO trainer shares; an adapter subclass declares the rest (see the module docstring).

    Put an adapter first among the bases, before the TRL trainer (or a subclass of it):
    ``class UPOTrainer(UPOMixin, DPOTrainer)``.
    """

    # ---- the adapter's contract ----------------------------------------------------------------------------------
    #: The TRL trainer whose loss UPO reads (checked, hooked; its constructor's parameters read positional arguments).
    upo_trl_class: type
    #: Methods of ``upo_trl_class`` the adapter hooks besides the ones every adapter reads (checked when it is built).
    upo_trl_hooks: tuple[str, ...] = ()
    #: The config class reward heads need (built, with the model's name, when no config is given).
    upo_config_class: type
    #: The responses of a row, in value-layout order.
    upo_roles: tuple[str, ...]
    #: True when the term's statistics may be over no row of their kind in a batch: non-finite ones are not logged.
    upo_sparse_statistics: bool = False

    def upo_prepare_split(self, dataset: Any, split: str, *, train: bool, args: UPOArguments) -> Any:
        """The adapter's data checks and conversions of a split, before any scoring (default: the dataset as it is)."""
        return dataset

    def upo_term(self, step: UPOStep) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The auxiliary term of one batch: the loss added to TRL's, and named 0-d statistics (logged as ``upo/<name>``).

        Call ``step.gather(...)`` exactly once (it is the step's one collective)."""
        raise NotImplementedError(f"{type(self).__name__} is a UPO adapter without an auxiliary term")

    # ---- construction ----------------------------------------------------------------------------------------------
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        parameters = [n for n in inspect.signature(self.upo_trl_class.__init__).parameters if n != "self"]
        if len(args) > len(parameters):
            raise TypeError(f"{type(self).__name__} takes at most {len(parameters)} positional arguments")
        named = {**dict(zip(parameters, args)), **kwargs}
        model = named.get("model")
        if named.get("args") is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            named["args"] = self.upo_config_class(f"{model_name.split('/')[-1]}-UPO")
        config = named["args"]
        self._upo_setup_heads(config)
        if self._upo_heads:
            self._upo_path = check_trl(config, self.upo_trl_class, self.upo_trl_hooks)  # before any scoring: a TRL UPO cannot read fails
            if named.get("processing_class") is None:
                # The processor the TRL trainer would load (and then does not load again): heads may need it.
                model_id = model if isinstance(model, str) else get_config_model_id(model.config)
                named["processing_class"] = AutoProcessor.from_pretrained(
                    model_id, trust_remote_code=config.trust_remote_code
                )
            named["train_dataset"], named["eval_dataset"] = self._upo_prepare_datasets(
                config, named.get("train_dataset"), named.get("eval_dataset"), tokenizer_of(named["processing_class"])
            )
        train = named.get("train_dataset")
        rows_before = len(train) if isinstance(train, Dataset) else None
        super().__init__(**named)
        # TRL's own filter is the authority on rows it dropped: none left is an error here, not torch's num_samples=0.
        check_prepared_rows(self.train_dataset, rows_before, "train", getattr(self.args, "max_length", None))
        self.add_callback(marker_callback())  # a resume picks only checkpoints whose save finished
        self.add_callback(StuckRankCallback())  # a rank stuck in a step is named within a bound (several processes)
        self._upo_capture = None
        self._upo_hook_handles: list[Any] = []
        if self._upo_heads:
            self._upo_capture = LogProbCapture(self._upo_path, self.upo_trl_class)
            self._upo_check_parallelism()
            self.data_collator = UPODataCollator(self.data_collator, list(self._upo_layout.head_names), self.upo_roles)
            if self.args.upo_alpha > 0:
                self._upo_attach_hooks()

    def _upo_setup_heads(self, args: Any) -> None:
        """Build the heads of ``args`` (none without a UPO config) and the layout of a row's values."""
        specs: list[HeadSpec] = args.head_specs if isinstance(args, UPOArguments) else []
        self._upo_values_batch = getattr(args, "upo_score_batch_size", 1000)  # a stream's rows per values batch
        if specs and not isinstance(args, self.upo_config_class):  # before any scoring, not after it
            raise TypeError(f"{type(self).__name__} needs a {self.upo_config_class.__name__} (or subclass) for reward "
                            f"heads, got a {type(args).__name__}: build the same settings with the right config.")
        if not isinstance(args, UPOArguments):
            logger.info("%s got a %s, not a %s: no reward heads, training as %s.", type(self).__name__,
                        type(args).__name__, self.upo_config_class.__name__, self.upo_trl_class.__name__)
        self._upo_specs = specs
        self._upo_heads = [build_head(s) for s in specs]
        self._upo_stats: list[dict] = []
        self._upo_stats_source: dict | None = None
        self._upo_path = None
        self._upo_layout = ValueLayout.of([s.name for s in specs], self.upo_roles)
        self._upo_score_report: dict[str, dict[str, str]] = {}

    def _upo_attach_hooks(self) -> None:
        """Fused path: hook the policy (and an explicit reference model) to read their log-probs. Done at
        construction when ``upo_alpha > 0``, or at the first step that needs it (``upo_alpha`` raised after
        construction); nothing hooks the model while the term is off."""
        if self._upo_path != FUSED or self._upo_hook_handles:
            return
        for module in policy_modules(self.model):
            self._upo_capture.attach(module, self._upo_capture.policy)
        if self.ref_model is not None:
            self._upo_capture.attach(self.accelerator.unwrap_model(self.ref_model), self._upo_capture.ref)
        self._upo_hook_handles = self._upo_capture.handles

    def _upo_check_parallelism(self) -> None:
        pc = self.accelerator.parallelism_config
        if pc is not None and ((pc.cp_size or 1) > 1 or (getattr(pc, "sp_size", None) or 1) > 1):
            raise NotImplementedError(
                f"{type(self).__name__} with reward heads does not support context or sequence parallelism yet: the "
                "per-response log-likelihoods are sharded across ranks. Use data parallelism (DDP, ZeRO, FSDP)."
            )

    @property
    def upo(self) -> UPOView:
        """A read-only view of what UPO fitted and did: heads, statistics, layout, scoring report, hooks."""
        return UPOView(
            specs=tuple(self._upo_specs),
            heads=tuple(self._upo_heads),
            statistics=self._upo_stats,
            statistics_source=self._upo_stats_source,
            layout=self._upo_layout,
            score_report=self._upo_score_report,
            hooks_attached=bool(getattr(self, "_upo_hook_handles", [])),
        )

    # ---- scoring (before training) ---------------------------------------------------------------------------------
    def _upo_prepare_datasets(self, args: UPOArguments, train_dataset, eval_dataset, tokenizer) -> tuple[Any, Any]:
        """Check every split (the adapter's checks), then score the train and eval sets (cached; a stream lazily, as
        it is read), get the normalisation statistics (:meth:`_upo_statistics`), add the per-row values, and free
        the heads' models before training starts (a stream's heads stay loaded: they score as training reads)."""
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        if isinstance(train_dataset, IterableDataset) and args.accelerator_config.dispatch_batches is not True:
            # As TRL does for a streamed train set (every TRL alike, before scoring is set up): each process reads the
            # stream and keeps its share, so it scores only the rows it trains on (rank_share).
            args.accelerator_config.dispatch_batches = False
        check_splits(train_dataset, eval_dataset, tokenizer, args)  # the user's rows, before the adapter converts them
        train_dataset = self.upo_prepare_split(train_dataset, "train", train=True, args=args)
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: self.upo_prepare_split(v, k, train=False, args=args) for k, v in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = self.upo_prepare_split(eval_dataset, "eval", train=False, args=args)
        scored = self._upo_score(train_dataset, "train", args, tokenizer)
        self._upo_stats, source = self._upo_statistics(args, train_dataset, scored, tokenizer)
        self._upo_stats_source = source.to_dict()
        logger.info("UPO normalisation statistics %s.", source.describe())
        train_dataset = self._upo_add_values(scored)
        if eval_dataset is not None:
            eval_dataset = self._upo_prepare_eval(eval_dataset, "eval", args, tokenizer)
        if not self._upo_streaming(train_dataset, eval_dataset):
            for head in self._upo_heads:
                head.release()
        return train_dataset, eval_dataset

    def _upo_statistics(self, args: UPOArguments, raw, scored, tokenizer) -> tuple[list[dict], StatisticsSource]:
        """The statistics, by the user's choice: read from ``upo_statistics_from``; fitted on the first
        ``upo_stream_stats_rows`` rows of a stream; or fitted on the whole scored train split."""
        kw = dict(roles=self.upo_roles, tokenizer=tokenizer)
        if args.upo_statistics_from:
            return load_statistics(args.upo_statistics_from, self._upo_heads, self._upo_specs, args.upo_normalization,
                                   **kw)
        if isinstance(raw, IterableDataset):
            return stream_statistics(raw, self._upo_heads, self._upo_specs, args.upo_normalization,
                                     rows=args.upo_stream_stats_rows, batch_size=args.upo_score_batch_size,
                                     distributed=args.world_size > 1, cache_dir=args.upo_score_cache_dir,
                                     use_cache=args.upo_use_score_cache, **kw)
        stats = fit_head_statistics(scored, self._upo_specs, args.upo_normalization, roles=self.upo_roles)
        return stats, StatisticsSource("train_split", len(scored))

    @staticmethod
    def _upo_streaming(*datasets: Any) -> bool:
        found = [d for x in datasets for d in (x.values() if isinstance(x, dict) else [x])]
        return any(isinstance(d, IterableDataset) for d in found)

    def _upo_score(self, dataset, split: str, args: UPOArguments, tokenizer) -> Dataset | IterableDataset:
        if isinstance(dataset, IterableDataset):
            # Scored lazily, batch by batch, as the stream is read (the same head calls and checks).
            self._upo_score_report[split] = {s.name: "stream" for s in self._upo_specs}
            share = rank_share(dataset, world_size=args.world_size, rank=args.process_index,
                               batch_size=args.per_device_train_batch_size if split == "train"
                               else args.per_device_eval_batch_size,
                               split_batches=args.accelerator_config.split_batches,
                               dispatch_batches=args.accelerator_config.dispatch_batches)
            return score_stream(dataset, self._upo_heads, self._upo_specs, split=split, tokenizer=tokenizer,
                                batch_size=args.upo_score_batch_size, roles=self.upo_roles,
                                cache_dir=args.upo_score_cache_dir, use_cache=args.upo_use_score_cache, share=share)
        if not isinstance(dataset, Dataset):
            raise TypeError(f"The {split} dataset must be a `datasets.Dataset` or `IterableDataset`, got "
                            f"{type(dataset).__name__}.")
        if "image" in dataset.column_names or "images" in dataset.column_names:
            raise NotImplementedError(
                f"Reward heads on vision-language preference data are not supported yet; train this dataset with "
                f"{self.upo_trl_class.__name__}, or without reward heads."
            )
        # Every rank scores its share and gets all the scores (one gather): no rank waits for another to score all.
        scored, report = score_dataset(
            dataset, self._upo_heads, self._upo_specs, split=split, tokenizer=tokenizer,
            batch_size=args.upo_score_batch_size, cache_dir=args.upo_score_cache_dir,
            use_cache=args.upo_use_score_cache, num_proc=args.dataset_num_proc, roles=self.upo_roles,
            distributed=args.world_size > 1,
        )
        self._upo_score_report[split] = report.status
        return scored

    def _upo_prepare_eval(self, dataset, split: str, args: UPOArguments, tokenizer):
        """Check and score an evaluation dataset (or a dict of them) and add its values with the train statistics."""
        if isinstance(dataset, dict):
            return {k: self._upo_prepare_eval(v, k, args, tokenizer) for k, v in dataset.items()}
        dataset = self.upo_prepare_split(dataset, split, train=False, args=args)  # a no-op on a prepared split
        return self._upo_add_values(self._upo_score(dataset, split, args, tokenizer))

    def _upo_add_values(self, dataset):
        return add_values_column(dataset, self._upo_specs, self._upo_stats, self.upo_roles,
                                 batch_size=self._upo_values_batch)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._upo_specs:
            extra = [score_column(s.name, r) for s in self._upo_specs for r in self.upo_roles] + [VALUES_COLUMN]
            self._signature_columns = list(self._signature_columns) + [
                c for c in extra if c not in self._signature_columns
            ]

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """The next class's ``evaluate``; a dataset passed here is scored first, with the train statistics."""
        if self._upo_heads and eval_dataset is not None and not isinstance(eval_dataset, str):
            tokenizer = tokenizer_of(self.processing_class)
            eval_dataset = self._upo_prepare_eval(eval_dataset, metric_key_prefix, self.args, tokenizer)
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def compute_ref_log_probs(self, model, inputs):
        """The next class's reference log-probs of a batch, without the UPO values (the model never sees them)."""
        inputs = {k: v for k, v in inputs.items() if k != VALUES_KEY}
        return super().compute_ref_log_probs(model, inputs)

    # ---- the loss --------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The next class's loss (TRL's) plus the adapter's term, from the log-probs of TRL's own forward."""
        values = inputs.pop(VALUES_KEY, None)
        loss_kwargs = {"return_outputs": return_outputs, "num_items_in_batch": num_items_in_batch}
        if not self._upo_heads:
            return super().compute_loss(model, inputs, **loss_kwargs)
        if values is None:
            raise ValueError(
                f"The batch has no UPO scores. A custom `data_collator` replaced the one {type(self).__name__} wraps "
                f"after construction; pass it to the constructor instead so that the scores are added to it."
            )
        mode = "train" if self.model.training else "eval"
        if self.args.upo_alpha == 0:
            result = super().compute_loss(model, inputs, **loss_kwargs)
            step = self._upo_step(inputs, values, None, None)
            self._upo_log(mode, step.gather().value_means(), {})
            return result
        self._upo_attach_hooks()  # no-op unless upo_alpha was raised from 0 after construction
        peft_reference = self.ref_model is None and is_peft_model(self.accelerator.unwrap_model(self.model))
        with self._upo_capture.capturing() as capture:
            result = super().compute_loss(model, inputs, **loss_kwargs)
            policy_logps, ref_logps = capture.logps(peft_reference)
        loss, outputs = result if return_outputs else (result, None)
        step = self._upo_step(inputs, values, policy_logps, ref_logps)
        step.check_policy_logps()
        term, statistics = self.upo_term(step)
        self._upo_log(mode, step.gathered.value_means(), statistics)
        loss = loss + term
        return (loss, outputs) if return_outputs else loss

    def _upo_step(self, inputs, values, policy_logps, ref_logps) -> UPOStep:
        capacity = max(self.args.per_device_train_batch_size, self.args.per_device_eval_batch_size)
        return UPOStep(
            args=self.args, inputs=inputs, values=values, layout=self._upo_layout, policy_logps=policy_logps,
            ref_logps=ref_logps, accelerator=self.accelerator, capacity=capacity, trl_class=self.upo_trl_class,
            path=self._upo_path,
        )

    def _upo_log(self, mode: str, values: dict[tuple[str, ...], torch.Tensor], statistics: dict) -> None:
        """Append a step's value means (in layout order) and the term's statistics (0-d tensors, in the order the
        term returns them, as ``upo/<name>``) to ``self._metrics[mode]``, with one host sync (one ``.tolist()``)."""
        tensors = {**values, **{(f"upo/{k}",): v for k, v in statistics.items()}}
        names = [n for key in tensors for n in key]
        parts = [value.reshape(-1).to(torch.float64) for value in tensors.values()]
        logged = dict(zip(names, torch.cat(parts).tolist(), strict=True))
        out = self._metrics[mode]
        for name in self._upo_layout.log_order:
            out[name].append(logged.pop(name))
        for name, value in logged.items():
            if self.upo_sparse_statistics and not math.isfinite(value):
                continue  # a statistic over no row of its kind in this batch is not logged
            out[name].append(value)

    # ---- saving and resuming ---------------------------------------------------------------------------------------
    def upo_state(self) -> dict[str, Any]:
        """The resolved heads, their fingerprints and normalisation statistics, and the UPO settings."""
        return build_state(self._upo_specs, self._upo_heads, self._upo_stats, self.args, self._upo_stats_source)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save the model as the next class does, ``upo_state.json`` next to it, and (called by the user, with or
        without a ``save_strategy``) the model card with its UPO section; checkpoints and ``push_to_hub`` write the
        card through :meth:`create_model_card`."""
        super().save_model(output_dir, _internal_call)
        if self._upo_specs and self.args.should_save:
            save_state(output_dir or self.args.output_dir, self.upo_state())
        if self._upo_specs and not _internal_call:
            save_card(self, output_dir)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """TRL's model card, then the UPO section (``trl_upo.card``): the objective, the heads, the citation."""
        super().create_model_card(*args, **kwargs)
        if self._upo_specs:
            write_upo_section(self)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Train as the next class does; a resumed run first adopts the checkpoint's ``upo_state.json``."""
        if isinstance(self.args, UPOArguments):
            # The upo_* fields may have been changed since the config was built (trainer.args.upo_alpha = ...).
            self.args.validate_upo()
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint, skipped = last_complete_checkpoint(self.args.output_dir)
            for path, why in skipped:
                logger.warning("resume_from_checkpoint=True: skipping %s, an incomplete checkpoint: %s.", path, why)
            if checkpoint is None:
                raise ValueError(f"No complete checkpoint found in output_dir {self.args.output_dir!r} to resume from"
                                 + (f" ({len(skipped)} incomplete ones skipped)." if skipped else "."))
            resume_from_checkpoint = checkpoint
        if checkpoint and self._upo_specs:
            self._upo_load_state(str(checkpoint))
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    def _upo_load_state(self, checkpoint: str) -> None:
        """Adopt the checkpoint's statistics (after checking its heads); recompute the per-row values if they
        differ from the ones fitted on this run's train split."""
        stats = resume_statistics(checkpoint, self.upo_state())
        if stats is None or stats == self._upo_stats:
            return
        self._upo_stats = stats
        self._upo_stats_source = load_upo_state(checkpoint).get("statistics_source", {"source": "upo_state",
                                                                                     "path": checkpoint})
        self.train_dataset = self._upo_add_values(self.train_dataset)
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {k: self._upo_add_values(v) for k, v in self.eval_dataset.items()}
        elif self.eval_dataset is not None:
            self.eval_dataset = self._upo_add_values(self.eval_dataset)


def tokenizer_of(processing_class: Any) -> Any:
    """The tokenizer of a processing class (a processor's ``.tokenizer``, or the tokenizer itself)."""
    return processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class


__all__ = ["UPO_CITATION", "UPOCore", "UPOStep", "UPOView", "tokenizer_of", "upo_paper"]
