"""eq. 5 fits on synthetic curves: s0 recovered, CI covers it, no PTP invented, collapsed points
censored (not dropped), per-point SEs widen the interval, open interval ends are flagged, the
near-lossless limit is found where the curve leaves dense × (1 + delta), bad input refused with a fix."""

import math

import numpy as np
import pandas as pd
import pytest

from mpt_utils.errors import MPTError
from mpt_utils.ptp import (
    LLAMA2_7B_DENSE_PPL,
    NEAR_LOSSLESS_REL,
    bits_to_ratio,
    fit_ptp,
    knee_vs_limit,
    near_lossless_limit,
    ptp_table,
    ratio_to_bits,
)

# gentle power law (3·s² + 5) then a collapse with β = 6, γ = 20, as in the paper's pictures
TRUE = {"A": 3.0, "alpha": 2.0, "B": 5.0, "beta": 6.0, "gamma": 20.0}


def eq5(s, s0, p=TRUE):
    s = np.asarray(s, dtype=float)
    at_s0 = p["A"] * s0 ** p["alpha"] + p["B"]
    d = s - s0
    return np.where(s <= s0, p["A"] * s ** p["alpha"] + p["B"], at_s0 * np.exp(p["beta"] * d + p["gamma"] * d * d))


def noisy(y, seed, sigma=0.01):
    """1% multiplicative noise: about twice the PPL standard errors printed in the seed's Table 5."""
    return y * np.exp(np.random.default_rng(seed).normal(0.0, sigma, np.shape(y)))


# each grid leaves at least three points past s0: with only two, the collapse branch fits them
# exactly and s0 is not identified within that last gap (the fit reports that as a flat profile)
@pytest.mark.parametrize("s0, n, lo, hi", [(0.35, 8, 0.1, 0.8), (0.55, 12, 0.05, 0.9), (0.65, 10, 0.05, 0.9)])
def test_recovers_s0_and_ci_covers_it(s0, n, lo, hi):
    x = np.linspace(lo, hi, n)
    fit = fit_ptp(x, noisy(eq5(x, s0), seed=0))
    assert fit.has_ptp, fit.verdict
    assert abs(fit.s0 - s0) < 0.02
    assert fit.s0_ci[0] <= s0 <= fit.s0_ci[1]
    assert fit.s0_ci[0] <= fit.s0 <= fit.s0_ci[1]
    assert fit.verdict.startswith("PTP at")
    assert fit.bic["piecewise"] < min(fit.bic["power"], fit.bic["exp"])
    assert set(fit.params) == {"A", "alpha", "B", "s0", "beta", "gamma"}
    assert fit.r2 > 0.99 and fit.n_points == n and fit.n_censored == 0 and not fit.censored.any()


@pytest.mark.parametrize("law", [lambda s: 5 + 30 * s ** 3, lambda s: np.exp(1.6 + 0.5 * s + 3 * s * s)],
                         ids=["power", "quadratic-exp"])
def test_smooth_laws_report_no_ptp(law):
    x = np.linspace(0.1, 0.8, 10)
    fit = fit_ptp(x, noisy(law(x), seed=0))
    assert not fit.has_ptp
    assert "no PTP in range" in fit.verdict
    assert fit.model in ("power", "exp")
    assert np.all(np.isfinite(fit.predict(x)))


@pytest.mark.parametrize("s0, n, n_gone, gone", [(0.35, 8, 2, np.inf), (0.35, 8, 3, np.inf), (0.35, 8, 2, np.nan),
                                                  (0.55, 12, 3, np.inf), (0.55, 12, 2, 1e30)],
                         ids=["8pt-2inf", "8pt-3inf", "8pt-2nan", "12pt-3inf", "12pt-2overflow"])
def test_collapsed_tail_is_censored_and_the_ptp_survives(s0, n, n_gone, gone):
    x = np.linspace(0.1, 0.8, n) if n == 8 else np.linspace(0.05, 0.9, n)
    y = noisy(eq5(x, s0), seed=0)
    y[-n_gone:] = gone
    fit = fit_ptp(x, y)
    assert fit.has_ptp, fit.verdict
    assert abs(fit.s0 - s0) < 0.03
    assert fit.s0_ci[0] <= s0 <= fit.s0_ci[1]
    assert fit.n_points == n and fit.n_censored == n_gone and fit.censored[-n_gone:].all()
    # the bound: twice the largest finite PPL, and it is what the censored points were fitted to
    assert fit.censor_bound == pytest.approx(2 * y[:-n_gone].max())
    assert np.allclose(fit.y[fit.censored], fit.censor_bound)
    assert f"{n_gone} collapsed point(s) censored" in fit.verdict
    # a censored point costs nothing once the model clears its bound: the fit goes through or above
    assert np.all(fit.predict(x[-n_gone:]) >= fit.censor_bound * (1 - 1e-3))


def test_flat_curve_that_jumps_to_inf_has_its_ptp_between_last_finite_and_first_inf():
    x = np.linspace(0.1, 0.8, 8)
    y = np.full(x.size, 5.0)
    y[-2:] = np.inf  # finite up to 0.6, collapsed from 0.7
    fit = fit_ptp(x, y)
    assert fit.has_ptp, fit.verdict
    assert 0.6 <= fit.s0 < 0.7
    # nothing finite shows where in that gap the collapse starts: the fit says so
    assert fit.s0_flat is not None and fit.s0_flat[0] == pytest.approx(0.6) and fit.s0_flat[1] < 0.7
    # dropping the collapsed points instead would leave a plateau: no PTP, the information is lost
    assert not fit_ptp(x[:-2], noisy(y[:-2], seed=0)).has_ptp


@pytest.mark.parametrize("seed", range(4))
def test_noisy_flat_curve_that_jumps_to_inf(seed):
    x = np.linspace(0.1, 0.8, 8)
    y = noisy(np.full(x.size, 5.0), seed=seed)
    y[-2:] = np.inf
    fit = fit_ptp(x, y)
    assert fit.has_ptp, fit.verdict
    assert 0.6 <= fit.s0 < 0.7 and fit.s0_ci[0] < 0.6 and fit.s0_ci[1] >= 0.69
    # only lower bounds hold the branch past 0.6: it must still rise, not overshoot and come back down
    assert np.all(np.diff(fit.predict(np.linspace(fit.s0, 0.8, 50))) >= 0)


def test_duplicate_ratios_are_replicates():
    x = np.linspace(0.1, 0.8, 8)
    xx = np.repeat(x, 2)  # two seeds per ratio
    yy = noisy(eq5(xx, 0.35), seed=3)
    fit = fit_ptp(xx, yy)
    assert fit.n_points == 16 and fit.has_ptp and abs(fit.s0 - 0.35) < 0.02
    # replicates count as points (one residual each), but three ratios are still too few for any law
    short = fit_ptp(np.repeat(x[:2], 3), noisy(eq5(np.repeat(x[:2], 3), 0.35), seed=3))
    assert short.verdict.startswith("too few points") and "2 distinct" in short.verdict


def test_too_few_points_claims_nothing():
    fit = fit_ptp([0.1, 0.3, 0.5, 0.7], [5.0, 5.5, 7.0, 30.0])
    assert not fit.has_ptp and fit.verdict.startswith("too few points")
    assert fit.model == "none" and np.isnan(fit.predict(0.2)).all()
    assert fit_ptp([0.1, 0.2], [5.0, 6.0]).verdict.startswith("too few points")
    short = fit_ptp([0.1, 0.3, 0.5, 0.7], [5.0, 5.5, 7.0, np.inf])  # censored points count as points
    assert short.n_censored == 1 and short.verdict.startswith("too few points") and "censored" in short.verdict


def test_bits_axis_converts_against_fp16():
    assert bits_to_ratio(16) == 0.0 and bits_to_ratio(4) == 0.75 and ratio_to_bits(0.8125) == 3.0
    bits = np.array([16, 12, 10, 8, 7, 6, 5, 4.5, 4, 3.5, 3, 2.5, 2])
    y = noisy(eq5(bits_to_ratio(bits), bits_to_ratio(3.8)), seed=0)  # PTP at 3.8 bits
    fit = fit_ptp(bits, y, axis="bits")
    assert fit.axis == "bits" and fit.has_ptp, fit.verdict
    assert abs(fit.ptp_bits - 3.8) < 0.02 * 16
    lo, hi = fit.ptp_bits_ci
    assert lo <= 3.8 <= hi and lo < hi
    assert "bits" in fit.verdict
    xs, ys = fit.curve(n=50, native=True)
    assert xs.shape == ys.shape == (50,) and xs.max() == pytest.approx(16) and xs.min() == pytest.approx(2)


def test_fit_is_continuous_at_s0_and_deterministic():
    x = np.linspace(0.1, 0.8, 8)
    y = noisy(eq5(x, 0.35), seed=1)
    fit = fit_ptp(x, y)
    left, right = fit.predict([fit.s0 - 1e-9, fit.s0 + 1e-9])
    assert left == pytest.approx(right, rel=1e-6)
    again = fit_ptp(x, y)
    assert again.s0 == fit.s0 and again.s0_ci == fit.s0_ci


X8 = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
Y8 = [5.0, 5.1, 5.3, 5.8, 7.0, 12.0, 40.0, 200.0]


@pytest.mark.parametrize("kwargs, match, fix", [
    (dict(x=[0.1, 0.2, 0.3], y=[1, 2, 3], axis="rank"), "unknown axis", "sparsity, bits"),
    (dict(x=[0.1, 0.2, 0.3], y=[1, 2]), "x has 3 values but y has 2", "one y per x"),
    (dict(x=[], y=[]), "no points", "eq. 5 needs at least 7"),
    (dict(x=X8[:-1] + [1.2], y=Y8), r"x\[7\]=1.2 is outside \[0, 1\) on the sparsity axis", "in [0, 1)"),
    (dict(x=X8[:-1] + [1.0], y=Y8), r"x\[7\]=1 is outside \[0, 1\)", "in [0, 1)"),
    (dict(x=[-0.1] + X8[1:], y=Y8), "outside", "in [0, 1)"),
    (dict(x=[16, 8, 6, 5, 4, 3, 2, 1], y=Y8), "outside", "look like bit widths: pass axis='bits'"),
    (dict(x=[16, 8, 6, 5, 4, 3, 2, 0], y=Y8, axis="bits"), "bits per weight is not positive", "bit widths > 0"),
    (dict(x=[16, 8, 4], y=[5, 6, 9], axis="bits", baseline_bits=0), "baseline_bits", "16"),
    (dict(x=X8[:-1] + [np.nan], y=Y8), r"x\[7\]=nan is not a finite number", "ratio or bit width is unknown"),
    (dict(x=X8, y=Y8[:-1] + [0.0]), "is not a positive perplexity", "inf or NaN, not 0"),
    (dict(x=X8, y=[-5.0] + Y8[1:]), "is not a positive perplexity", "inf or NaN, not 0"),
    (dict(x=X8, y=[np.inf] * 8), "all 8 points collapsed", "finite points at lower compression"),
    (dict(x=[0.5] * 8, y=Y8), "sit at one compression ratio", "several compression ratios"),
    (dict(x=X8, y=["a"] * 8), "y is not a sequence of numbers", "as numbers"),
    (dict(x=X8, y=Y8, min_post=0), "must be ≥ 1", "defaults"),
    (dict(x=X8, y=Y8, censor_factor=0.5), "censor_factor", "≥ 1"),
    (dict(x=X8, y=Y8, ci="wald"), "unknown ci method", "'f' or 'chi2'"),
])
def test_bad_input_is_one_clear_error_with_a_fix(kwargs, match, fix):
    with pytest.raises(MPTError, match=match) as err:
        fit_ptp(**kwargs)
    assert fix in err.value.fix


def test_bits_above_the_baseline_count_as_uncompressed():
    bits = np.array([16.01, 8, 6, 5, 4, 3.5, 3, 2.5, 2])  # an F16 file with F32 norms: 16.01 bits/weight
    fit = fit_ptp(bits, noisy(eq5(bits_to_ratio(bits), bits_to_ratio(3.8)), seed=0), axis="bits")
    assert fit.s.min() < 0 and np.isfinite(fit.rss)


def test_ptp_table_compares_with_claims():
    x = np.linspace(0.1, 0.8, 8)
    curves = {"unstructured": [("synthetic", x, noisy(eq5(x, 0.35), seed=0))]}
    claims = pd.DataFrame([{"family": "unstructured", "method": "*", "axis": "sparsity", "lo": 0.30, "hi": 0.40},
                           {"family": "other", "method": "*", "axis": "sparsity", "lo": 0.6, "hi": 0.7}])
    table = ptp_table(curves, claims)
    row = table.iloc[0]
    assert row["censored"] == 0
    assert row["agreement"] == "agrees" and row["claim"] == "0.3–0.4" and math.isclose(row["ptp"], row["s0"])
    claims.loc[0, ["lo", "hi"]] = [0.5, 0.6]
    assert ptp_table(curves, claims).iloc[0]["agreement"].startswith("disagrees: PTP earlier")


# ---------------------------------------------------------------------------------------------- SEs


def _width(fit):
    return fit.s0_ci[1] - fit.s0_ci[0]


def test_zero_standard_errors_give_the_unweighted_fit():
    x = np.linspace(0.1, 0.8, 8)
    y = noisy(eq5(x, 0.35), seed=1)
    plain, zero = fit_ptp(x, y), fit_ptp(x, y, y_se=np.zeros(x.size))
    assert zero.weighted and not plain.weighted
    assert zero.s0 == pytest.approx(plain.s0, abs=1e-6)
    assert zero.s0_ci == pytest.approx(plain.s0_ci, abs=1e-6)
    # the same model comparison, up to a constant shared by all models
    assert zero.delta_bic == pytest.approx(plain.delta_bic, abs=1e-6)
    assert "weighted by per-point SEs" in zero.verdict and "weighted" not in plain.verdict


def test_interval_widens_as_the_standard_errors_grow():
    x = np.linspace(0.05, 0.9, 12)
    y = noisy(eq5(x, 0.55), seed=2)
    widths = []
    for rel in (0.0, 0.02, 0.05, 0.1):
        fit = fit_ptp(x, y, y_se=rel * y)
        assert fit.has_ptp and abs(fit.s0 - 0.55) < 0.03, fit.verdict
        assert fit.s0_ci[0] <= 0.55 <= fit.s0_ci[1]
        widths.append(_width(fit))
    assert widths == sorted(widths) and widths[-1] > 2 * widths[0]


def test_noisier_measurements_with_their_ses_give_wider_intervals():
    x = np.linspace(0.05, 0.9, 12)
    truth = eq5(x, 0.55)
    width = {}
    for sigma in (0.01, 0.05):
        fits = [fit_ptp(x, y, y_se=sigma * y) for y in (noisy(truth, seed, sigma) for seed in range(3))]
        assert all(f.s0_ci[0] <= 0.55 <= f.s0_ci[1] for f in fits)
        width[sigma] = np.mean([_width(f) for f in fits])
    assert width[0.05] > 2 * width[0.01]


def test_a_point_with_a_large_se_pulls_the_fit_less():
    x = np.linspace(0.1, 0.8, 8)
    y = eq5(x, 0.35)
    y[3] *= 1.4  # 0.4, just past the knee, measured badly
    se = 0.005 * y
    se[3] = 0.4 * y[3]
    plain, weighted = fit_ptp(x, y), fit_ptp(x, y, y_se=se)
    assert abs(weighted.s0 - 0.35) < 0.01 < abs(plain.s0 - 0.35)


@pytest.mark.parametrize("y_se, match", [([0.1] * 7, "y_se has 7 values"), ([0.1] * 7 + [-0.1], r"y_se\[7\]=-0.1"),
                                         ([0.1] * 7 + [np.inf], r"y_se\[7\]=inf")])
def test_bad_standard_errors_are_refused(y_se, match):
    with pytest.raises(MPTError, match=match) as err:
        fit_ptp(X8, Y8, y_se=y_se)
    assert err.value.fix


def test_unknown_se_counts_as_zero_and_collapsed_points_ignore_theirs():
    x = np.linspace(0.1, 0.8, 8)
    y = noisy(eq5(x, 0.35), seed=0)
    y[-1] = np.inf
    fit = fit_ptp(x, y, y_se=[np.nan] + [0.0] * 6 + [np.nan])
    assert fit.has_ptp and np.all(fit.y_se == 0.0)
    with pytest.raises(MPTError, match="zero variance"):
        fit_ptp(x, y, y_se=np.zeros(8), noise_floor=0.0)


# ------------------------------------------------------------------------------- open-ended intervals


def test_interval_touching_the_first_admissible_s0_is_open_ended():
    x = np.linspace(0.1, 0.8, 8)  # s0 needs 2 points before it: the grid starts at 0.2
    fit = fit_ptp(x, noisy(eq5(x, 0.22), seed=0))
    assert fit.has_ptp and fit.s0_ci[0] == pytest.approx(0.2)
    assert fit.ci_low_open and not fit.ci_high_open
    assert fit.s0_ci_text.startswith("≤0.200–") and "≥" not in fit.s0_ci_text
    assert "95% CI ≤0.200–" in fit.verdict


def test_interval_touching_the_last_admissible_s0_is_open_ended():
    x = np.linspace(0.1, 0.8, 8)  # and 2 points after it: the grid ends just below 0.7
    fit = fit_ptp(x, noisy(eq5(x, 0.65), seed=0))
    assert fit.has_ptp and fit.ci_high_open and not fit.ci_low_open
    assert fit.s0_ci_text.endswith("–≥0.700")
    closed = fit_ptp(x, noisy(eq5(x, 0.35), seed=0))
    assert not (closed.ci_low_open or closed.ci_high_open) and "≤" not in closed.s0_ci_text


def test_open_ends_on_the_bit_axis_swap_sides():
    bits = np.array([16, 8, 6, 5, 4, 3, 2])
    y = np.array([9.66, 9.66, 9.68, 9.7, 10.01, 10.61, 14.63])  # Table 5, Qwen2.5-1.5B
    fit = fit_ptp(bits, y, axis="bits")
    assert fit.has_ptp and fit.ci_low_open and fit.ci_high_open
    # a high ratio reaching the grid's end means "this many bits or fewer"
    assert fit.ptp_ci_text == "≤3.00–≥8.00 bits"


def test_ptp_table_shows_open_ends():
    x = np.linspace(0.1, 0.8, 8)
    curves = {"unstructured": [("early", x, noisy(eq5(x, 0.22), seed=0)), ("mid", x, noisy(eq5(x, 0.35), seed=0))]}
    claims = pd.DataFrame([{"family": "unstructured", "method": "*", "axis": "sparsity", "lo": 0.3, "hi": 0.4}])
    table = ptp_table(curves, claims).set_index("curve")
    assert table.loc["early", "ci_low_open"] and table.loc["early", "s0_ci"].startswith("≤0.200")
    assert table.loc["early", "ptp_ci"] == table.loc["early", "s0_ci"]
    assert not table.loc["mid", "ci_low_open"] and not table.loc["mid", "ci_high_open"]


# ----------------------------------------------------------------------------- near-lossless limit


def test_default_tolerance_is_the_perspectives_1_5_ppl_on_llama2_7b():
    assert NEAR_LOSSLESS_REL == pytest.approx(1.5 / 5.47) and LLAMA2_7B_DENSE_PPL == 5.47
    x = np.linspace(0.1, 0.8, 8)
    y = 5.47 * np.exp(x)  # log-linear: interpolation is exact
    rel = near_lossless_limit(x, y, 5.47)
    ab = near_lossless_limit(x, y, 5.47, delta=1.5, absolute=True)
    assert rel.threshold == pytest.approx(6.97) and ab.threshold == pytest.approx(6.97)
    assert rel.limit == pytest.approx(math.log(6.97 / 5.47)) and ab.limit == pytest.approx(rel.limit)
    # on another model the relative rule scales with dense, the absolute one does not
    rel20 = near_lossless_limit(x, 4 * y, 4 * 5.47)
    ab20 = near_lossless_limit(x, 4 * y, 4 * 5.47, delta=1.5, absolute=True)
    assert rel20.limit == pytest.approx(rel.limit) and ab20.limit < rel20.limit
    assert ab20.threshold == pytest.approx(4 * 5.47 + 1.5)


def test_limit_interpolates_log_ppl_between_points_and_is_the_first_crossing():
    x = [0.1, 0.2, 0.3, 0.4, 0.5]
    y = [5.0, 5.5, 8.0, 5.2, 5.3]  # a noisy dip back below the threshold does not extend the limit
    lim = near_lossless_limit(x, y, 5.0, delta=0.3)  # threshold 6.5
    expect = 0.2 + 0.1 * math.log(6.5 / 5.5) / math.log(8.0 / 5.5)
    assert lim.limit == pytest.approx(expect) and lim.bracket == (0.2, 0.3)
    assert lim.low == lim.high == lim.limit and not (lim.low_open or lim.high_open)
    assert lim.relative(0.3) == pytest.approx(8.0 / 5.0) and lim.relative(0.25) == pytest.approx(math.sqrt(8 * 5.5) / 5)


def test_limit_interval_comes_from_the_se_bands_and_widens_with_them():
    x = np.linspace(0.1, 0.8, 8)
    y = 5.0 * np.exp(x)
    widths = []
    for rel in (0.01, 0.03, 0.06):
        lim = near_lossless_limit(x, y, 5.0, y_se=rel * y)
        z = 1.959964
        # the upper band log y + z·se/y crosses first, the lower band last
        assert lim.low == pytest.approx(math.log(1 + NEAR_LOSSLESS_REL) - z * rel, abs=1e-9)
        assert lim.high == pytest.approx(math.log(1 + NEAR_LOSSLESS_REL) + z * rel, abs=1e-9)
        widths.append(lim.high - lim.low)
    assert widths == sorted(widths)


def test_limit_open_ended_when_the_curve_never_leaves_the_tolerance():
    bits = [16, 8, 6, 5, 4, 3, 2]
    y = [13.64, 13.7, 13.7, 13.93, 13.98, 14.25, 14.82]  # Table 5, Qwen2.5-0.5B
    lim = near_lossless_limit(bits, y, axis="bits")
    assert lim.dense == 13.64 and lim.dense_source == "uncompressed point"
    assert lim.high_open and lim.limit == pytest.approx(bits_to_ratio(2)) and lim.text() == "≤2.00 bits"
    x = np.linspace(0.1, 0.8, 8)
    flat = near_lossless_limit(x, np.full(8, 5.5), 5.47)
    assert flat.high_open and flat.text() == "≥0.800"


def test_limit_without_dense_uses_the_least_compressed_point_and_says_so():
    lim = near_lossless_limit([0.2, 0.4, 0.6], [6.0, 7.0, 12.0])
    assert lim.dense == 6.0 and "least-compressed point" in lim.dense_source
    assert lim.s[0] == 0.0  # anchored at ratio 0 by dense


def test_limit_next_to_a_collapse_is_the_last_point_within():
    lim = near_lossless_limit([0.1, 0.2, 0.3, 0.4], [5.0, 5.1, 5.2, np.inf], 5.0)
    assert lim.limit == pytest.approx(0.3) and lim.high == pytest.approx(0.4) and lim.bracket == (0.3, 0.4)


def test_downstream_limit_within_5_percent_of_dense():
    acc = [0.62, 0.615, 0.60, 0.57, 0.50]
    lim = near_lossless_limit([0.1, 0.2, 0.3, 0.4, 0.5], acc, 0.62, delta=0.05, higher_is_better=True)
    assert lim.threshold == pytest.approx(0.589)
    assert 0.3 < lim.limit < 0.4 and lim.relative(lim.limit) == pytest.approx(0.95)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dense_ppl=0.0), "dense_ppl"), (dict(dense_ppl=5.0, delta=-1), "delta"),
    (dict(dense_ppl=5.0, delta="x"), "delta"), (dict(dense_ppl=5.0, level=1.5), "level"),
    (dict(dense_ppl=0.6, delta=1.0, higher_is_better=True), "leaves no score"),
])
def test_bad_limit_input_is_one_clear_error(kwargs, match):
    with pytest.raises(MPTError, match=match) as err:
        near_lossless_limit(X8, Y8, **kwargs)
    assert err.value.fix


def test_knee_and_limit_disagree_when_ppl_at_the_knee_is_far_above_dense():
    x = np.linspace(0.1, 0.8, 8)
    early = {"A": 40.0, "alpha": 1.5, "B": 5.0, "beta": 8.0, "gamma": 10.0}  # drifts far before it bends
    y = noisy(eq5(x, 0.5, early), seed=0)
    fit, lim = fit_ptp(x, y), near_lossless_limit(x, y, 5.0)
    assert fit.has_ptp and lim.limit < fit.s0_ci[0]
    verdict = knee_vs_limit(fit, lim)
    assert verdict.startswith("limit before knee") and f"{lim.relative(fit.s0):.2f}× dense" in verdict
    assert lim.relative(fit.s0) > 3
    # the paper's gentle curve: the knee sits where PPL is still close to dense
    y = noisy(eq5(x, 0.35), seed=0)
    assert knee_vs_limit(fit_ptp(x, y), near_lossless_limit(x, y, 5.0)).startswith("agree")


def test_ptp_table_puts_the_limit_beside_the_knee():
    x = np.linspace(0.1, 0.8, 8)
    y = noisy(eq5(x, 0.35), seed=0)
    curves = {"unstructured": [("with se", x, y, 0.01 * y), ("no dense", x, y)]}
    claims = pd.DataFrame([{"family": "unstructured", "method": "*", "axis": "sparsity", "lo": 0.3, "hi": 0.4}])
    table = ptp_table(curves, claims, dense={"with se": 5.0}).set_index("curve")
    row = table.loc["with se"]
    assert row["dense"] == 5.0 and row["dense_source"] == "given"
    assert row["limit_low"] < row["limit"] < row["limit_high"]
    assert row["limit_text"].startswith(f"{row['limit']:.3f} (") and row["knee_vs_limit"].startswith("agree")
    assert row["knee_x_dense"] == pytest.approx(near_lossless_limit(x, y, 5.0).relative(row["s0"]))
    assert "least-compressed" in table.loc["no dense", "dense_source"]
    assert table.loc["no dense", "limit_low"] == table.loc["no dense", "limit_high"]


def test_ptp_table_without_any_curve_keeps_its_columns():
    # a sweep at one ratio has no curve to fit: the table is empty but its columns exist for the notebooks
    claims = pd.DataFrame([{"family": "unstructured", "method": "*", "axis": "sparsity", "lo": 0.55, "hi": 0.65}])
    table = ptp_table({"unstructured": []}, claims)
    assert table.empty
    assert {"curve", "s0", "has_ptp", "agreement", "knee_vs_limit"} <= set(table.columns)
