"""Math tests of :mod:`trl_upo.objective`, on tensors small enough to check by hand.

Every test states in its docstring the numbers it expects and how they are obtained (equation numbers are the steps
of ``docs/objective.md``, "What trl-upo makes precise").
"""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch
import torch.nn.functional as F

from trl_upo.objective import (
    advantages,
    aux_reward,
    awr_loss,
    awr_weights,
    fit_normalization,
    margin_correction,
    normalize_scores,
    sequence_loglik,
)

SQRT3 = math.sqrt(3.0)


def t64(*values):
    return torch.tensor(values, dtype=torch.float64)


def fake_gather(*other_process_values):
    """A ``gather`` for a two-process run: this process's values followed by the other process's."""
    other = torch.tensor(other_process_values, dtype=torch.float64)

    def gather(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, other.to(x)])

    return gather


def run_on_processes(fn, per_process_inputs):
    """Run ``fn(x, gather)`` on simulated processes (one thread each) whose ``gather`` is a real all-gather:
    every call concatenates, in rank order, the tensors that all processes pass to their matching call."""
    n = len(per_process_inputs)
    barrier = threading.Barrier(n, timeout=30)
    slots: list = [None] * n
    results: list = [None] * n
    errors: list = []

    def make_gather(rank):
        def gather(t):
            slots[rank] = t
            barrier.wait()
            out = torch.cat([slots[r].to(t) for r in range(n)])
            barrier.wait()
            return out

        return gather

    def run(rank):
        try:
            results[rank] = fn(per_process_inputs[rank], make_gather(rank))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return results


# ------------------------------------------------------------------------------------------------------------------
# fit_normalization
# ------------------------------------------------------------------------------------------------------------------


def test_fit_normalization_zscore():
    """Scores [1, 2, 3, 4]: mean 2.5; deviations +-1.5, +-0.5 -> population variance (2.25+0.25)*2/4 = 1.25,
    std sqrt(1.25) = 1.1180. No quantiles in z-score mode; the dict is JSON-serialisable (saved with the run)."""
    st = fit_normalization([1.0, 2.0, 3.0, 4.0], "zscore")
    assert st["mode"] == "zscore"
    assert st["count"] == 4
    assert st["mean"] == pytest.approx(2.5)
    assert st["std"] == pytest.approx(math.sqrt(1.25))
    assert "quantiles" not in st
    assert json.loads(json.dumps(st)) == st


def test_fit_normalization_accepts_tensors_and_2d_input():
    """A (2, 2) tensor [[1, 2], [3, 4]] is flattened: the same statistics as the list [1, 2, 3, 4]."""
    st = fit_normalization(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "zscore")
    assert st["count"] == 4
    assert st["mean"] == pytest.approx(2.5)
    assert st["std"] == pytest.approx(math.sqrt(1.25))


def test_fit_normalization_rank_quantiles():
    """Scores [5, 1, 4, 2, 3] (unsorted): 5 quantiles at probabilities 0, .25, .5, .75, 1 of the sorted scores
    [1, 2, 3, 4, 5] are the scores themselves. Mean 3, std sqrt((4+1+0+1+4)/5) = sqrt(2)."""
    st = fit_normalization([5.0, 1.0, 4.0, 2.0, 3.0], "rank")
    assert st["mode"] == "rank"
    assert st["quantiles"] == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0])
    assert st["mean"] == pytest.approx(3.0)
    assert st["std"] == pytest.approx(math.sqrt(2.0))
    assert json.loads(json.dumps(st)) == st


def test_fit_normalization_rank_with_ties():
    """Scores [1, 1, 1, 2]: 4 quantiles at probabilities 0, 1/3, 2/3, 1 fall on sorted positions 0, 1, 2, 3,
    i.e. [1, 1, 1, 2]. The three tied 1s occupy the quantile range [0, 2/3], so they rank at its midpoint u = 1/3,
    and the 2 ranks at u = 1. The rank score is (u - 0.5) * sqrt(12): 1 -> (1/3 - 1/2) * 2 sqrt(3) = -1/sqrt(3)
    = -0.5774; 2 -> (1/2) * 2 sqrt(3) = sqrt(3) = 1.7321. Mean over the training set:
    (3 * -1/sqrt(3) + sqrt(3)) / 4 = 0."""
    st = fit_normalization([1.0, 1.0, 1.0, 2.0], "rank")
    assert st["quantiles"] == pytest.approx([1.0, 1.0, 1.0, 2.0])
    out = normalize_scores(t64(1.0, 1.0, 1.0, 2.0).unsqueeze(1), [st]).squeeze(1)
    assert out.tolist() == pytest.approx([-1 / SQRT3, -1 / SQRT3, -1 / SQRT3, SQRT3])
    assert float(out.mean()) == pytest.approx(0.0, abs=1e-6)


def test_fit_normalization_rank_with_ties_at_both_ends():
    """Scores [1, 1, 2, 3, 3]: quantiles at 0, .25, .5, .75, 1 are [1, 1, 2, 3, 3]. The two 1s occupy [0, 0.25]
    (midpoint u = 1/8), the 2 sits at u = 1/2, the two 3s occupy [0.75, 1] (midpoint u = 7/8). Scores:
    (1/8 - 1/2) sqrt(12) = -0.375 * 3.4641 = -1.2990, 0, +1.2990: symmetric, mean 0, like the data."""
    st = fit_normalization([1.0, 1.0, 2.0, 3.0, 3.0], "rank")
    assert st["quantiles"] == pytest.approx([1.0, 1.0, 2.0, 3.0, 3.0])
    out = normalize_scores(t64(1.0, 1.0, 2.0, 3.0, 3.0).unsqueeze(1), [st]).squeeze(1)
    a = 0.375 * math.sqrt(12.0)
    assert out.tolist() == pytest.approx([-a, -a, 0.0, a, a], abs=1e-6)
    assert float(out.mean()) == pytest.approx(0.0, abs=1e-6)


def test_fit_normalization_none_keeps_statistics():
    """Mode none still records mean/std (for logging): [2, 4] -> mean 3, std 1."""
    st = fit_normalization([2.0, 4.0], "none")
    assert st == {"mode": "none", "count": 2, "mean": 3.0, "std": 1.0}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_fit_normalization_rejects_non_finite(bad):
    """One non-finite score among finite ones is an error, never silently dropped."""
    with pytest.raises(ValueError, match="finite"):
        fit_normalization([1.0, bad, 3.0], "zscore")


def test_fit_normalization_rejects_empty_and_unknown_mode():
    with pytest.raises(ValueError, match="empty"):
        fit_normalization([], "zscore")
    with pytest.raises(ValueError, match="minmax"):
        fit_normalization([1.0, 2.0], "minmax")


@pytest.mark.parametrize("mode", ["zscore", "rank", "none"])
def test_fit_normalization_constant_scores_have_zero_std(mode):
    """[2, 2, 2]: mean 2, std exactly 0 (the head cannot rank responses)."""
    st = fit_normalization([2.0, 2.0, 2.0], mode)
    assert st["mean"] == 2.0
    assert st["std"] == 0.0


# ------------------------------------------------------------------------------------------------------------------
# normalize_scores
# ------------------------------------------------------------------------------------------------------------------


def test_normalize_scores_zscore_hand_example():
    """raw [[1], [3]] with mean 2, std 1 -> [[-1], [1]]."""
    stats = [{"mode": "zscore", "mean": 2.0, "std": 1.0}]
    out = normalize_scores(torch.tensor([[1.0], [3.0]]), stats)
    assert out.tolist() == [[-1.0], [1.0]]


def test_normalize_scores_zscore_fitted_roundtrip_and_dtype():
    """Fit on [1, 2, 3, 4] (mean 2.5, std sqrt(1.25)) and normalise the same scores: (x - 2.5) / 1.1180 =
    [-1.3416, -0.4472, 0.4472, 1.3416]; mean 0, population variance 1. A float32 input gives float32 output."""
    raw = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=torch.float32)
    st = fit_normalization(raw.flatten(), "zscore")
    out = normalize_scores(raw, [st])
    assert out.dtype == torch.float32
    s = math.sqrt(1.25)
    assert out.flatten().tolist() == pytest.approx([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s], rel=1e-6)
    assert float(out.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(out.var(unbiased=False)) == pytest.approx(1.0, rel=1e-6)


def test_normalize_scores_two_heads_independent_columns():
    """Two heads: head 0 z-scored with mean 2, std 1; head 1 mode none.
    raw [[1, 10], [3, 20]] -> [[-1, 10], [1, 20]]."""
    stats = [{"mode": "zscore", "mean": 2.0, "std": 1.0}, {"mode": "none", "mean": 15.0, "std": 5.0}]
    out = normalize_scores(t64(1.0, 10.0, 3.0, 20.0).view(2, 2), stats)
    assert out.tolist() == [[-1.0, 10.0], [1.0, 20.0]]


def test_normalize_scores_none_is_identity():
    """Mode none returns the raw scores unchanged, whatever mean/std were recorded."""
    raw = t64(-3.5, 0.0, 7.25).unsqueeze(1)
    out = normalize_scores(raw, [fit_normalization(raw.flatten(), "none")])
    assert torch.equal(out, raw)


@pytest.mark.parametrize("n", [800, 5000])
def test_normalize_scores_rank_maps_training_distribution_to_mean0_var1(n):
    """Rank normalisation of the training scores themselves: their empirical quantiles u are ~uniform on [0, 1],
    so (u - 0.5) * sqrt(12) has mean 0 and variance 1/12 * 12 = 1. With n = 800 distinct scores all are stored as
    quantiles, u = i / (n - 1) exactly: mean 0, variance (n + 1) / (n - 1) = 1.0025. With n = 5000 > 1001 stored
    quantiles, u is interpolated: still mean ~0, variance ~1. Skewed (exponential) scores, so a z-score would not
    give this; the rank transform is monotone."""
    g = torch.Generator().manual_seed(0)
    raw = torch.empty(n, dtype=torch.float64).exponential_(generator=g)
    st = fit_normalization(raw, "rank")
    out = normalize_scores(raw.unsqueeze(1), [st]).squeeze(1)
    assert float(out.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(out.var(unbiased=False)) == pytest.approx(1.0, abs=0.01)
    order = torch.argsort(raw)
    assert bool((out[order][1:] >= out[order][:-1]).all()), "rank normalisation must be monotone"
    assert float(out.min()) == pytest.approx(-SQRT3, abs=1e-9)  # u = 0
    assert float(out.max()) == pytest.approx(SQRT3, abs=1e-9)  # u = 1


def test_normalize_scores_rank_interpolates_and_clamps():
    """Quantiles of [1, 2, 3, 4, 5] are themselves (u = 0, .25, .5, .75, 1).
    x = 3 -> u = 0.5 -> 0; x = 1.5 -> u = 0.125 -> (0.125 - 0.5) * sqrt(12) = -0.375 * 3.4641 = -1.2990;
    x = 0 and x = 9 lie outside the training range and clamp to u = 0 / 1 -> -sqrt(3) / +sqrt(3)."""
    st = fit_normalization([1.0, 2.0, 3.0, 4.0, 5.0], "rank")
    out = normalize_scores(t64(3.0, 1.5, 0.0, 9.0).unsqueeze(1), [st]).squeeze(1)
    assert out.tolist() == pytest.approx([0.0, -0.375 * math.sqrt(12), -SQRT3, SQRT3])


def test_normalize_scores_signs_negate_a_head():
    """signs [1, -1]: the second head is a cost. raw [[1, 1], [3, 3]], both mean 2, std 1 ->
    [[-1, -1], [1, 1]] -> signs -> [[-1, 1], [1, -1]]."""
    st = {"mode": "zscore", "mean": 2.0, "std": 1.0}
    out = normalize_scores(t64(1.0, 1.0, 3.0, 3.0).view(2, 2), [st, st], signs=t64(1.0, -1.0))
    assert out.tolist() == [[-1.0, 1.0], [1.0, -1.0]]


def test_normalize_scores_zero_std_gives_zeros():
    """A head with std 0 (constant on the training split) maps every score to 0 in z-score and rank modes, even
    scores that differ from the training constant (no division by zero, no NaN)."""
    for mode in ("zscore", "rank"):
        st = fit_normalization([2.0, 2.0, 2.0], mode)
        out = normalize_scores(t64(2.0, 5.0, -1.0).unsqueeze(1), [st])
        assert out.tolist() == [[0.0], [0.0], [0.0]], mode


def test_normalize_scores_shape_errors():
    """raw must be (N, K) with K = len(stats)."""
    st = {"mode": "zscore", "mean": 0.0, "std": 1.0}
    with pytest.raises(ValueError, match=r"shape \(N, 1\)"):
        normalize_scores(t64(1.0, 2.0), [st])  # 1-D
    with pytest.raises(ValueError, match=r"shape \(N, 1\)"):
        normalize_scores(torch.zeros(3, 2, dtype=torch.float64), [st])  # K mismatch
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        normalize_scores(torch.zeros(3, 1, 1, dtype=torch.float64), [st, st])  # 3-D


def test_normalize_scores_unknown_mode():
    with pytest.raises(ValueError, match="minmax"):
        normalize_scores(torch.zeros(2, 1), [{"mode": "minmax", "mean": 0.0, "std": 1.0}])


# ------------------------------------------------------------------------------------------------------------------
# aux_reward
# ------------------------------------------------------------------------------------------------------------------


def test_aux_reward_weighted_sum():
    """Eq. (3): normalized [[1, 2], [3, 4]], weights [0.5, 2] -> [0.5 + 4, 1.5 + 8] = [4.5, 9.5]."""
    out = aux_reward(t64(1.0, 2.0, 3.0, 4.0).view(2, 2), t64(0.5, 2.0))
    assert out.shape == (2,)
    assert out.tolist() == [4.5, 9.5]


def test_aux_reward_zero_weight_drops_head_and_keeps_dtype():
    """weights [0, 1] (float64) on float32 scores [[7, 1], [-7, 2]] -> [1, 2] in float32."""
    out = aux_reward(torch.tensor([[7.0, 1.0], [-7.0, 2.0]]), t64(0.0, 1.0))
    assert out.dtype == torch.float32
    assert out.tolist() == [1.0, 2.0]


def test_aux_reward_no_heads():
    """K = 0: (N, 0) @ (0,) -> zeros (N,)."""
    out = aux_reward(torch.zeros(3, 0), torch.zeros(0))
    assert out.tolist() == [0.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------------------------------------
# advantages
# ------------------------------------------------------------------------------------------------------------------

R_CHOSEN = (1.0, 3.0)
R_REJECTED = (0.0, 0.0)


@pytest.mark.parametrize(
    ("baseline", "applies_to", "expected"),
    [
        # mean of chosen [1, 3] is 2
        ("batch", "chosen", [-1.0, 1.0]),
        # b = ([1, 3] + [0, 0]) / 2 = [0.5, 1.5]
        ("pair", "chosen", [0.5, 1.5]),
        ("none", "chosen", [1.0, 3.0]),
        # mean of [1, 3, 0, 0] is 1
        ("batch", "both", [0.0, 2.0, -1.0, -1.0]),
        # b = [0.5, 1.5] for each pair, chosen first then rejected
        ("pair", "both", [0.5, 1.5, -0.5, -1.5]),
        ("none", "both", [1.0, 3.0, 0.0, 0.0]),
    ],
)
def test_advantages_hand_values(baseline, applies_to, expected):
    """Eq. (4) with r_chosen [1, 3], r_rejected [0, 0]; expected values in the parametrisation comments."""
    out = advantages(t64(*R_CHOSEN), t64(*R_REJECTED), baseline=baseline, applies_to=applies_to)
    assert out.tolist() == pytest.approx(expected)


def test_advantages_batch_baseline_is_global_chosen():
    """Two processes: this one has chosen [1, 3], the other [5, 7]. The batch baseline is the global mean
    (1 + 3 + 5 + 7) / 4 = 4, so the local advantages are [-3, -1] (not [-1, 1] as with a local mean)."""
    out = advantages(t64(1.0, 3.0), t64(0.0, 0.0), baseline="batch", gather=fake_gather(5.0, 7.0))
    assert out.tolist() == pytest.approx([-3.0, -1.0])


def test_advantages_batch_baseline_is_global_both():
    """applies_to both: this process's term responses are [1, 3, 0, 0] (chosen then rejected), the other's
    [2, 6, 0, 0]. Global mean 12 / 8 = 1.5 -> [-0.5, 1.5, -1.5, -1.5]."""
    out = advantages(
        t64(1.0, 3.0), t64(0.0, 0.0), baseline="batch", applies_to="both", gather=fake_gather(2.0, 6.0, 0.0, 0.0)
    )
    assert out.tolist() == pytest.approx([-0.5, 1.5, -1.5, -1.5])


@pytest.mark.parametrize("baseline", ["pair", "none"])
def test_advantages_local_baselines_ignore_other_processes(baseline):
    """The pair and none baselines only use this process's pairs: a gather that brings in [100, 100] changes
    nothing (pair -> [0.5, 1.5]; none -> [1, 3])."""
    local = advantages(t64(*R_CHOSEN), t64(*R_REJECTED), baseline=baseline)
    gathered = advantages(t64(*R_CHOSEN), t64(*R_REJECTED), baseline=baseline, gather=fake_gather(100.0, 100.0))
    assert gathered.tolist() == local.tolist()


def test_advantages_invalid_choices():
    with pytest.raises(ValueError, match="baseline 'mean'"):
        advantages(t64(1.0), t64(0.0), baseline="mean")
    with pytest.raises(ValueError, match="applies_to 'rejected'"):
        advantages(t64(1.0), t64(0.0), applies_to="rejected")


# ------------------------------------------------------------------------------------------------------------------
# awr_weights
# ------------------------------------------------------------------------------------------------------------------


def test_awr_weights_hand_example():
    """Eq. (5): A [0, ln 3], tau 1 -> exp [1, 3], mean 2 -> omega [0.5, 1.5]; mean 1, max 1.5, nothing capped."""
    ws = awr_weights(t64(0.0, math.log(3.0)), temperature=1.0)
    assert ws.weights.tolist() == pytest.approx([0.5, 1.5])
    assert ws.mean == pytest.approx(1.0)
    assert ws.max == pytest.approx(1.5)
    assert ws.capped_fraction == 0.0


def test_awr_weights_statistics_stay_a_tensor_until_read():
    """The trainer converts all of a step's metrics with one host sync, so the weight statistics come as one (3,)
    float64 tensor [mean, max, capped fraction]; the float properties read it. Cap 1.2 on the hand example:
    [0.5, 1.5] -> [0.5, 1.2]: mean 0.85, max 1.2, capped fraction 0.5."""
    ws = awr_weights(t64(0.0, math.log(3.0)), temperature=1.0, weight_cap=1.2)
    assert isinstance(ws.stats, torch.Tensor) and ws.stats.dtype == torch.float64 and ws.stats.shape == (3,)
    assert ws.stats.tolist() == pytest.approx([0.85, 1.2, 0.5])
    assert (ws.mean, ws.max, ws.capped_fraction) == tuple(ws.stats.tolist())


def test_awr_weights_temperature_scales_advantages():
    """A [0, ln 3], tau 0.5 -> exp(A / tau) = [1, 9], mean 5 -> [0.2, 1.8]."""
    ws = awr_weights(t64(0.0, math.log(3.0)), temperature=0.5)
    assert ws.weights.tolist() == pytest.approx([0.2, 1.8])


def test_awr_weights_cap_and_capped_fraction():
    """Same as the hand example with cap 1.2: [0.5, 1.5] -> [0.5, 1.2]; capped fraction 1/2; logged mean of the
    capped weights (0.5 + 1.2) / 2 = 0.85 and max 1.2."""
    ws = awr_weights(t64(0.0, math.log(3.0)), temperature=1.0, weight_cap=1.2)
    assert ws.weights.tolist() == pytest.approx([0.5, 1.2])
    assert ws.capped_fraction == pytest.approx(0.5)
    assert ws.mean == pytest.approx(0.85)
    assert ws.max == pytest.approx(1.2)


def test_awr_weights_normalised_over_gathered_batch():
    """Two processes, tau 1: process 0 has A [0, ln 3] (exp [1, 3]), process 1 has A [ln 5, ln 7] (exp [5, 7]).
    The global mean of exp is 4, so process 0's weights are [1/4, 3/4] (local mean 0.5, not 1) and process 1's
    [5/4, 7/4]; the gathered weights [0.25, 0.75, 1.25, 1.75] have mean exactly 1 and max 1.75, which both
    processes log."""
    inputs = [t64(0.0, math.log(3.0)), t64(math.log(5.0), math.log(7.0))]
    ws0, ws1 = run_on_processes(lambda a, g: awr_weights(a, temperature=1.0, gather=g), inputs)
    assert ws0.weights.tolist() == pytest.approx([0.25, 0.75])
    assert ws1.weights.tolist() == pytest.approx([1.25, 1.75])
    for ws in (ws0, ws1):
        assert ws.mean == pytest.approx(1.0)
        assert ws.max == pytest.approx(1.75)
        assert ws.capped_fraction == 0.0


def test_awr_weights_gathered_capped_fraction_counts_all_processes():
    """As above with cap 1.5: normalised [0.25, 0.75 | 1.25, 1.75] -> only process 1's 1.75 is capped:
    capped fraction 1/4 over the global batch on both processes, max 1.5, logged mean (0.25+0.75+1.25+1.5)/4
    = 0.9375."""
    inputs = [t64(0.0, math.log(3.0)), t64(math.log(5.0), math.log(7.0))]
    ws0, ws1 = run_on_processes(lambda a, g: awr_weights(a, temperature=1.0, weight_cap=1.5, gather=g), inputs)
    assert ws0.weights.tolist() == pytest.approx([0.25, 0.75])
    assert ws1.weights.tolist() == pytest.approx([1.25, 1.5])
    for ws in (ws0, ws1):
        assert ws.capped_fraction == pytest.approx(0.25)
        assert ws.max == pytest.approx(1.5)
        assert ws.mean == pytest.approx(0.9375)


def test_upo_weights_end_to_end_two_processes_batch_baseline():
    """Advantages then weights on two processes with the batch baseline, chosen only, tau 1: chosen rewards
    [0, ln 3] and [ln 5, ln 7]. The baseline cancels, so the weights are 4 * softmax over the global rewards:
    exp [1, 3, 5, 7] / 4 = [0.25, 0.75, 1.25, 1.75]."""

    def step(r, g):
        adv = advantages(r, torch.zeros_like(r), baseline="batch", gather=g)
        return awr_weights(adv, temperature=1.0, gather=g).weights

    w0, w1 = run_on_processes(step, [t64(0.0, math.log(3.0)), t64(math.log(5.0), math.log(7.0))])
    assert torch.cat([w0, w1]).tolist() == pytest.approx([0.25, 0.75, 1.25, 1.75])


def test_awr_weights_mean_one_random_batch():
    """For any advantages, normalised weights average exactly 1 over the batch (when nothing is capped)."""
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(16, generator=g, dtype=torch.float64)
    ws = awr_weights(adv, temperature=0.25, weight_cap=1e9)
    assert float(ws.weights.mean()) == pytest.approx(1.0, rel=1e-12)
    assert ws.mean == pytest.approx(1.0, rel=1e-12)


def test_awr_weights_batch_baseline_is_scaled_softmax():
    """With the batch baseline, A = r - mean(r) and exp(A/tau) / mean(exp(A/tau)) = exp(r/tau) / mean(exp(r/tau))
    = B * softmax(r / tau): the baseline cancels. Also equal to the weights with no baseline, or with all rewards
    shifted by +17. r = [0.3, -1.2, 2.0, 0.5], tau 0.25, B 4."""
    r = t64(0.3, -1.2, 2.0, 0.5)
    tau = 0.25
    expected = 4 * torch.softmax(r / tau, dim=0)
    adv_batch = advantages(r, torch.zeros(4, dtype=torch.float64), baseline="batch")
    adv_none = advantages(r, torch.zeros(4, dtype=torch.float64), baseline="none")
    w_batch = awr_weights(adv_batch, temperature=tau, weight_cap=1e9).weights
    w_none = awr_weights(adv_none, temperature=tau, weight_cap=1e9).weights
    w_shift = awr_weights(adv_none + 17.0, temperature=tau, weight_cap=1e9).weights
    torch.testing.assert_close(w_batch, expected)
    torch.testing.assert_close(w_none, expected)
    torch.testing.assert_close(w_shift, expected)


def test_awr_weights_pair_baseline_does_not_cancel():
    """r_chosen [1, 1], r_rejected [0, 2], tau 1. Batch baseline: equal chosen rewards -> weights [1, 1].
    Pair baseline: A = [1 - 0.5, 1 - 1.5] = [0.5, -0.5] -> exp [e^.5, e^-.5] / cosh(.5) = [2 sigmoid(1),
    2 sigmoid(-1)] = [1.4621, 0.5379]: the rejected response's reward matters."""
    rc, rr = t64(1.0, 1.0), t64(0.0, 2.0)
    w_batch = awr_weights(advantages(rc, rr, baseline="batch"), temperature=1.0).weights
    w_pair = awr_weights(advantages(rc, rr, baseline="pair"), temperature=1.0).weights
    assert w_batch.tolist() == pytest.approx([1.0, 1.0])
    s1 = 1.0 / (1.0 + math.exp(-1.0))
    assert w_pair.tolist() == pytest.approx([2 * s1, 2 * (1 - s1)])
    assert w_pair.tolist() == pytest.approx([1.4621171, 0.5378829])


def test_awr_weights_unnormalised():
    """normalize=False: omega = exp(A / tau) alone. A [0, ln 3], tau 1 -> [1, 3] (mean 2, not 1).
    A [ln 2], tau 0.5 -> exp(2 ln 2) = 4."""
    ws = awr_weights(t64(0.0, math.log(3.0)), temperature=1.0, normalize=False)
    assert ws.weights.tolist() == pytest.approx([1.0, 3.0])
    assert ws.mean == pytest.approx(2.0)
    assert awr_weights(t64(math.log(2.0)), temperature=0.5, normalize=False).weights.tolist() == pytest.approx([4.0])


def test_awr_weights_unnormalised_capped_at_e8():
    """The spec's measured failure: unnormalised, A = 2 at tau 0.25 gives e^8 = 2981 -> capped at 100; with A 0
    -> e^0 = 1. Capped fraction 1/2."""
    ws = awr_weights(t64(2.0, 0.0), temperature=0.25, normalize=False)
    assert ws.weights.tolist() == pytest.approx([100.0, 1.0])
    assert ws.capped_fraction == pytest.approx(0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_awr_weights_no_overflow_for_large_advantages(dtype):
    """A [1000, 0], tau 0.01 -> A/tau [1e5, 0]; exp(1e5) overflows, but in log space
    log mean = 1e5 - ln 2, so omega = [exp(ln 2), exp(-1e5 + ln 2)] = [2, 0]: finite."""
    ws = awr_weights(torch.tensor([1000.0, 0.0], dtype=dtype), temperature=0.01)
    assert ws.weights.dtype == dtype
    assert torch.isfinite(ws.weights).all()
    assert ws.weights.float().tolist() == pytest.approx([2.0, 0.0])
    assert ws.mean == pytest.approx(1.0)
    # all equal and huge: every weight is exactly 1
    ws = awr_weights(torch.full((3,), 5000.0, dtype=dtype), temperature=0.001)
    assert ws.weights.float().tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_awr_weights_no_gradient():
    """The weights are constants for the optimiser: no graph back to the advantages."""
    adv = t64(0.1, -0.3, 0.7).requires_grad_(True)
    ws = awr_weights(adv * 2.0, temperature=0.5)
    assert not ws.weights.requires_grad
    assert ws.weights.grad_fn is None


@pytest.mark.parametrize("tau", [0.0, -0.25, float("nan")])
def test_awr_weights_rejects_bad_temperature(tau):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        awr_weights(t64(0.0, 1.0), temperature=tau)


# ------------------------------------------------------------------------------------------------------------------
# sequence_loglik
# ------------------------------------------------------------------------------------------------------------------


def test_sequence_loglik_hand_example():
    """logps [[-1, -2, -3]], mask [[0, 1, 1]] -> sum -2 - 3 = -5; mean -5 / 2 = -2.5."""
    logps = torch.tensor([[-1.0, -2.0, -3.0]])
    mask = torch.tensor([[0, 1, 1]])
    assert sequence_loglik(logps, mask, "sum").tolist() == [-5.0]
    assert sequence_loglik(logps, mask, "mean").tolist() == [-2.5]
    assert sequence_loglik(logps, mask).tolist() == [-2.5]  # mean is the default


def test_sequence_loglik_rows_and_bool_mask():
    """Two rows: [-1, -2, -3] fully masked in -> sum -6, mean -2; [-4, -5, -6] with only the last token ->
    sum -6, mean -6. Same sums, different means: the mean normalises by each response's own length."""
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[True, True, True], [False, False, True]])
    assert sequence_loglik(logps, mask, "sum").tolist() == [-6.0, -6.0]
    assert sequence_loglik(logps, mask, "mean").tolist() == [-2.0, -6.0]


def test_sequence_loglik_empty_completion_clamps_length_to_one():
    """An all-zero mask: sum 0, mean 0 / max(0, 1) = 0 (no NaN from 0/0)."""
    logps = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    mask = torch.tensor([[0, 0], [1, 1]])
    out = sequence_loglik(logps, mask, "mean")
    assert out.tolist() == [0.0, -3.5]
    assert torch.isfinite(out).all()


def test_sequence_loglik_gradient_is_mask_over_length():
    """d mean / d logps = mask / |y|: mask [[0, 1, 1, 1]] -> [[0, 1/3, 1/3, 1/3]]; for sum, the mask itself."""
    logps = torch.tensor([[-1.0, -2.0, -3.0, -4.0]], requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 1]])
    sequence_loglik(logps, mask, "mean").sum().backward()
    assert logps.grad.tolist()[0] == pytest.approx([0.0, 1 / 3, 1 / 3, 1 / 3])
    logps.grad = None
    sequence_loglik(logps, mask, "sum").sum().backward()
    assert logps.grad.tolist() == [[0.0, 1.0, 1.0, 1.0]]


def test_sequence_loglik_bad_reduction():
    with pytest.raises(ValueError, match="loglik reduction 'max'"):
        sequence_loglik(torch.zeros(1, 2), torch.ones(1, 2), "max")


# ------------------------------------------------------------------------------------------------------------------
# awr_loss
# ------------------------------------------------------------------------------------------------------------------


def test_awr_loss_value_and_gradient():
    """Eq. (7): omega [0.5, 1.5], loglik [-2, -4] -> -(0.5 * -2 + 1.5 * -4) / 2 = 3.5.
    d L / d loglik = -omega / N = [-0.25, -0.75]."""
    w = t64(0.5, 1.5)
    ll = t64(-2.0, -4.0).requires_grad_(True)
    loss = awr_loss(w, ll)
    assert loss.item() == pytest.approx(3.5)
    loss.backward()
    assert ll.grad.tolist() == pytest.approx([-0.25, -0.75])


def test_awr_loss_gradient_random_and_weights_get_none():
    """For random omega and loglik, grad = -omega / N exactly, and no gradient reaches the weights even if they
    require grad (they are detached)."""
    g = torch.Generator().manual_seed(1)
    w = torch.rand(5, generator=g).requires_grad_(True)
    ll = (-torch.rand(5, generator=g)).requires_grad_(True)
    awr_loss(w, ll).backward()
    torch.testing.assert_close(ll.grad, -w.detach() / 5)
    assert w.grad is None


def test_awr_loss_keeps_loglik_dtype_and_checks_shapes():
    """float64 weights with a float32 loglik -> a float32 loss; mismatched shapes are an error."""
    loss = awr_loss(t64(1.0, 1.0), torch.tensor([-1.0, -3.0]))
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="must match"):
        awr_loss(t64(1.0, 1.0), torch.tensor([-1.0, -3.0, -2.0]))


# ------------------------------------------------------------------------------------------------------------------
# margin_correction
# ------------------------------------------------------------------------------------------------------------------


def test_margin_correction_alpha_zero_is_exactly_zero():
    """alpha = 0: -log sigmoid(beta d) + log sigmoid(beta d) = 0, bit-for-bit (so margin mode with alpha 0 is DPO)."""
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(7, generator=g) * 5
    m = torch.randn(7, generator=g)
    out = margin_correction(delta, m, beta=0.1, alpha=0.0)
    assert float(out) == 0.0


def test_margin_correction_hand_log2():
    """delta 0, m 1, beta 1, alpha ln 3 -> -log sigmoid(-ln 3) + log sigmoid(0) = log(1 + 3) - log 2 = log 2."""
    out = margin_correction(torch.tensor([0.0]), torch.tensor([1.0]), beta=1.0, alpha=math.log(3.0))
    assert float(out) == pytest.approx(math.log(2.0))


def test_margin_correction_hand_second_example():
    """delta 10, beta 0.1 (beta * delta = 1), m 1, alpha 1: -log sigmoid(0) + log sigmoid(1)
    = log 2 - log(1 + e^-1) = 0.693147 - 0.313262 = 0.379885."""
    out = margin_correction(torch.tensor([10.0]), torch.tensor([1.0]), beta=0.1, alpha=1.0)
    assert float(out) == pytest.approx(0.379885, abs=1e-6)


def test_margin_correction_matches_formula_and_completes_sigmoid_loss():
    """On random values: equals mean(-logsigmoid(beta d - alpha m) + logsigmoid(beta d)); added to TRL's sigmoid
    loss mean(-logsigmoid(beta d)) it gives the MODPO-style loss mean(-logsigmoid(beta d - alpha m))."""
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(6, generator=g, dtype=torch.float64) * 3
    m = torch.randn(6, generator=g, dtype=torch.float64)
    beta, alpha = 0.2, 1.7
    out = margin_correction(delta, m, beta=beta, alpha=alpha)
    expected = (-F.logsigmoid(beta * delta - alpha * m) + F.logsigmoid(beta * delta)).mean()
    torch.testing.assert_close(out, expected)
    dpo = (-F.logsigmoid(beta * delta)).mean()
    torch.testing.assert_close(dpo + out, (-F.logsigmoid(beta * delta - alpha * m)).mean())


def test_margin_correction_gradients():
    """The margin is a constant: no gradient reaches the rewards. For delta, d/dx[-logsigmoid(x)] = sigmoid(x) - 1,
    so d/d delta of the correction is beta * (sigmoid(beta d - alpha m) - sigmoid(beta d)) / N.
    With d 0, m 1, beta 1, alpha ln 3: sigmoid(-ln 3) - sigmoid(0) = 1/4 - 1/2 = -0.25."""
    delta = torch.tensor([0.0], requires_grad=True)
    m = torch.tensor([1.0], requires_grad=True)
    margin_correction(delta, m, beta=1.0, alpha=math.log(3.0)).backward()
    assert delta.grad.tolist() == pytest.approx([-0.25])
    assert m.grad is None


def test_unpaired_awr_term_hand_example():
    """docs/kto.md: one process, r_aux [0, ln 3, 5], the first two selected, tau 1, loglik [-1, -2, -9]: weights
    [0.5, 1.5] on the selected rows, L_aux = (0.5 * 1 + 1.5 * 2) / 2 = 1.75; the unselected row gets no gradient."""
    import math

    import torch

    from trl_upo.objective import unpaired_awr_term

    r = torch.tensor([0.0, math.log(3), 5.0], dtype=torch.float64)
    ll = torch.tensor([-1.0, -2.0, -9.0], requires_grad=True)
    term = unpaired_awr_term(r, torch.tensor([True, True, False]), ll, local=slice(0, 3), all_loglik=ll.detach(),
                             temperature=1.0)
    assert float(term.loss.detach()) == pytest.approx(1.75)
    assert float(term.stats["aux_loss"]) == pytest.approx(1.75)
    term.loss.backward()
    assert ll.grad.tolist() == pytest.approx([-0.25, -0.75, 0.0])
    # Two processes holding rows 0-1 and 2: process 0's share is P/N * its weighted sum = 2/2 * 3.5; process 1 has
    # no selected row and contributes 0; their mean is the one-process loss.
    local0 = unpaired_awr_term(r, torch.tensor([True, True, False]), ll[:2], local=slice(0, 2),
                               all_loglik=ll.detach(), num_processes=2, temperature=1.0)
    local1 = unpaired_awr_term(r, torch.tensor([True, True, False]), ll[2:], local=slice(2, 3),
                               all_loglik=ll.detach(), num_processes=2, temperature=1.0)
    assert (float(local0.loss.detach()) + float(local1.loss.detach())) / 2 == pytest.approx(1.75)
    # No selected row anywhere: a zero that keeps the graph.
    empty = unpaired_awr_term(r, torch.zeros(3, dtype=torch.bool), ll, local=slice(0, 3), all_loglik=ll.detach())
    assert float(empty.loss.detach()) == 0.0 and empty.loss.requires_grad
