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
#: The choices on unpaired data (KTO): no pair to take a baseline over; the term applies to the desirable completions
#: (the analogue of ``chosen``) or to all of them.
UNPAIRED_BASELINES = ("batch", "none")
UNPAIRED_APPLIES_TO = ("desirable", "all")

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
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. (4): advantages of the responses the auxiliary term applies to.

    Args:
        r_chosen: ``(B,)`` auxiliary rewards of the chosen responses.
        r_rejected: ``(B,)`` auxiliary rewards of the rejected responses.
        baseline: ``"batch"`` (mean over the term's responses in the global batch), ``"pair"`` (mean of the two
            responses to the same prompt) or ``"none"``.
        applies_to: ``"chosen"`` (returns ``(B,)``) or ``"both"`` (returns ``(2B,)``, chosen first).
        gather: concatenates a tensor across processes, for the batch baseline.
        mask: ``(B,)`` bool, the pairs that count in the batch baseline (the others are padding); None: all.

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
    if mask is not None:
        mask = mask if applies_to == "chosen" else torch.cat([mask, mask])
    return r - masked_mean(gather(r.detach()), mask)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is true (all of them when ``mask`` is None)."""
    if mask is None:
        return x.mean()
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum()


def masked_mean_rows(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Column means of ``rows`` over the rows where ``mask`` is true: ``(G, C), (G,) -> (C,)``."""
    m = mask.to(rows.dtype)
    return (rows * m[:, None]).sum(0) / m.sum()


def masked_max(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Largest entry of ``x`` where ``mask`` is true (over all entries when ``mask`` is None)."""
    return x.max() if mask is None else x.masked_fill(~mask, -math.inf).max()


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
    mask: torch.Tensor | None = None,
) -> WeightStats:
    """Eq. (5): ``omega = exp(A / tau) / mean(exp(A / tau))``, capped at ``weight_cap``; no gradient.

    The mean runs over the global batch: the entries of ``adv`` where ``mask`` is true (padding rows excluded),
    after ``gather``. It is computed in log space, so a large ``A / tau`` cannot overflow. With ``normalize=False``
    the weights are ``exp(A / tau)`` alone (then capped).

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
            if mask is None:
                log_mean = torch.logsumexp(z_all, dim=0) - math.log(z_all.numel())
            else:
                log_mean = torch.logsumexp(z_all.masked_fill(~mask, -math.inf), dim=0) - torch.log(mask.sum())
            z = z - log_mean
        raw = torch.exp(z)
        capped = raw.clamp(max=weight_cap)
        all_raw = gather(raw)
        all_capped = all_raw.clamp(max=weight_cap)
        capped_frac = masked_mean((all_raw > weight_cap).to(torch.float64), mask)
        stats = torch.stack([masked_mean(all_capped, mask), masked_max(all_capped, mask), capped_frac])
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


@dataclass
class AuxTerm:
    """The auxiliary term of one batch and its statistics.

    Attributes:
        loss: this process's ``L_aux`` (steps 4-7), with gradient through the log-likelihoods.
        stats: named 0-d statistics over the global batch, detached (``"aux_loss"``, ``"advantage/mean"``,
            ``"advantage/max"``, ``"weight/mean"``, ``"weight/max"``, ``"weight/capped_frac"``).
    """

    loss: torch.Tensor
    stats: dict[str, torch.Tensor]


def awr_term(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    loglik: torch.Tensor,
    *,
    local: slice,
    all_loglik: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    baseline: str = "batch",
    applies_to: str = "chosen",
    temperature: float = 0.25,
    weight_cap: float = 100.0,
    normalize: bool = True,
) -> AuxTerm:
    """Steps 4-7 on the global batch: advantages, weights, and the weighted log-likelihood loss of this process.

    The rewards are those of the global batch (every process's pairs, so that the batch baseline and the weight
    normalisation are global); the loss is computed on this process's pairs, ``local``, whose log-likelihoods carry
    the gradient.

    Args:
        r_chosen: ``(G,)`` r_aux of the chosen responses of the global batch.
        r_rejected: ``(G,)`` r_aux of the rejected responses.
        loglik: ``(2B,)`` this process's log-likelihoods (chosen, then rejected), with gradient.
        local: the rows of the global batch that are this process's (``B`` of them).
        all_loglik: ``(2, G)`` detached log-likelihoods of the global batch (chosen row, rejected row), for the
            logged ``aux_loss``; None: this process's.
        mask: ``(G,)`` bool, the rows that are pairs (the others are padding); None: all.
        baseline: as in :func:`advantages`.
        applies_to: as in :func:`advantages`.
        temperature: as in :func:`awr_weights`.
        weight_cap: as in :func:`awr_weights`.
        normalize: as in :func:`awr_weights`.

    Returns:
        The loss and its statistics.

    Example (worked by hand): one process, r_chosen ``[0, ln 3]``, tau 1, batch baseline, loglik chosen
    ``[-1, -2]``: A ``[-ln3/2, ln3/2]`` -> exp ``[1/sqrt3, sqrt3]``, mean ``2/sqrt3`` -> omega ``[0.5, 1.5]``;
    ``L_aux = -mean(0.5 * -1, 1.5 * -2) = 1.75``.
    """
    adv = advantages(r_chosen, r_rejected, baseline=baseline, applies_to=applies_to, mask=mask)
    both_mask = None if mask is None else (mask if applies_to == "chosen" else torch.cat([mask, mask]))
    ws = awr_weights(adv, temperature=temperature, weight_cap=weight_cap, normalize=normalize, mask=both_mask)
    g = r_chosen.numel()
    idx = torch.arange(g, device=adv.device)[local]
    rows = idx if applies_to == "chosen" else torch.cat([idx, idx + g])
    own = loglik[: loglik.numel() // 2] if applies_to == "chosen" else loglik
    loss = awr_loss(ws.weights[rows], own)
    with torch.no_grad():
        if all_loglik is None:
            aux_all = loss.detach().to(torch.float64)
        else:
            ll = all_loglik[0] if applies_to == "chosen" else all_loglik.reshape(-1)
            aux_all = -masked_mean(ws.weights.to(torch.float64) * ll.to(torch.float64), both_mask)
    return AuxTerm(loss=loss, stats=_term_statistics(aux_all, adv, ws, both_mask))


def unpaired_awr_term(
    r_aux: torch.Tensor,
    selected: torch.Tensor,
    loglik: torch.Tensor,
    *,
    local: slice,
    all_loglik: torch.Tensor,
    num_processes: int = 1,
    baseline: str = "batch",
    temperature: float = 0.25,
    weight_cap: float = 100.0,
    normalize: bool = True,
) -> AuxTerm:
    """Steps 4-7 on unpaired data (KTO): the weighted log-likelihood of the ``selected`` completions of the global
    batch (the desirable ones, or all real rows), advantages and weights taken over those completions only.

    ``L_aux = (1/N) sum_{selected} omega * l`` over the global batch's ``N`` selected completions. Each process
    returns its share, ``P/N sum_{own selected} omega * l`` (``P = num_processes``), so that the mean over processes
    that data parallelism takes of the gradients is the gradient of the global ``L_aux``, whatever number of
    selected rows each process holds. With no selected completion in the global batch the loss is a zero that keeps
    the graph (and the statistics are NaN; the trainer does not log them).

    Args:
        r_aux: ``(G,)`` auxiliary rewards of the global batch's completions.
        selected: ``(G,)`` bool, the completions the term applies to (padding rows excluded).
        loglik: ``(B,)`` this process's log-likelihoods, with gradient.
        local: the rows of the global batch that are this process's (``B`` of them).
        all_loglik: ``(G,)`` detached log-likelihoods of the global batch, for the logged ``aux_loss``.
        num_processes: ``P``, the processes the global batch is gathered from.
        baseline: ``"batch"`` (the mean r_aux of the selected completions) or ``"none"``.
        temperature: as in :func:`awr_weights`.
        weight_cap: as in :func:`awr_weights`.
        normalize: as in :func:`awr_weights`.

    Example (worked by hand): one process, r_aux ``[0, ln 3, 5]``, selected ``[T, T, F]``, tau 1, loglik
    ``[-1, -2, -9]``: as in :func:`awr_term`, omega ``[0.5, 1.5]`` on the two selected rows,
    ``L_aux = (0.5 * 1 + 1.5 * 2) / 2 = 1.75``; the third row has no weight.
    """
    _check_choice("baseline", baseline, UNPAIRED_BASELINES)
    count = selected.sum()
    adv = r_aux if baseline == "none" else r_aux - masked_mean(r_aux, selected)
    ws = awr_weights(adv, temperature=temperature, weight_cap=weight_cap, normalize=normalize, mask=selected)
    own = ws.weights[local]
    own_weights = torch.where(selected[local], own, torch.zeros_like(own)).detach().to(loglik.dtype)
    scale = num_processes / count.clamp_min(1).to(loglik.dtype)
    loss = -(own_weights * loglik).sum() * scale
    with torch.no_grad():
        aux_all = -masked_mean(ws.weights.to(torch.float64) * all_loglik.to(torch.float64), selected)
    return AuxTerm(loss=loss, stats=_term_statistics(aux_all, adv, ws, selected))


def _term_statistics(aux_loss: torch.Tensor, adv: torch.Tensor, ws: WeightStats, mask: torch.Tensor | None) -> dict:
    """The named statistics of a term over the responses it applies to (``mask``), detached."""
    with torch.no_grad():
        return {
            "aux_loss": aux_loss,
            "advantage/mean": masked_mean(adv.detach(), mask),
            "advantage/max": masked_max(adv.detach(), mask),
            "weight/mean": ws.stats[0],
            "weight/max": ws.stats[1],
            "weight/capped_frac": ws.stats[2],
        }


def margin_correction(
    delta: torch.Tensor, reward_margin: torch.Tensor, *, beta: float, alpha: float, reduction: str = "mean"
) -> torch.Tensor:
    """The margin mode as a correction to TRL's sigmoid loss.

    ``mean(-log sigmoid(beta * delta - alpha * m)) - mean(-log sigmoid(beta * delta))``, where ``delta`` is the
    DPO log-ratio difference and ``m = r_aux(y_w) - r_aux(y_l)``. Added to TRL's own sigmoid loss, it turns it
    into the MODPO-style margin loss without copying TRL's loss code; with ``alpha = 0`` it is exactly 0.

    Example (worked by hand): delta 0, m 1, beta 1, alpha ln 3 -> ``-log sigmoid(-ln 3) - log 2``
    ``= log 4 - log 2 = log 2``. ``reduction="none"`` returns the per-pair corrections.
    """
    m = reward_margin.detach().to(delta.dtype)
    per_pair = -F.logsigmoid(beta * delta - alpha * m) + F.logsigmoid(beta * delta)
    return per_pair if reduction == "none" else per_pair.mean()


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {what} {value!r}; expected one of {list(choices)}.")
