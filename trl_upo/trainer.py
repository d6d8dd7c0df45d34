"""``UPOTrainer``: TRL's ``DPOTrainer`` plus the UPO auxiliary term: the DPO adapter of the UPO core.

Everything UPO shares with other trainers (scoring, the value column and collator, the log-prob capture, the one
gather, logging, save and resume) is :class:`trl_upo.core.UPOCore`. This adapter only says what is DPO's: the
responses of a row (chosen, rejected), the TRL trainer and config, and the term (``trl_upo.objective``):

- ``upo_combine="weighted"`` (default): ``alpha * L_aux``, the advantage-weighted log-likelihood of the chosen (or both)
  responses of the global batch (eqs. 4-7);
- ``upo_combine="margin"``: the correction that turns TRL's sigmoid loss into the MODPO-style margin loss.
"""

from __future__ import annotations

import torch
from trl import DPOTrainer

from .collator import VALUES_COLUMN, VALUES_KEY, UPODataCollator
from .config import UPOConfig
from .core import UPOCore, tokenizer_of, upo_paper
from .objective import awr_term, margin_correction
from .scoring import ROLES
from .state import STATE_FILE, load_upo_state
from .step import UPOStep

__all__ = ["STATE_FILE", "VALUES_COLUMN", "VALUES_KEY", "UPODataCollator", "UPOMixin", "UPOTrainer", "load_upo_state",
           "tokenizer_of"]


class UPOMixin(UPOCore):
    """UPO for any ``DPOTrainer`` (or subclass of it): put it first among the bases.

    ``class UPOTrainer(UPOMixin, DPOTrainer)`` is this package's trainer; a ``class MyDPO(DPOTrainer)`` of your own (or
    another framework's, such as axolotl's), with its own ``compute_loss`` or other overrides, gains UPO as
    ``class MyUPO(UPOMixin, MyDPO)``. The mixin scores the datasets before the trainer's constructor runs, wraps the
    collator after it, and wraps ``compute_loss``: it reads the policy's log-probs from the forward TRL runs inside
    whatever ``compute_loss`` the next class provides, and adds the term. Its constructor takes the next class's
    arguments (by keyword, or positionally in ``DPOTrainer``'s order); ``args`` must be a :class:`~trl_upo.UPOConfig`
    (or subclass) for reward heads, and any other config trains without them.
    """

    upo_trl_class = DPOTrainer
    upo_config_class = UPOConfig
    upo_roles = ROLES

    def upo_term(self, step: UPOStep) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``alpha * L_aux`` of one batch of pairs (or the margin correction), and its statistics."""
        if self.args.upo_combine == "margin":
            return self._margin_term(step)
        args: UPOConfig = self.args
        ll = step.loglik()  # (2B,): chosen, then rejected
        g = step.gather(loglik=ll.detach().view(2, -1).T)
        term = awr_term(
            g.reward_aux("chosen").to(ll.dtype),
            g.reward_aux("rejected").to(ll.dtype),
            ll,
            local=g.local,
            all_loglik=None if g.real is None else g["loglik"].T.to(ll.dtype),
            mask=g.real,
            baseline=args.upo_baseline,
            applies_to=args.upo_applies_to,
            temperature=args.upo_temperature,
            weight_cap=args.upo_weight_cap,
            normalize=args.upo_normalize_weights,
        )
        # The log-likelihood means stay in their dtype so that they equal TRL's logged `logps/chosen|rejected`
        # exactly under `upo_loglik="sum"`.
        loglik = ll.detach().view(2, -1).mean(1) if g.real is None else g.mean_rows(g["loglik"].to(ll.dtype))
        return args.upo_alpha * term.loss, {"loglik/chosen": loglik[0], "loglik/rejected": loglik[1], **term.stats}

    def _margin_term(self, step: UPOStep) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``upo_combine="margin"``: ``-log sigmoid(beta * delta - alpha * m) + log sigmoid(beta * delta)`` per pair,
        added to TRL's sigmoid loss (``trl_upo.objective.margin_correction``)."""
        logps_c, logps_r = step.loglik("sum").chunk(2)
        if self.precompute_ref_logps:
            ref_c, ref_r = step.inputs["ref_chosen_logps"], step.inputs["ref_rejected_logps"]
        else:
            if step.ref_logps is None:
                raise RuntimeError("UPOTrainer did not see the reference forward needed by upo_combine='margin'.")
            ref_c, ref_r = step.loglik("sum", step.ref_logps).chunk(2)
        delta = (logps_c - ref_c.to(logps_c)) - (logps_r - ref_r.to(logps_r))
        layout = step.layout
        reward_margin = (layout.reward_aux(step.values, "chosen") - layout.reward_aux(step.values, "rejected")).to(delta)
        per_pair = margin_correction(delta, reward_margin, beta=self.beta, alpha=self.args.upo_alpha, reduction="none")
        per_pair = per_pair * self.loss_weights[0]
        g = step.gather(correction=per_pair)
        # The mean reward margin is the difference of the two mean rewards: no reduction of its own.
        margin = g.value_mean("upo/reward_aux/chosen") - g.value_mean("upo/reward_aux/rejected")
        c = g["correction"]
        correction = c.mean() if g.real is None else g.mean_rows(c[:, None])[0]
        return per_pair.mean(), {"reward_margin": margin, "margin_correction": correction}


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
    _paper = upo_paper(DPOTrainer)
