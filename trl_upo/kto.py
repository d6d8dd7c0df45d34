"""``UPOKTOTrainer``: TRL's ``KTOTrainer`` plus the UPO auxiliary term, for unpaired (desirable / undesirable) data:
the KTO adapter of the UPO core (:class:`trl_upo.core.UPOCore`), the paper's own setting.

What is KTO's, and only that, is here:

- the data: one response per row (the ``completion``); a paired dataset is unpaired first, as ``KTOTrainer`` would,
  and every split is checked before any scoring (:func:`trl_upo.data.unpaired.unpaired_dataset`);
- the term: ``L = L_KTO + alpha * L_aux`` with ``L_aux`` the advantage-weighted mean log-likelihood of the desirable
  completions of the global batch (``upo_applies_to="all"``: of every completion), from the policy forward KTO
  already runs (:func:`trl_upo.objective.unpaired_awr_term`); its statistics by kind of row (a batch may hold none of
  a kind: such a statistic is not logged);
- KTO's KL-estimate forward (the policy and the reference on mismatched completions, ``_compute_kl_logps``) is not
  captured: the capture is paused while it runs, so it is never mistaken for the policy forward.

See ``docs/kto.md``.
"""

from __future__ import annotations

from typing import Any

import torch
from trl import KTOTrainer

from .config import UPOKTOConfig
from .core import UPOCore, upo_paper
from .data.unpaired import unpaired_dataset
from .objective import masked_mean, unpaired_awr_term
from .scoring import UNPAIRED_ROLES
from .step import UPOStep

__all__ = ["UPOKTOConfig", "UPOKTOMixin", "UPOKTOTrainer", "unpaired_dataset"]


class UPOKTOMixin(UPOCore):
    """UPO for any ``KTOTrainer`` (or subclass of it) on unpaired data: put it first among the bases, as
    ``class MyUPOKTO(UPOKTOMixin, MyKTO)``. Its constructor takes ``KTOTrainer``'s arguments; ``args`` must be a
    :class:`~trl_upo.UPOKTOConfig` (or subclass) for reward heads."""

    upo_trl_class = KTOTrainer
    upo_trl_hooks = ("_compute_kl_logps",)  # paused while KTO's KL-estimate forward runs
    upo_config_class = UPOKTOConfig
    upo_roles = UNPAIRED_ROLES
    upo_sparse_statistics = True

    def upo_prepare_split(self, dataset: Any, split: str, *, train: bool, args: UPOKTOConfig) -> Any:
        """Unpair a paired split as KTOTrainer does, and check labels (a no-op on a split prepared already)."""
        return unpaired_dataset(dataset, split, train=train, applies_to=args.upo_applies_to,
                                num_proc=args.dataset_num_proc)

    def upo_term(self, step: UPOStep) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``alpha * L_aux`` of one batch of unpaired rows, and its statistics (one gather: values, label,
        log-likelihood)."""
        args: UPOKTOConfig = self.args
        ll = step.loglik()  # (B,)
        g = step.gather(label=step.inputs["label"].to(torch.float64), loglik=ll.detach())
        real = torch.ones_like(g["label"], dtype=torch.bool) if g.real is None else g.real
        desirable = (g["label"] > 0.5) & real
        undesirable = ~desirable & real
        r_aux, all_ll = g.reward_aux("completion"), g["loglik"]
        term = unpaired_awr_term(
            r_aux,
            desirable if args.upo_applies_to == "desirable" else real,
            ll,
            local=g.local,
            all_loglik=all_ll,
            num_processes=self.accelerator.num_processes,
            baseline=args.upo_baseline,
            temperature=args.upo_temperature,
            weight_cap=args.upo_weight_cap,
            normalize=args.upo_normalize_weights,
        )
        return args.upo_alpha * term.loss, {
            "reward_aux/desirable": masked_mean(r_aux, desirable),
            "reward_aux/undesirable": masked_mean(r_aux, undesirable),
            "loglik/desirable": masked_mean(all_ll, desirable),
            "loglik/undesirable": masked_mean(all_ll, undesirable),
            **term.stats,
        }

    def _compute_kl_logps(self, model, batch):
        """KTO's KL-estimate forward (mismatched completions), with the log-prob capture paused: it is not the
        policy forward whose log-likelihoods the auxiliary term trains."""
        capture = getattr(self, "_upo_capture", None)
        if capture is None:
            return super()._compute_kl_logps(model, batch)
        with capture.paused():
            return super()._compute_kl_logps(model, batch)


class UPOKTOTrainer(UPOKTOMixin, KTOTrainer):
    """
    Trainer for Unified Preference Optimization on unpaired data: TRL's KTO loss plus an advantage-weighted
    log-likelihood term driven by reward heads (designer objectives), ``L = L_KTO + alpha * L_aux``.

    The constructor is KTOTrainer's. With no reward heads (or ``upo_alpha=0``) it trains exactly like
    ``KTOTrainer``. Paper: [Unified Preference Optimization](https://huggingface.co/papers/2405.17956), whose
    experiments put the term on KTO. To add UPO to another ``KTOTrainer`` subclass, use :class:`UPOKTOMixin`.

    Example (unpaired rows; paired ``chosen``/``rejected`` data is unpaired as KTOTrainer does):

    ```python
    from datasets import Dataset
    from trl_upo import UPOKTOConfig, UPOKTOTrainer

    rows = Dataset.from_dict({"prompt": ["Hi"] * 2, "completion": [" Hello!", " Go away."], "label": [True, False]})
    heads = [{"name": "length", "params": {"direction": "shorter"}}]
    trainer = UPOKTOTrainer(model=model, args=UPOKTOConfig("out", reward_heads=heads), train_dataset=rows)
    trainer.train()
    ```
    """

    _tag_names = ["trl", "kto", "upo"]
    _name = "UPO-KTO"
    _paper = upo_paper(KTOTrainer)
