"""The UPO objective as pure functions: tensors in, tensors out, no model and no trainer.

Equation numbers are the steps of ``docs/objective.md`` ("What trl-upo makes precise"):

    (2) r~_i = sign_i * (r_i - mean_i) / std_i            :func:`normalize_scores`
    (3) r_aux = sum_i w_i * r~_i                          :func:`aux_reward`
    (4) A = r_aux - b                                     :func:`advantages`
    (5) omega = min(exp(A/tau) / mean(exp(A/tau)), cap)   :func:`awr_weights`
    (6) l = -(1/|y|) sum_t log pi(y_t | x, y_<t)          :func:`sequence_loglik`
    (7) L_aux = mean(omega * l)                           :func:`awr_loss`
    margin mode: -log sigmoid(beta * D - alpha * (r_w - r_l))   :func:`margin_correction`

``gather`` arguments take a callable that concatenates a 1-D tensor across processes (the identity on one
process), so that the batch baseline and the weight normalisation use the global batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Gather = Callable[[torch.Tensor], torch.Tensor]

BASELINES = ("batch", "pair", "none")
APPLIES_TO = ("chosen", "both")
LOGLIK_REDUCTIONS = ("mean", "sum")
NORMALIZATIONS = ("zscore", "rank", "none")
COMBINE_MODES = ("awr", "margin")

# Rank normalisation maps a score to its empirical quantile u in [0, 1] over the training split, then to
# (u - 0.5) * sqrt(12), which has mean 0 and variance 1 like a z-score, so tau means the same in both modes.
_RANK_SCALE = math.sqrt(12.0)
RANK_QUANTILES = 1001


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# ----------------------------------------------------------------------------------------------------------------
# Normalisation statistics (step 2)
# ----------------------------------------------------------------------------------------------------------------


def fit_normalization(scores: Sequence[float] | torch.Tensor, mode: str) -> dict:
    """Statistics of one head's raw scores over the training split.

    Args:
        scores: 1-D array-like of raw scores (chosen and rejected responses pooled), all finite.
        mode: ``"zscore"``, ``"rank"`` or ``"none"``.

    Returns:
        A JSON-serialisable dict: ``{"mode", "count", "mean", "std"}`` plus ``"quantiles"`` for ``rank``.
        A head with zero spread gets ``std = 0``; :func:`normalize_scores` then maps it to 0 (it cannot rank
        responses), and the trainer warns about it.
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(f"Unknown normalization {mode!r}; expected one of {list(NORMALIZATIONS)}.")
    x = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if x.numel() == 0:
        raise ValueError("Cannot fit normalization statistics on an empty set of scores.")
    if not torch.isfinite(x).all():
        raise ValueError("Normalization statistics need finite scores; found NaN or infinity.")
    stats = {
        "mode": mode,
        "count": int(x.numel()),
        "mean": float(x.mean()),
        "std": float(x.std(unbiased=False)),
    }
    if mode == "rank":
        probs = torch.linspace(0, 1, min(RANK_QUANTILES, x.numel()), dtype=torch.float64)
        stats["quantiles"] = torch.quantile(x, probs).tolist()
    return stats


def _rank_transform(x: torch.Tensor, quantiles: list[float]) -> torch.Tensor:
    q = torch.tensor(quantiles, dtype=torch.float64, device=x.device)
    if q.numel() < 2 or float(q[-1] - q[0]) == 0.0:
        return torch.zeros_like(x, dtype=torch.float64)
    xd = x.to(torch.float64).contiguous()
    # Piecewise-linear empirical CDF through the stored quantiles; ties (flat segments) take their midpoint.
    right = torch.searchsorted(q, xd, right=True)  # unclamped: 0..n+1
    idx_lo = torch.searchsorted(q, xd, right=False)
    idx_hi = right.clamp(1, q.numel() - 1)
    n = q.numel() - 1
    lo, hi = q[idx_hi - 1], q[idx_hi]
    frac = torch.where(hi > lo, (xd - lo) / (hi - lo).clamp_min(1e-300), torch.zeros_like(xd))
    u_interp = (idx_hi - 1 + frac.clamp(0, 1)) / n
    tie = (right - idx_lo) > 1  # x equals two or more stored quantiles exactly
    u_tie = (idx_lo + right - 1).to(torch.float64) / (2 * n)
    u = torch.where(tie, u_tie.to(torch.float64), u_interp).clamp(0, 1)
    return (u - 0.5) * _RANK_SCALE


def normalize_scores(raw: torch.Tensor, stats: list[dict], signs: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. (2): per-head normalisation of raw scores with statistics fitted on the training split.

    Args:
        raw: ``(N, K)`` raw scores, K heads.
        stats: K dicts from :func:`fit_normalization`.
        signs: optional ``(K,)`` tensor of +1/-1 (``-1`` for a head whose lower raw score is better).

    Returns:
        ``(N, K)`` normalised scores in ``raw.dtype``.

    Example (worked by hand): raw ``[[1.], [3.]]`` with ``mean 2, std 1`` gives ``[[-1.], [1.]]``.
    """
    if raw.dim() != 2 or raw.size(1) != len(stats):
        raise ValueError(f"raw scores must have shape (N, {len(stats)}), got {tuple(raw.shape)}")
    cols = []
    for k, st in enumerate(stats):
        x = raw[:, k].to(torch.float64)
        mode = st["mode"]
        if mode == "none":
            y = x
        elif mode == "zscore":
            std = st["std"]
            y = (x - st["mean"]) / std if std > 0 else torch.zeros_like(x)
        elif mode == "rank":
            y = _rank_transform(x, st["quantiles"])
        else:
            raise ValueError(f"Unknown normalization {mode!r}; expected one of {list(NORMALIZATIONS)}.")
        cols.append(y)
    out = torch.stack(cols, dim=1)
    if signs is not None:
        out = out * signs.to(out)
    return out.to(raw.dtype)


def aux_reward(normalized: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. (3): ``r_aux = sum_i w_i * r~_i``. ``(N, K) x (K,) -> (N,)``."""
    return normalized @ weights.to(normalized)


# ----------------------------------------------------------------------------------------------------------------
# Advantages and weights (steps 4-5)
# ----------------------------------------------------------------------------------------------------------------


def advantages(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    *,
    baseline: str = "batch",
    applies_to: str = "chosen",
    gather: Gather | None = None,
) -> torch.Tensor:
    """Eq. (4): advantages of the responses the auxiliary term applies to.

    Args:
        r_chosen: ``(B,)`` auxiliary rewards of the chosen responses.
        r_rejected: ``(B,)`` auxiliary rewards of the rejected responses.
        baseline: ``"batch"`` (mean over the term's responses in the global batch), ``"pair"`` (mean of the two
            responses to the same prompt) or ``"none"``.
        applies_to: ``"chosen"`` (returns ``(B,)``) or ``"both"`` (returns ``(2B,)``, chosen first).
        gather: concatenates a tensor across processes, for the batch baseline.

    Example (worked by hand): r_chosen ``[1, 3]``, r_rejected ``[0, 0]``:
        batch/chosen -> ``[1 - 2, 3 - 2] = [-1, 1]``; pair/chosen -> ``[(1-0)/2, (3-0)/2] = [0.5, 1.5]``;
        batch/both -> mean of ``[1, 3, 0, 0]`` is 1 -> ``[0, 2, -1, -1]``.
    """
    _check_choice("baseline", baseline, BASELINES)
    _check_choice("applies_to", applies_to, APPLIES_TO)
    gather = gather or _identity
    if applies_to == "chosen":
        r = r_chosen
    else:
        r = torch.cat([r_chosen, r_rejected])
    if baseline == "none":
        return r
    if baseline == "pair":
        b = (r_chosen + r_rejected) / 2
        if applies_to == "both":
            b = torch.cat([b, b])
        return r - b
    return r - gather(r.detach()).mean()


@dataclass
class WeightStats:
    """Weights of the auxiliary term and their global statistics (for logging).

    Attributes:
        weights: local ``(N,)`` weights, detached.
        stats: ``(3,)`` float64 tensor: mean, max and capped fraction of the weights over the global batch. Kept as a
            tensor so that a training step converts its metrics with one host sync; the properties read it.
    """

    weights: torch.Tensor
    stats: torch.Tensor

    @property
    def mean(self) -> float:
        """Mean of the capped weights over the global batch."""
        return float(self.stats[0])

    @property
    def max(self) -> float:
        """Largest capped weight over the global batch."""
        return float(self.stats[1])

    @property
    def capped_fraction(self) -> float:
        """Fraction of the global batch's weights that hit the cap."""
        return float(self.stats[2])


def awr_weights(
    adv: torch.Tensor,
    *,
    temperature: float = 0.25,
    weight_cap: float = 100.0,
    normalize: bool = True,
    gather: Gather | None = None,
) -> WeightStats:
    """Eq. (5): ``omega = exp(A / tau) / mean(exp(A / tau))``, capped at ``weight_cap``; no gradient.

    The mean runs over the global batch (``gather``). It is computed in log space, so a large ``A / tau``
    cannot overflow. With ``normalize=False`` the weights are ``exp(A / tau)`` alone (then capped).

    Example (worked by hand): A ``[0, ln 3]``, tau 1 -> exp ``[1, 3]``, mean 2 -> omega ``[0.5, 1.5]``;
    with cap 1.2 -> ``[0.5, 1.2]``, capped fraction 0.5.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    gather = gather or _identity
    with torch.no_grad():
        z = adv.detach().to(torch.float64) / temperature
        if normalize:
            z_all = gather(z)
            log_mean = torch.logsumexp(z_all, dim=0) - math.log(z_all.numel())
            z = z - log_mean
        raw = torch.exp(z)
        capped = raw.clamp(max=weight_cap)
        all_raw = gather(raw)
        all_capped = all_raw.clamp(max=weight_cap)
        stats = torch.stack([all_capped.mean(), all_capped.max(), (all_raw > weight_cap).to(torch.float64).mean()])
        return WeightStats(weights=capped.to(adv.dtype), stats=stats)


# ----------------------------------------------------------------------------------------------------------------
# Log-likelihoods and losses (steps 6-8)
# ----------------------------------------------------------------------------------------------------------------


def sequence_loglik(per_token_logps: torch.Tensor, mask: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Eq. (6) without the sign: per-response log-likelihood.

    Args:
        per_token_logps: ``(N, T)`` token log-probabilities (TRL's fused LM head output, aligned with ``mask``).
        mask: ``(N, T)`` 1 on completion tokens.
        reduction: ``"mean"`` (divide by the completion length, at least 1) or ``"sum"``.

    Example (worked by hand): logps ``[[-1, -2, -3]]``, mask ``[[0, 1, 1]]`` -> sum ``-5``, mean ``-2.5``.
    """
    _check_choice("loglik reduction", reduction, LOGLIK_REDUCTIONS)
    m = mask.to(per_token_logps.dtype)
    total = (per_token_logps * m).sum(dim=1)
    if reduction == "sum":
        return total
    return total / m.sum(dim=1).clamp_min(1.0)


def awr_loss(weights: torch.Tensor, loglik: torch.Tensor) -> torch.Tensor:
    """Eq. (7): ``L_aux = mean(omega * (-loglik))`` over the responses the term applies to."""
    if weights.shape != loglik.shape:
        raise ValueError(f"weights {tuple(weights.shape)} and loglik {tuple(loglik.shape)} must match")
    return -(weights.detach().to(loglik.dtype) * loglik).mean()


def margin_correction(
    delta: torch.Tensor, reward_margin: torch.Tensor, *, beta: float, alpha: float
) -> torch.Tensor:
    """The margin mode as a correction to TRL's sigmoid loss.

    ``mean(-log sigmoid(beta * delta - alpha * m)) - mean(-log sigmoid(beta * delta))``, where ``delta`` is the
    DPO log-ratio difference and ``m = r_aux(y_w) - r_aux(y_l)``. Added to TRL's own sigmoid loss, it turns it
    into the MODPO-style margin loss without copying TRL's loss code; with ``alpha = 0`` it is exactly 0.

    Example (worked by hand): delta 0, m 1, beta 1, alpha ln 3 -> ``-log sigmoid(-ln 3) - log 2``
    ``= log 4 - log 2 = log 2``.
    """
    m = reward_margin.detach().to(delta.dtype)
    return (-F.logsigmoid(beta * delta - alpha * m) + F.logsigmoid(beta * delta)).mean()


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {what} {value!r}; expected one of {list(choices)}.")
