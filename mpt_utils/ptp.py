"""Phase Transition Point (PTP) fits: the Perspective's piecewise power-law / exponential law (eq. 5).

    L(s) = A·s^α + B                                      s ≤ s0   (gradual degradation)
    L(s) = (A·s0^α + B)·exp(β(s−s0) + γ(s−s0)²)           s > s0   (collapse)

The printed eq. 5 writes the second branch as A·s0^α·exp(...), without B. That breaks the C0
continuity the paper claims (L(s0⁻) = A·s0^α + B ≠ A·s0^α), so we use the continuous form above.

How the fit works:
- everything is fitted on log L, because PPL spans orders of magnitude and a collapse point would
  otherwise dominate the least squares;
- s0 is profiled: a grid scan between data points (at least `min_pre` points at or before s0 and
  `min_post` after it), each grid value fitting (A, α, B, β, γ) by Levenberg-Marquardt least squares
  (MINPACK via `scipy.optimize.leastsq`, analytic Jacobian, two starts), then a bounded 1-D
  refinement around the best grid value;
- α is kept in [0.1, 5]: a steeper "gradual" branch imitates the collapse itself and s0 is no longer
  identifiable; the collapse branch may only steepen the curve (β ≥ the power law's slope at s0);
- a per-point noise floor (0.5% of PPL, the standard errors printed in the seed's Tables 5-6) keeps a
  6-parameter fit of 7-8 points from claiming unbounded evidence; without it, smooth synthetic curves
  got a "PTP" in 30-50% of noisy draws;
- the 95% interval for s0 is a profile interval over s0: by default the small-sample F rule of
  nonlinear regression, (RSS(s0) − RSS_min)/(RSS_min/(n−6)) ≤ F(1, n−6); `ci="chi2"` gives the
  large-sample rule n·log(RSS(s0)/RSS_min) ≤ χ²₁, which undercovers on 8-13 points (see `_ci`).
  An interval that still holds at the first or last admissible s0 is flagged open-ended
  (`ci_low_open` / `ci_high_open`, shown as "≤" / "≥"): the grid, not the data, stopped it there;
- per-point standard errors (`y_se`, e.g. the perplexity evaluator's SE over windows) weight the fit
  in log space by 1/(se_log² + noise_floor²), se_log = se/PPL; the s0 interval is then never
  narrower than the known-variance profile interval, so it widens with the SEs (`fit_ptp`, `_ci`);
- the piecewise law must beat both a pure power law (A·s^α + B) and a pure quadratic exponential
  exp(a + βs + γs²) on BIC, by `min_delta_bic`, with s0 inside the data and a real collapse after it,
  before a PTP is reported. Otherwise the verdict is "no PTP in range": we never invent one;
- collapsed points (PPL inf, NaN, or an overflow ≥ `collapse_ppl`) are the strongest evidence of a
  transition, so they are kept as right-censored observations rather than dropped: the true log PPL
  there is only known to exceed a bound c = log(`censor_factor` × the largest finite PPL of the curve).
  Each censored point adds the one-sided residual min(f(s) − c, 0) to the least squares of every
  model (a hard-bound Tobit likelihood): no cost while the model predicts at or above c, a squared
  shortfall below it. The bound sits above the largest finite value (2× by default) because "at least
  the largest finite value" cannot tell a collapse from a plateau: a flat law would meet it for free.

Beside the knee, `near_lossless_limit` gives the Perspective's other safe bound: the largest ratio
whose measured PPL stays within ΔPPL ≈ 1.5 of dense (by default as a ratio, dense × (1 + 1.5/5.47)),
and `knee_vs_limit` says where the two disagree.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.optimize import brentq, leastsq, minimize_scalar
from scipy.stats import chi2, norm
from scipy.stats import f as f_dist

from mpt_utils.errors import MPTError

AXES = ("sparsity", "bits")
N_PARAMS = {"piecewise": 7, "power": 4, "exp": 4}  # fitted parameters + the noise variance
ALPHA_INITS = (0.5, 1.0, 2.0, 4.0)
# A finite PPL this large is an overflowing evaluation (NLL ≳ 14 nats/token, far worse than guessing
# uniformly over any vocabulary here, ≤ 256k), not a measurement: it is censored like inf and NaN.
COLLAPSE_PPL = 1e6
CENSOR_FACTOR = 2.0  # a collapsed point's PPL is taken to be at least this × the curve's largest finite PPL


def collapsed(y, collapse_ppl: float = COLLAPSE_PPL) -> np.ndarray:
    """Mask of collapsed points: PPL inf, NaN or ≥ `collapse_ppl` (what the fit censors, plots mark)."""
    y = np.asarray(y, dtype=float)
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(y) | (y >= collapse_ppl)


# ----------------------------------------------------------------------------------------------
# axis conversion
# ----------------------------------------------------------------------------------------------

def bits_to_ratio(bits, baseline_bits: float = 16.0) -> np.ndarray:
    """Compression ratio of `bits` per weight against the FP16 (or `baseline_bits`) baseline."""
    return 1.0 - np.asarray(bits, dtype=float) / baseline_bits


def ratio_to_bits(s, baseline_bits: float = 16.0) -> np.ndarray:
    return baseline_bits * (1.0 - np.asarray(s, dtype=float))


# ----------------------------------------------------------------------------------------------
# the three models, on log L
# ----------------------------------------------------------------------------------------------

def _log_s(s: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(np.maximum(s, 0.0))  # log 0 = -inf, so A·0^α = 0 below


def _log_power(theta: Sequence[float], s: np.ndarray) -> np.ndarray:
    """log(A·s^α + B), parametrized by (log A, α, log B) so A, B stay positive."""
    log_a, alpha, log_b = theta
    return np.logaddexp(log_a + alpha * _log_s(s), log_b)


def _log_piecewise(theta: Sequence[float], s: np.ndarray, s0: float) -> np.ndarray:
    log_a, alpha, log_b, beta, gamma = theta
    pre = _log_power((log_a, alpha, log_b), s)
    at_s0 = _log_power((log_a, alpha, log_b), np.array([s0]))[0]
    d = s - s0
    return np.where(s <= s0, pre, at_s0 + beta * d + gamma * d * d)


def _log_exp(theta: Sequence[float], s: np.ndarray) -> np.ndarray:
    a, beta, gamma = theta
    return a + beta * s + gamma * s * s


# ----------------------------------------------------------------------------------------------
# fitting pieces
# ----------------------------------------------------------------------------------------------

def _power_init(s: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """A cheap start for (log A, α, log B): linear LS of L ≈ A·s^α + B for a few α, relative errors."""
    target = np.exp(y)
    best, best_err = (math.log(1e-6), 1.0, float(np.min(y))), math.inf
    for alpha in ALPHA_INITS:
        design = np.column_stack([np.maximum(s, 0.0) ** alpha, np.ones_like(s)]) / target[:, None]
        (a, b), *_ = np.linalg.lstsq(design, np.ones_like(s), rcond=None)
        a, b = max(a, 1e-6), max(b, 1e-6 * float(np.min(target)))
        theta = (math.log(a), alpha, math.log(b))
        err = float(np.sum((_log_power(theta, s) - y) ** 2))
        if err < best_err:
            best, best_err = theta, err
    return best


def _alpha(u: float, bounds: tuple[float, float]) -> tuple[float, float]:
    """α = lo + (hi − lo)·sigmoid(u) keeps α in its bounds without a bounded solver (lm is ~10× faster)."""
    sig = 0.5 * (1.0 + math.tanh(0.5 * u))
    return bounds[0] + (bounds[1] - bounds[0]) * sig, (bounds[1] - bounds[0]) * sig * (1.0 - sig)


def _alpha_inverse(alpha: float, bounds: tuple[float, float]) -> float:
    p = min(max((alpha - bounds[0]) / (bounds[1] - bounds[0]), 1e-6), 1 - 1e-6)
    return math.log(p / (1.0 - p))


def _power_terms(log_a: float, alpha: float, log_b: float, log_s: np.ndarray, log_s0: np.ndarray):
    """log(A·s^α + B) and its derivatives in (log A, α, log B); `log_s0` is log s with 0 where s = 0."""
    with np.errstate(invalid="ignore", over="ignore"):  # a wild solver step; the residual guard catches it
        value = np.logaddexp(log_a + alpha * log_s, log_b)
        share = np.exp(log_a + alpha * log_s - value)  # A·s^α / (A·s^α + B), 0 at s = 0
    return value, share, share * log_s0, 1.0 - share


def _solve(residual, jac, start: np.ndarray) -> tuple[np.ndarray, float]:
    """Levenberg-Marquardt (MINPACK) straight through `leastsq`: least_squares' wrappers cost more
    than our tiny residuals, and a fit needs a few hundred solves."""
    with warnings.catch_warnings():  # maxfev reached along a flat direction is expected: best start wins
        warnings.simplefilter("ignore", RuntimeWarning)
        u, _ = leastsq(residual, start, Dfun=jac, maxfev=200)
    return u, float(np.sum(residual(u) ** 2))


def _censor(r: np.ndarray, cens: np.ndarray | None) -> np.ndarray:
    """Residuals model − target, where a censored point (target = its lower bound) only counts while
    the model sits below the bound: the one-sided, Tobit-style penalty min(r, 0)."""
    return r if cens is None else np.where(cens & (r > 0), 0.0, r)


def _inactive(r: np.ndarray, cens: np.ndarray | None) -> np.ndarray | None:
    """Rows of the Jacobian to zero: censored points the model already clears."""
    return None if cens is None else cens & (r > 0)


def _fit_power(s: np.ndarray, y: np.ndarray, alpha_bounds: tuple[float, float],
               cens: np.ndarray | None = None, sw: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Pure power law on all points; returns (log A, α, log B) and the log-space RSS (weighted by
    `sw`², the inverse per-point variances, when given)."""

    def unpack(t):
        alpha, dadu = _alpha(t[1], alpha_bounds)
        return t[0], alpha, t[2], dadu

    log_s = _log_s(s)
    log_s0 = np.where(s > 0, log_s, 0.0)

    def residual(t):
        log_a, alpha, log_b, _ = unpack(t)
        r = _censor(_power_terms(log_a, alpha, log_b, log_s, log_s0)[0] - y, cens)
        if sw is not None:
            r = r * sw
        return r if math.isfinite(float(r.sum())) else np.full_like(r, 1e6)

    def jac(t):
        log_a, alpha, log_b, dadu = unpack(t)
        value, share, d_alpha, share_b = _power_terms(log_a, alpha, log_b, log_s, log_s0)
        out = np.column_stack([share, d_alpha * dadu, share_b])
        off = _inactive(value - y, cens)
        if off is not None:
            out[off] = 0.0
        return out if sw is None else out * sw[:, None]

    log_a, alpha, log_b = _power_init(s, y)
    theta, rss = _solve(residual, jac, np.array([log_a, _alpha_inverse(alpha, alpha_bounds), log_b]))
    return np.array([theta[0], _alpha(theta[1], alpha_bounds)[0], theta[2]]), rss


def _fit_exp(s: np.ndarray, y: np.ndarray, cens: np.ndarray | None = None,
             sw: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Quadratic in log L: exact (weighted) linear least squares, or from there Levenberg-Marquardt
    on the one-sided residuals when some points are censored."""
    gamma, beta, a = np.polyfit(s, y, 2, w=sw)
    theta = np.array([a, beta, gamma])
    scale = np.ones_like(s) if sw is None else sw
    if cens is not None:
        design = np.column_stack([np.ones_like(s), s, s * s])

        def residual(t):
            return _censor(design @ t - y, cens) * scale

        def jac(t):
            out = design * scale[:, None]
            out[_inactive(design @ t - y, cens)] = 0.0
            return out

        theta, _ = _solve(residual, jac, theta)
    return theta, float(np.sum((_censor(_log_exp(theta, s) - y, cens) * scale) ** 2))


def _piecewise_start(s: np.ndarray, y: np.ndarray, s0: float) -> np.ndarray:
    pre = s <= s0
    log_a, alpha, log_b = _power_init(s[pre], y[pre])
    at_s0 = _log_power((log_a, alpha, log_b), np.array([s0]))[0]
    d = s[~pre] - s0
    design = np.column_stack([d, d * d]) if d.size >= 2 else d[:, None]
    coef, *_ = np.linalg.lstsq(design, y[~pre] - at_s0, rcond=None)
    beta, gamma = (coef[0], coef[1]) if coef.size == 2 else (coef[0], 0.0)
    return np.array([log_a, alpha, log_b, beta, gamma])


def _softplus(w: float) -> float:
    return max(w, 0.0) + math.log1p(math.exp(-abs(w)))


def _softplus_inverse(v: float) -> float:
    v = max(v, 1e-6)
    return v + math.log(-math.expm1(-v))


def _kink_slope(log_a: float, alpha: float, log_b: float, s0: float) -> tuple[float, float]:
    """The power law's log-slope at s0, d/ds log(A·s^α + B), and its share A·s0^α/(A·s0^α + B)."""
    share = 1.0 / (1.0 + math.exp(min(log_b - log_a - alpha * math.log(s0), 700.0)))
    return share * alpha / s0, share


class _Profile:
    """RSS of the best piecewise fit at a fixed s0, remembered so nearby s0 values start warm.

    The collapse branch starts with log-slope β = (power-law log-slope at s0) + softplus(w) ≥ it:
    a phase transition steepens the curve. Without this the fit happily "explains" noise with a
    kink that flattens the curve, which is no collapse at all.

    With censored points the branch is also kept non-decreasing up to the last ratio,
    γ = softplus(v) − β/(2·(s_max − s0)): past the last finite point only lower bounds hold it, and
    the fit would otherwise meet them with a branch that rises and comes back down (seen on a flat
    curve ending in NaN). Without censoring the finite points pin the branch and γ is free.
    """

    def __init__(self, s: np.ndarray, y: np.ndarray, alpha_bounds: tuple[float, float],
                 cens: np.ndarray | None = None, sw: np.ndarray | None = None):
        self.s, self.y, self.bounds, self.cens, self.sw = s, y, alpha_bounds, cens, sw
        self.seen: dict[float, tuple[float, np.ndarray]] = {}

    def _model(self, s0: float):
        """Residual, Jacobian and θ <-> u maps at this s0. Arrays hold ~10 points, where each numpy call
        costs more than its arithmetic, so the code keeps the number of array operations small."""
        s, y, cens, sw, pre = self.s, self.y, self.cens, self.sw, self.s <= s0
        d = np.where(pre, 0.0, s - s0)
        d2 = d * d
        clamped = np.where(pre, s, s0)  # past s0 the power-law part is frozen at its value at s0
        log_s = _log_s(clamped)
        log_s0 = np.where(clamped > 0, log_s, 0.0)
        ls0 = math.log(s0)
        mono = cens is not None
        half = 0.5 / (float(s.max()) - s0) if mono else 0.0  # the grid keeps s0 below the last ratio
        e = d - half * d2  # d·β + d²·γ = e·β + d²·g with γ = g − β·half
        cols = np.empty((s.size, 5))
        cols[:, 4] = d2

        def g(u):
            return _softplus(u[4]) if mono else u[4]

        def scalars(u):
            alpha, dadu = _alpha(u[1], self.bounds)
            slope, share0 = _kink_slope(u[0], alpha, u[2], s0)
            return alpha, dadu, slope, share0, slope + _softplus(u[3])

        def raw(u):
            alpha, _, _, _, beta = scalars(u)
            with np.errstate(invalid="ignore", over="ignore"):
                return np.logaddexp(log_a_s(u, alpha), u[2]) - y + e * beta + d2 * g(u)

        def residual(u):
            r = _censor(raw(u), cens)
            if sw is not None:
                r = r * sw
            return r if math.isfinite(float(r.sum())) else np.full_like(r, 1e6)  # a wild lm step

        def log_a_s(u, alpha):
            return u[0] + alpha * log_s

        def jac(u):
            alpha, dadu, _, share0, _ = scalars(u)
            z = log_a_s(u, alpha)
            with np.errstate(invalid="ignore", over="ignore"):
                share = np.exp(z - np.logaddexp(z, u[2]))  # A·s^α / (A·s^α + B)
            curv = e * (share0 * (1.0 - share0) * alpha / s0)  # e·∂slope/∂log A = −e·∂slope/∂log B
            cols[:, 0] = share + curv
            cols[:, 1] = (share * log_s0 + e * ((share0 + alpha * share0 * (1.0 - share0) * ls0) / s0)) * dadu
            cols[:, 2] = 1.0 - share - curv
            cols[:, 3] = e * (0.5 * (1.0 + math.tanh(0.5 * u[3])))
            if mono:
                cols[:, 4] = d2 * (0.5 * (1.0 + math.tanh(0.5 * u[4])))
            out = cols.copy() if sw is None else cols * sw[:, None]
            if cens is not None:
                out[_inactive(raw(u), cens)] = 0.0
            return out

        def to_theta(u):
            alpha, _, _, _, beta = scalars(u)
            return np.array([u[0], alpha, u[2], beta, g(u) - beta * half])

        def to_u(t):
            slope, _ = _kink_slope(t[0], t[1], t[2], s0)
            return np.array([t[0], _alpha_inverse(t[1], self.bounds), t[2],
                             _softplus_inverse(t[3] - slope), _softplus_inverse(t[4] + t[3] * half) if mono else t[4]])

        return residual, jac, to_theta, to_u

    def _warm(self, s0: float) -> np.ndarray | None:
        if not self.seen:
            return None
        return self.seen[min(self.seen, key=lambda k: abs(k - s0))][1]

    def __call__(self, s0: float) -> tuple[float, np.ndarray]:
        """(RSS, θ) with θ = (log A, α, log B, β, γ) at this s0."""
        s0 = float(s0)
        if s0 in self.seen:
            return self.seen[s0]
        residual, jac, to_theta, to_u = self._model(s0)
        starts = [_piecewise_start(self.s, self.y, s0)]
        warm = self._warm(s0)
        if warm is not None:
            starts.append(warm)
        best = (math.inf, starts[0])
        for start in starts:
            u, rss = _solve(residual, jac, to_u(start))
            if rss < best[0]:
                best = (rss, to_theta(u))
        self.seen[s0] = best
        return best


def _s0_grid(xs: np.ndarray, min_pre: int, min_post: int, per_gap: int) -> np.ndarray:
    """s0 candidates with at least `min_pre` points at or below and `min_post` points above: the
    admissible range is [xs[first], xs[last]), so the grid ends a hair before xs[last]."""
    first, last = min_pre - 1, len(xs) - min_post
    if last <= first:
        return np.array([])
    parts = [np.linspace(xs[i], xs[i + 1], per_gap, endpoint=False) for i in range(first, last)]
    edge = xs[last] - 1e-6 * (xs[-1] - xs[0])
    return np.append(np.concatenate(parts), edge)


def _best_s0(profile: _Profile, grid: np.ndarray, scale: float) -> tuple[float, tuple[float, float] | None]:
    """The grid minimum refined by a bounded 1-D search. Where the profile is flat (e.g. the last gap,
    whose `min_post` points the collapse branch fits exactly) s0 is not identified: take the middle
    of the flat stretch rather than wherever the search happened to stop, and return the stretch."""
    rss = np.array([profile(v)[0] for v in grid])
    k = int(np.argmin(rss))
    ties = np.flatnonzero(rss <= rss[k] + 1e-6 * (rss[k] + scale))
    if ties.size > 2 and ties.max() - ties.min() == ties.size - 1:
        flat = (float(grid[ties.min()]), float(grid[ties.max()]))
        return 0.5 * (flat[0] + flat[1]), flat
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, grid.size - 1)]
    res = minimize_scalar(lambda v: profile(v)[0], bounds=(lo, hi), method="bounded", options={"xatol": 1e-5})
    return (float(res.x) if profile(res.x)[0] <= rss[k] else float(grid[k])), None


def _information(rss: float, n: int, k: int, floor: float, share: float | None = None) -> tuple[float, float]:
    """(AICc, BIC) for Gaussian errors; `floor` is the smallest per-point variance we believe in.

    Weighted (`share` given): `rss` is χ² = Σ r²/v with v = se_log² + floor, and `share` = Σ floor/v is
    the floor's part of it, so ψ = (χ² + share)/n is the unweighted rule's (RSS + n·floor)/n measured
    in units of each point's variance. ψ ≥ 1: the scatter exceeds the SEs and its scale is estimated,
    −2 log L = n(1 + log ψ), exactly the unweighted form when every SE is 0; ψ < 1: the SEs hold and
    −2 log L = n·ψ (known variances). Both meet with equal slope at ψ = 1; constants common to all
    models are dropped.
    """
    if share is not None:
        psi = (rss + share) / n
        ll_term = n * psi if psi < 1.0 else n * (1.0 + math.log(psi))
    else:
        ll_term = n * math.log((rss + n * floor) / n)
    aicc = ll_term + 2 * k + (2 * k * (k + 1) / (n - k - 1) if n - k - 1 > 0 else math.inf)
    return aicc, ll_term + k * math.log(n)


# ----------------------------------------------------------------------------------------------
# public result
# ----------------------------------------------------------------------------------------------

@dataclass
class PTPFit:
    """One fitted curve. `s0`/`s0_ci` are on the compression-ratio axis; `ptp_bits` on the bit axis.

    `rss` describes the piecewise (eq. 5) fit in log space (censored shortfalls included), `r2` the
    same fit on the finite points only; `rss_models`, `aic` (AICc) and `bic` hold every model. `model`
    is what `predict` uses: "piecewise" when a PTP is reported, else the BIC-preferred simple model,
    or "none" when there were too few points for eq. 5 (no line drawn). `n_points` counts every point
    fitted, `n_censored` the collapsed ones among them; `y` holds the PPL each point was fitted to,
    which for a censored point (`censored`) is the lower bound `censor_bound`.
    """

    params: dict[str, float]
    s0: float
    s0_ci: tuple[float, float]
    has_ptp: bool
    verdict: str
    rss: float
    r2: float
    aic: dict[str, float]
    bic: dict[str, float]
    n_points: int
    n_censored: int
    axis: str
    baseline_bits: float = 16.0
    model: str = "none"
    delta_bic: float = math.nan  # BIC(best simple model) − BIC(piecewise); > 0 favours the PTP
    s0_flat: tuple[float, float] | None = None  # where the profile is flat: s0 is only known to lie here
    rss_models: dict[str, float] = field(default_factory=dict)
    simple_params: dict[str, dict[str, float]] = field(default_factory=dict)
    thetas: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # log-space vectors per model
    s: np.ndarray = field(default_factory=lambda: np.array([]), repr=False)
    y: np.ndarray = field(default_factory=lambda: np.array([]), repr=False)
    censored: np.ndarray = field(default_factory=lambda: np.array([], dtype=bool), repr=False)
    censor_bound: float = math.nan  # PPL lower bound of the censored points (nan when none)
    ci_low_open: bool = False  # the s0 interval reaches the first admissible s0: its true low end is lower
    ci_high_open: bool = False  # ... the last admissible s0: its true high end is higher
    weighted: bool = False  # fitted with per-point standard errors (`y_se`)
    y_se: np.ndarray = field(default_factory=lambda: np.array([]), repr=False)  # PPL SEs as fitted (0 = none)
    chi2_red: float = math.nan  # weighted fit: χ²/(n − 6) of eq. 5; ≫ 1 means the SEs miss most of the scatter

    @property
    def s0_ci_text(self) -> str:
        """The s0 interval on the ratio axis with its open ends marked, e.g. "≤0.200–0.450"."""
        return interval_text(*self.s0_ci, self.ci_low_open, self.ci_high_open)

    @property
    def ptp_ci_text(self) -> str:
        """The interval on the curve's own axis (bits run the other way: an open high ratio is "≤ bits")."""
        if self.axis != "bits":
            return self.s0_ci_text
        lo, hi = self.ptp_bits_ci
        return interval_text(lo, hi, self.ci_high_open, self.ci_low_open, digits=2, unit=" bits")

    @property
    def ptp_bits(self) -> float | None:
        return float(ratio_to_bits(self.s0, self.baseline_bits)) if self.axis == "bits" else None

    @property
    def ptp_bits_ci(self) -> tuple[float, float] | None:
        if self.axis != "bits":
            return None
        lo, hi = ratio_to_bits(np.array(self.s0_ci), self.baseline_bits)
        return (float(hi), float(lo))  # higher ratio = fewer bits, so the ends swap

    def to_native(self, s) -> np.ndarray:
        """Compression ratio -> the curve's own axis (bits for a bit-axis fit)."""
        return ratio_to_bits(s, self.baseline_bits) if self.axis == "bits" else np.asarray(s, dtype=float)

    def predict(self, s, model: str | None = None) -> np.ndarray:
        """PPL at compression ratio(s) `s` under `model` (default: the selected one, see class doc)."""
        s = np.atleast_1d(np.asarray(s, dtype=float))
        model = model or self.model
        theta = self.thetas.get(model)  # log A can sit far below float range of A itself: use the logs
        if theta is None:
            return np.full_like(s, np.nan)
        if model == "piecewise":
            return np.exp(_log_piecewise(theta, s, self.s0))
        return np.exp(_log_power(theta, s) if model == "power" else _log_exp(theta, s))

    def curve(self, n: int = 200, native: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """A smooth (x, PPL) line over the data range for plots; x in the native axis if asked."""
        if self.s.size == 0:
            return np.array([]), np.array([])
        grid = np.linspace(float(self.s.min()), float(self.s.max()), n)
        return (self.to_native(grid) if native else grid), self.predict(grid)


# ----------------------------------------------------------------------------------------------
# the fit
# ----------------------------------------------------------------------------------------------

def _check_options(min_pre: int, min_post: int, per_gap: int, alpha_bounds: tuple[float, float],
                   noise_floor: float, level: float, ci: str, collapse_ppl: float, censor_factor: float) -> None:
    if min_pre < 1 or min_post < 1 or per_gap < 1:
        raise MPTError(f"min_pre={min_pre}, min_post={min_post}, per_gap={per_gap}: each must be ≥ 1",
                       "keep the defaults (2, 2, 4) unless you need another s0 grid")
    if not 0 < alpha_bounds[0] < alpha_bounds[1]:
        raise MPTError(f"alpha_bounds={alpha_bounds} is not an interval of positive values", "pass e.g. (0.1, 5.0)")
    if not (noise_floor >= 0 and 0 < level < 1):
        raise MPTError(f"noise_floor={noise_floor}, level={level}", "pass noise_floor ≥ 0 and level in (0, 1)")
    if ci not in ("f", "chi2"):
        raise MPTError(f"unknown ci method {ci!r}", "use 'f' or 'chi2'")
    if not (collapse_ppl > 0 and censor_factor >= 1):
        raise MPTError(f"collapse_ppl={collapse_ppl}, censor_factor={censor_factor}",
                       "pass collapse_ppl > 0 and censor_factor ≥ 1 (the bound must not undercut a finite point)")


def _as_floats(values, name: str) -> np.ndarray:
    try:
        return np.asarray(values, dtype=float).ravel()
    except (TypeError, ValueError):
        raise MPTError(f"{name} is not a sequence of numbers", f"pass {name} as numbers, e.g. a list or array") from None


def _validate(x, y, axis: str, baseline_bits: float, ppl: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Reject what cannot be a compression curve before any fitting, one clear error each.
    `ppl=False`: y is a score that falls with damage (an accuracy), where 0 is a valid value."""
    if axis not in AXES:
        raise MPTError(f"unknown axis {axis!r}", f"use one of: {', '.join(AXES)}")
    x, y = _as_floats(x, "x"), _as_floats(y, "y")
    if x.shape != y.shape:
        raise MPTError(f"x has {x.size} values but y has {y.size}", "pass one y per x")
    if x.size == 0:
        raise MPTError("no points to fit", "pass the curve's (x, PPL) points; eq. 5 needs at least 7")
    if not np.isfinite(x).all():
        i = int(np.flatnonzero(~np.isfinite(x))[0])
        raise MPTError(f"x[{i}]={x[i]} is not a finite number", "drop the points whose ratio or bit width is unknown")
    if axis == "sparsity":
        bad = (x < 0) | (x >= 1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            hint = " (these look like bit widths: pass axis='bits')" if (x >= 1).all() else ""
            raise MPTError(f"x[{i}]={x[i]:g} is outside [0, 1) on the sparsity axis ({int(bad.sum())} of {x.size} "
                           "points)", f"pass compression ratios (sparsity) in [0, 1){hint}")
    else:
        if not (math.isfinite(baseline_bits) and baseline_bits > 0):
            raise MPTError(f"baseline_bits={baseline_bits} is not a positive number", "pass e.g. 16 (FP16)")
        if (x <= 0).any():
            i = int(np.flatnonzero(x <= 0)[0])
            raise MPTError(f"x[{i}]={x[i]:g} bits per weight is not positive", "pass bit widths > 0, e.g. 2, 3, 4, 8, 16")
    with np.errstate(invalid="ignore"):
        bad = y <= 0 if ppl else y < 0  # NaN is a collapse (censored), a zero or negative PPL is a bug upstream
    if bad.any() and not ppl:
        i = int(np.flatnonzero(bad)[0])
        raise MPTError(f"y[{i}]={y[i]:g} (at x={x[i]:g}) is a negative score", "pass scores ≥ 0 (NaN for a failed run)")
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise MPTError(f"y[{i}]={y[i]:g} (at x={x[i]:g}) is not a positive perplexity",
                       "pass PPL values > 0; mark a collapsed run as inf or NaN, not 0 or a negative number")
    return x, y


def _check_se(y_se, y: np.ndarray, cens: np.ndarray) -> np.ndarray:
    """Per-point standard errors of the PPL, validated; NaN (an evaluator could not estimate one, e.g.
    from a single window) counts as 0, i.e. only the model floor. Ignored at collapsed points."""
    se = _as_floats(y_se, "y_se")
    if se.shape != y.shape:
        raise MPTError(f"y_se has {se.size} values but y has {y.size}", "pass one standard error per PPL value")
    with np.errstate(invalid="ignore"):
        bad = ~cens & ((se < 0) | np.isinf(se))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise MPTError(f"y_se[{i}]={se[i]:g} is not a standard error", "pass standard errors ≥ 0 (NaN where unknown)")
    return np.where(cens | np.isnan(se), 0.0, se)


def _prepare(x, y, axis: str, baseline_bits: float, collapse_ppl: float, censor_factor: float, y_se=None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, np.ndarray | None]:
    """Sorted ratios s, log-PPL targets, the censored mask, the censoring bound (log; nan if none) and
    the PPL standard errors (None when not given). Repeated ratios are kept as replicates (e.g. seeds):
    each point adds its own residual."""
    x, y = _validate(x, y, axis, baseline_bits)
    s = bits_to_ratio(x, baseline_bits) if axis == "bits" else x
    cens = collapsed(y, collapse_ppl)
    if cens.all():
        raise MPTError(f"all {y.size} points collapsed (PPL inf, NaN or ≥ {collapse_ppl:g})",
                       "include the finite points at lower compression: the collapse is measured against them")
    if np.unique(s).size < 2:
        raise MPTError(f"all {s.size} points sit at one compression ratio (x={x[0]:g})",
                       "pass a curve: points at several compression ratios (eq. 5 needs at least 7)")
    ly = np.log(np.where(cens, 1.0, y))
    bound = float(ly[~cens].max() + math.log(censor_factor)) if cens.any() else math.nan
    ly[cens] = bound
    se = None if y_se is None else _check_se(y_se, y, cens)
    order = np.argsort(s, kind="stable")
    return s[order], ly[order], cens[order], bound, (None if se is None else se[order])


def _weights(se: np.ndarray, ppl: np.ndarray, cens: np.ndarray, floor: float) -> np.ndarray:
    """√ of the inverse log-space variances v = (se/PPL)² + noise_floor². A collapsed point has no SE
    of its own: it gets the median variance of the measured points, so that its one-sided penalty
    weighs like a typical point rather than like the best-measured one."""
    var = (se / ppl) ** 2 + floor
    if (~cens).any():
        var = np.where(cens, float(np.median(var[~cens])), var)
    if not (var > 0).all():
        raise MPTError("a point has zero variance (y_se = 0 and noise_floor = 0): its weight is infinite",
                       "pass noise_floor > 0 (the model's own scatter) or positive standard errors")
    return 1.0 / np.sqrt(var)


def _ci(profile: _Profile, grid: np.ndarray, s0: float, rss_min: float, n: int, floor: float,
        level: float, method: str, share: float | None = None) -> tuple[float, float, bool, bool]:
    """Profile interval for s0: every s0 whose best fit is not significantly worse than the optimum.
    Returns (low, high, low_open, high_open); an end is open when the interval still holds at the
    first / last admissible s0 of the grid: the data cannot place s0 beyond it, so the true end lies
    further out than the number says.

    "chi2": n·log(RSS(s0)/RSS_min) ≤ χ²₁ — the large-sample likelihood-ratio rule. With 6 fitted
    parameters on 8-13 points it undercovers (σ² = RSS/n is biased low by (n−6)/n), so the default
    "f" uses the small-sample profile rule of nonlinear regression:
    (RSS(s0) − RSS_min) / (RSS_min/(n − 6)) ≤ F(1, n − 6).

    Weighted (RSS = χ² = Σ r²/v, v = se_log² + floor, `share` = Σ floor/v): the rule above in units
    of each point's variance, base = χ²_min + share (exactly the unweighted rule when every SE is 0),
    but never tighter than the known-variance rule Δχ² ≤ χ²₁. So the interval widens as the SEs grow,
    and SEs smaller than the real scatter cannot make it tighter than the scatter allows.
    """
    base = rss_min + n * floor
    df = n - (N_PARAMS["piecewise"] - 1)
    if share is not None:
        q, base = chi2.ppf(level, 1), rss_min + share
        scaled = f_dist.ppf(level, 1, df) * base / df if method == "f" else base * math.expm1(q / n)
        thr = max(q, scaled)

        def excess(v: float) -> float:
            return profile(v)[0] - rss_min - thr
    elif method == "chi2":
        thr = chi2.ppf(level, 1)

        def excess(v: float) -> float:
            return n * math.log((profile(v)[0] + n * floor) / base) - thr
    elif method == "f":
        thr = f_dist.ppf(level, 1, df) / df

        def excess(v: float) -> float:
            return (profile(v)[0] + n * floor - base) / base - thr
    else:
        raise MPTError(f"unknown ci method {method!r}", "use 'f' or 'chi2'")

    pts = np.sort(np.append(grid, s0))
    inside = np.array([excess(v) <= 0 for v in pts])
    idx = np.flatnonzero(inside)
    lo_i, hi_i = idx.min(), idx.max()
    lo, hi = float(pts[lo_i]), float(pts[hi_i])
    if lo_i > 0:  # the crossing lies between an outside and an inside grid value
        lo = brentq(excess, pts[lo_i - 1], pts[lo_i], xtol=1e-5)
    if hi_i < len(pts) - 1:
        hi = brentq(excess, pts[hi_i], pts[hi_i + 1], xtol=1e-5)
    return float(lo), float(hi), bool(lo_i == 0), bool(hi_i == len(pts) - 1)


def _collapses(theta: np.ndarray, s0: float, s_max: float) -> bool:
    """Past s0 the curve must rise, and faster than the power law's own log-slope at s0."""
    log_a, alpha, log_b, beta, gamma = theta
    a, b = math.exp(log_a), math.exp(log_b)
    pre_slope = a * alpha * s0 ** (alpha - 1) / (a * s0 ** alpha + b) if s0 > 0 else 0.0
    d = s_max - s0
    post_rise = beta + gamma * d  # mean log-slope of the collapse branch over (s0, s_max]
    return post_rise > 0 and post_rise > pre_slope


def fit_ptp(x, y, *, y_se=None, axis: str = "sparsity", baseline_bits: float = 16.0, min_pre: int = 2,
            min_post: int = 2, per_gap: int = 4, alpha_bounds: tuple[float, float] = (0.1, 5.0),
            noise_floor: float = 5e-3, min_delta_bic: float = 2.0, level: float = 0.95,
            ci: str = "f", collapse_ppl: float = COLLAPSE_PPL, censor_factor: float = CENSOR_FACTOR) -> PTPFit:
    """Fit eq. 5 (continuous form) to a PPL-vs-compression curve and decide whether it has a PTP.

    x: sparsity / compression ratio in [0, 1) (axis="sparsity") or bits per weight > 0 (axis="bits",
    converted to s = 1 − bits/baseline_bits; a point above the baseline, e.g. an F16 file whose F32
    norms give 16.003 bits/weight, counts as uncompressed). y: perplexity (any positive metric that
    rises with damage). A collapsed point (y inf, NaN, or ≥ `collapse_ppl`) is kept as a censored
    observation: its log PPL is only known to exceed log(`censor_factor` × the largest finite PPL),
    and it costs a model something only where the model predicts below that bound (module doc).
    Repeated x values are replicates (e.g. two GGUF schemes of one size): each adds its own residual
    and counts as a point, while the s0 grid uses distinct ratios. Invalid input (x off its axis,
    y ≤ 0, lengths that differ, fewer than two distinct ratios, nothing finite) raises MPTError;
    fewer than 7 points (or 3 distinct ratios) give a "too few points" verdict, as eq. 5 needs 7.
    `noise_floor` (log-space std) keeps a perfect fit of a few points from claiming infinite
    evidence; `min_delta_bic` = 2 is the usual "positive evidence" margin on BIC.

    `y_se`: optional standard error of each PPL (e.g. `PerplexityResult.ppl_se`, the spread over
    evaluation windows; NaN = unknown, counted as 0). With it the fit is weighted in log space,
    w = 1/(se_log² + noise_floor²) with se_log = se/PPL (delta method), `noise_floor` standing for the
    model's own scatter around eq. 5. A noisy point then pulls the fit less, and the s0 interval is
    the wider of the known-variance profile interval (Δχ² ≤ χ²₁, which grows with the SEs) and the
    residual-based one used without SEs (see `_ci`): larger SEs can only widen it. This is a weighted
    profile interval, not a bootstrap: it is deterministic, costs one fit (a parametric bootstrap of
    the points costs a few hundred), and a bootstrap of s0 on 7-13 points mostly resamples which grid
    gap the knee falls in, a lumpy distribution whose percentiles are unstable. Without `y_se`, the
    fit is exactly the unweighted one.
    """
    _check_options(min_pre, min_post, per_gap, alpha_bounds, noise_floor, level, ci, collapse_ppl, censor_factor)
    s, ly, censored, bound, se = _prepare(x, y, axis, baseline_bits, collapse_ppl, censor_factor, y_se)
    n, n_cens = int(s.size), int(censored.sum())
    cens = censored if n_cens else None  # None: the plain least squares, no censoring bookkeeping
    uniq = np.unique(s)
    floor = noise_floor ** 2
    weighted = se is not None
    sw = _weights(se, np.exp(ly), censored, floor) if weighted else None
    share = float(np.sum(floor * sw ** 2)) if weighted else None  # the noise floor's part of χ² (_information)
    nan_params = dict.fromkeys(("A", "alpha", "B", "s0", "beta", "gamma"), math.nan)
    base = dict(n_points=n, n_censored=n_cens, axis=axis, baseline_bits=baseline_bits, s=s, y=np.exp(ly),
                censored=censored, censor_bound=math.exp(bound) if n_cens else math.nan, weighted=weighted,
                y_se=se if weighted else np.array([]))
    note = f"; {n_cens} collapsed point(s) censored at PPL ≥ {math.exp(bound):.4g}" if n_cens else ""
    if uniq.size < 3:
        return PTPFit(params=nan_params, s0=math.nan, s0_ci=(math.nan, math.nan), has_ptp=False,
                      verdict=f"too few points (n={n}, {uniq.size} distinct) to fit: no PTP claimed{note}",
                      rss=math.nan, r2=math.nan, aic={}, bic={}, **base)

    fits: dict[str, tuple[np.ndarray, float]] = {"exp": _fit_exp(s, ly, cens, sw),
                                                 "power": _fit_power(s, ly, alpha_bounds, cens, sw)}
    simple = {"power": dict(zip(("A", "alpha", "B"), (math.exp(fits["power"][0][0]), fits["power"][0][1],
                                                      math.exp(fits["power"][0][2])))),
              "exp": dict(zip(("a", "beta", "gamma"), map(float, fits["exp"][0])))}
    grid = _s0_grid(uniq, min_pre, min_post, per_gap)
    s0, s0_ci, theta, flat, ci_open = math.nan, (math.nan, math.nan), None, None, (False, False)
    if grid.size and n > N_PARAMS["piecewise"] - 1:  # 6 parameters: with n ≤ 6 points eq. 5 interpolates
        profile = _Profile(s, ly, alpha_bounds, cens, sw)
        s0, flat = _best_s0(profile, grid, scale=n if weighted else n * floor)  # χ² counts ~1 per point
        rss_pw, theta = profile(s0)
        fits["piecewise"] = (theta, rss_pw)
        *s0_ci, lo_open, hi_open = _ci(profile, grid, s0, rss_pw, n, floor, level, ci, share)
        s0_ci, ci_open = tuple(s0_ci), (lo_open, hi_open)
        if weighted:
            base["chi2_red"] = rss_pw / (n - (N_PARAMS["piecewise"] - 1))
            note += f"; weighted by per-point SEs (reduced χ² {base['chi2_red']:.2f})"

    aic, bic = {}, {}
    for name, (_, rss) in fits.items():
        aic[name], bic[name] = _information(rss, n, N_PARAMS[name], floor, share)
    best_simple = min(("power", "exp"), key=lambda m: bic[m])

    if theta is None:
        return PTPFit(params=nan_params, s0=math.nan, s0_ci=s0_ci, has_ptp=False,
                      verdict=f"too few points (n={n}, {uniq.size} distinct) for eq. 5, which needs ≥ 7 with "
                              f"≥ {min_pre} before and ≥ {min_post} after s0: no PTP claimed{note}", rss=math.nan,
                      r2=math.nan, aic=aic, bic=bic, model="none",
                      rss_models={m: f[1] for m, f in fits.items()}, simple_params=simple,
                      thetas={m: f[0] for m, f in fits.items()}, **base)

    delta = bic[best_simple] - bic["piecewise"]
    inside = float(s.min()) < s0 < float(s.max())
    collapse = _collapses(theta, s0, float(s.max()))
    has_ptp = bool(delta > min_delta_bic and inside and collapse)
    params = {"A": math.exp(theta[0]), "alpha": float(theta[1]), "B": math.exp(theta[2]), "s0": s0,
              "beta": float(theta[3]), "gamma": float(theta[4])}
    verdict = _verdict(has_ptp, delta, min_delta_bic, best_simple, inside, collapse, s0, s0_ci, axis,
                       baseline_bits, ci_open)
    if flat is not None:
        verdict += f" [flat profile: s0 not identified within {flat[0]:.3f}–{flat[1]:.3f}]"
    finite = ~censored  # R² is only defined where a value was measured
    resid = _log_piecewise(theta, s[finite], s0) - ly[finite]
    tss = float(np.sum((ly[finite] - ly[finite].mean()) ** 2))
    return PTPFit(params=params, s0=s0, s0_ci=s0_ci, ci_low_open=ci_open[0], ci_high_open=ci_open[1],
                  has_ptp=has_ptp, verdict=verdict + note,
                  rss=fits["piecewise"][1], r2=1.0 - float(resid @ resid) / tss if tss > 0 else math.nan,
                  aic=aic, bic=bic, model="piecewise" if has_ptp else best_simple, delta_bic=float(delta),
                  s0_flat=flat, rss_models={m: f[1] for m, f in fits.items()}, simple_params=simple,
                  thetas={m: f[0] for m, f in fits.items()}, **base)


def interval_text(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False, digits: int = 3,
                  unit: str = "") -> str:
    """"lo–hi" with an open end shown as a bound: "≤0.200–0.450" (the low end may lie lower),
    "0.550–≥0.700" (the high end may lie higher); "" when the interval is not defined."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return ""
    return f"{'≤' if lo_open else ''}{lo:.{digits}f}–{'≥' if hi_open else ''}{hi:.{digits}f}{unit}"


def _verdict(has_ptp: bool, delta: float, margin: float, best_simple: str, inside: bool, collapse: bool,
             s0: float, ci: tuple[float, float], axis: str, baseline_bits: float,
             ci_open: tuple[bool, bool] = (False, False)) -> str:
    if has_ptp:
        if axis == "bits":
            b, (b_lo, b_hi) = ratio_to_bits(s0, baseline_bits), ratio_to_bits(np.array(ci), baseline_bits)
            text = interval_text(b_hi, b_lo, ci_open[1], ci_open[0], digits=2, unit=" bits")
            return f"PTP at {b:.2f} bits (s0={s0:.3f}, 95% CI {text}); ΔBIC={delta:.1f} vs {best_simple}"
        return (f"PTP at s0={s0:.3f} (95% CI {interval_text(*ci, *ci_open)}); "
                f"ΔBIC={delta:.1f} vs {best_simple}")
    if delta <= margin:
        return f"no PTP in range: {best_simple} law preferred or tied on BIC (ΔBIC={delta:.1f} ≤ {margin:g})"
    if not inside:
        return "no PTP in range: best s0 sits at the edge of the data"
    return "no PTP in range: the piecewise fit shows no collapse after s0"


# ----------------------------------------------------------------------------------------------
# the near-lossless limit
# ----------------------------------------------------------------------------------------------

# The Perspective ("Phase Transitions in Large Language Model Compression: A Perspective", repository
# github.com/whucs21Mzy/Model-Phase-Transitions) calls the regime before the PTP "near-lossless": the
# average downstream score stays within 5% of dense, or, the more direct observable, WikiText-2 PPL
# within ΔPPL ≈ 1.5 of dense (LLaMA2-7B: ~5.5 dense to ~7.0 at the PTP). An absolute ΔPPL means
# little on a model whose dense PPL is 14 or 22, so by default it is carried over as a ratio of the
# dense PPL it was read on: 1.5 / 5.47 (LLaMA-2-7B, WikiText-2, 2048-token windows) ≈ 27% relative.
NEAR_LOSSLESS_DPPL = 1.5
LLAMA2_7B_DENSE_PPL = 5.47
NEAR_LOSSLESS_REL = NEAR_LOSSLESS_DPPL / LLAMA2_7B_DENSE_PPL
DOWNSTREAM_TOLERANCE = 0.05  # relative, for an average downstream score (higher_is_better=True)


@dataclass
class NearLossless:
    """The near-lossless limit of one curve: the largest compression ratio up to which the measured
    metric stays within the tolerance of dense. Ratios are on the compression-ratio axis, like
    `PTPFit.s0`; `to_native` converts to bits for a bit-axis curve.

    `low`/`high`: where the curve's upper / lower SE band (at `level`) crosses the threshold; both
    equal `limit` without SEs. `high_open`: the (lower band of the) curve is still within at the last
    measured ratio, so the limit is at least `high`; `low_open`: already over at the first point.
    `bracket`: the measured ratios on either side of the crossing (what interpolation bridges).
    `threshold` is the metric value at the limit: dense × (1 + delta) for a relative PPL tolerance.
    """

    limit: float
    low: float
    high: float
    low_open: bool
    high_open: bool
    threshold: float
    dense: float
    dense_source: str
    delta: float
    absolute: bool = False
    higher_is_better: bool = False
    axis: str = "sparsity"
    baseline_bits: float = 16.0
    bracket: tuple[float, float] = (math.nan, math.nan)
    s: np.ndarray = field(default_factory=lambda: np.array([]), repr=False)  # interpolation nodes
    damage: np.ndarray = field(default_factory=lambda: np.array([]), repr=False)  # ±log(metric/dense); inf: collapsed

    def to_native(self, s) -> np.ndarray:
        """Compression ratio -> the curve's own axis (bits for a bit-axis curve)."""
        return ratio_to_bits(s, self.baseline_bits) if self.axis == "bits" else np.asarray(s, dtype=float)

    def relative(self, s: float) -> float:
        """metric / dense at ratio `s` on the measured curve (linear in log metric between points);
        inf past a collapsed point, NaN outside the measured range."""
        s = float(s)
        if not (self.s.size and self.s[0] <= s <= self.s[-1]):
            return math.nan
        j = min(int(np.searchsorted(self.s, s, side="right")), self.s.size - 1)
        i = max(j - 1, 0)
        a, b = self.damage[i], self.damage[j]
        if s == self.s[i]:
            d = a
        elif not (math.isfinite(a) and math.isfinite(b)):
            d = math.inf
        else:
            d = a + (b - a) * (s - self.s[i]) / (self.s[j] - self.s[i])
        return math.exp(-d if self.higher_is_better else d)

    def text(self, digits: int = 3) -> str:
        """The limit on the curve's own axis with its SE interval, open ends as bounds:
        "0.521 (0.498–0.547)", "≥0.800", "≤2.00 bits"."""
        if not math.isfinite(self.limit):
            return ""
        bits = self.axis == "bits"
        unit, digits = (" bits", 2) if bits else ("", digits)
        value = float(self.to_native(self.limit))
        if self.high_open and self.limit == self.high:
            return f"{'≤' if bits else '≥'}{value:.{digits}f}{unit}"
        lo, hi = (float(v) for v in self.to_native([self.low, self.high]))
        text = f"{value:.{digits}f}{unit}"
        if self.low < self.high:  # bits run the other way: swap the ends and their open flags
            inner = (interval_text(hi, lo, self.high_open, self.low_open, digits) if bits
                     else interval_text(lo, hi, self.low_open, self.high_open, digits))
            text += f" ({inner})"
        return text


def _positive(value) -> bool:
    try:
        return math.isfinite(float(value)) and float(value) > 0
    except (TypeError, ValueError):
        return False


def _threshold(dense: float, delta: float, absolute: bool, higher_is_better: bool) -> float:
    """The tolerance as a damage d = ±log(metric/dense): the largest d still near-lossless."""
    if higher_is_better:
        floor = dense - delta if absolute else dense * (1.0 - delta)
        if floor <= 0:
            raise MPTError(f"delta={delta:g} leaves no score above 0 (dense {dense:g})",
                           "pass a tolerance below the dense score, e.g. delta=0.05 (5% relative)")
        return -math.log(floor / dense)
    return math.log((dense + delta) / dense if absolute else 1.0 + delta)


def _first_over(s: np.ndarray, d: np.ndarray, limit: float) -> tuple[float, int]:
    """The ratio where the piecewise-linear d(s) first exceeds `limit`, and the index of the first node
    over it (−1: never). A segment ending in a collapsed node (d = inf) only says the crossing lies in
    that gap: the last node known to be within is returned, the conservative end."""
    over = d > limit
    if not over.any():
        return float(s[-1]), -1
    i = int(np.argmax(over))
    if i == 0:
        return float(s[0]), 0
    a, b = d[i - 1], d[i]
    if not math.isfinite(b):
        return float(s[i - 1]), i
    return float(s[i - 1] + (limit - a) / (b - a) * (s[i] - s[i - 1])), i


def near_lossless_limit(x, y, dense_ppl: float | None = None, delta: float = NEAR_LOSSLESS_REL, *, y_se=None,
                        absolute: bool = False, dense_se: float = 0.0, level: float = 0.95,
                        axis: str = "sparsity", baseline_bits: float = 16.0, higher_is_better: bool = False,
                        collapse_ppl: float = COLLAPSE_PPL) -> NearLossless:
    """The Perspective's near-lossless limit of a measured curve: the largest compression ratio up to
    which the metric stays within `delta` of dense (the first crossing, so a noisy dip back below the
    threshold later does not extend it).

    x, axis, baseline_bits: as in `fit_ptp`. y: PPL (inf/NaN/overflow = collapsed, over any threshold),
    or with `higher_is_better=True` a score such as the average downstream accuracy (NaN = failed).
    delta: relative by default, threshold = dense × (1 + delta), with the default 1.5/5.47 ≈ 0.274
    (the Perspective's ΔPPL ≈ 1.5 on LLaMA-2-7B's 5.47, see `NEAR_LOSSLESS_REL`); `absolute=True`
    takes delta in PPL units (dense + 1.5, the printed rule). For downstream averages pass
    `higher_is_better=True, delta=DOWNSTREAM_TOLERANCE` (within 5% of dense).
    dense_ppl: the dense model's value on the same protocol. When None: the curve's own uncompressed
    point(s) (ratio ≤ 0, e.g. 16 bits), else its least-compressed point, which can only overstate
    dense (so the limit is then an upper estimate); `dense_source` says which.

    The curve is interpolated linearly in log metric between the measured ratios, anchored at ratio 0
    by dense when it has no point there. With `y_se` (per-point SEs, NaN = unknown), the interval runs
    from where the upper band log y + z·se/y crosses the threshold to where the lower band does,
    z for a two-sided `level`; `dense_se` adds the dense value's own SE to every comparison.
    """
    if not _positive(delta):
        raise MPTError(f"delta={delta!r} is not a positive tolerance",
                       f"pass e.g. delta={NEAR_LOSSLESS_REL:.3f} (relative, the default) or delta=1.5, absolute=True")
    if not (0 < level < 1 and math.isfinite(dense_se) and dense_se >= 0):
        raise MPTError(f"level={level}, dense_se={dense_se}", "pass level in (0, 1) and dense_se ≥ 0")
    x, y = _validate(x, y, axis, baseline_bits, ppl=not higher_is_better)
    s = bits_to_ratio(x, baseline_bits) if axis == "bits" else x
    with np.errstate(invalid="ignore"):
        gone = ~np.isfinite(y) | (y <= 0) if higher_is_better else collapsed(y, collapse_ppl)
    if gone.all():
        raise MPTError(f"all {y.size} points collapsed", "include the measured points at lower compression")
    se = np.zeros_like(y) if y_se is None else _check_se(y_se, y, gone)
    se_log = np.where(gone, 0.0, se / np.where(gone, 1.0, y))

    ref = np.zeros(y.size, dtype=bool)  # the points that define dense: compared with themselves, no SE
    if dense_ppl is not None:
        if not _positive(dense_ppl):
            raise MPTError(f"dense_ppl={dense_ppl!r} is not a positive number",
                           "pass the uncompressed model's value on the same protocol, or None to take it from the curve")
        dense, source, dense_se_log = float(dense_ppl), "given", dense_se / float(dense_ppl)
    else:
        base = ~gone & (s <= 0)
        ref = base if base.any() else ~gone & (s == s[~gone].min())
        dense = float(y[ref][0]) if ref.sum() == 1 else float(np.exp(np.mean(np.log(y[ref]))))  # replicates: geometric mean
        dense_se_log = float(np.sqrt(np.sum(se_log[ref] ** 2))) / int(ref.sum())
        where = float(x[ref][0])
        source = ("uncompressed point" if base.any() else
                  f"least-compressed point ({where:g}{' bits' if axis == 'bits' else ''}; overstates dense)")
    sign = -1.0 if higher_is_better else 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(gone, math.inf, sign * (np.log(np.where(gone, 1.0, y)) - math.log(dense)))
    d = np.where(ref, 0.0, d)
    var = np.where(ref, 0.0, se_log ** 2 + dense_se_log ** 2)

    # one node per distinct ratio: replicates (seeds) averaged in log space, SE of that mean
    nodes = np.unique(s)
    d_n = np.array([d[s == v].mean() for v in nodes])
    se_n = np.array([math.sqrt(var[s == v].sum()) / int((s == v).sum()) for v in nodes])
    if nodes[0] > 0:  # the uncompressed model is dense by definition
        nodes, d_n, se_n = np.append(0.0, nodes), np.append(0.0, d_n), np.append(0.0, se_n)

    limit_d = _threshold(dense, delta, absolute, higher_is_better)
    z = float(norm.ppf(0.5 + level / 2))
    limit, i = _first_over(nodes, d_n, limit_d)
    low, i_low = _first_over(nodes, d_n + z * se_n, limit_d)
    high, i_high = _first_over(nodes, d_n - z * se_n, limit_d)
    if i > 0 and not math.isfinite(d_n[i]):  # crossing somewhere in a gap that ends in a collapse
        high = max(high, float(nodes[i]))
    if i > 0:
        bracket = (float(nodes[i - 1]), float(nodes[i]))
    else:  # never over: within up to the last node; over at once: before the first
        bracket = (float(nodes[-1]), math.nan) if i < 0 else (math.nan, float(nodes[0]))
    return NearLossless(limit=limit, low=min(low, limit), high=max(high, limit), low_open=i_low == 0,
                        high_open=i_high < 0, threshold=dense * math.exp(sign * limit_d), dense=dense,
                        dense_source=source, delta=float(delta), absolute=absolute,
                        higher_is_better=higher_is_better, axis=axis, baseline_bits=baseline_bits,
                        bracket=bracket, s=nodes, damage=d_n)


def knee_vs_limit(fit: PTPFit, limit: NearLossless | None) -> str:
    """Where the PTP (knee) and the near-lossless limit disagree, from their intervals: "limit before
    knee" means the curve left the tolerance before it bends, so the knee alone overstates the safe
    range; "knee before limit", the reverse. Where the intervals are apart but an open end (a knee CI
    that runs to the edge of the s0 grid) could still join them, the verdict is "undetermined"."""
    if limit is None or not math.isfinite(limit.limit):
        return "no limit: dense value unknown"
    if not fit.has_ptp:
        return f"no knee; limit {limit.text()}"
    k = limit.relative(fit.s0)
    at_knee = f"{'score' if limit.higher_is_better else 'PPL'} at knee {k:.2f}× dense"
    (knee_lo, knee_hi), (lim_lo, lim_hi) = fit.s0_ci, (limit.low, limit.high)
    if lim_hi < knee_lo:
        side, open_end = "limit before knee", fit.ci_low_open or limit.high_open
    elif lim_lo > knee_hi:
        side, open_end = "knee before limit", fit.ci_high_open or limit.low_open
    else:
        return f"agree: intervals overlap ({at_knee})"
    return f"undetermined: {side}, but an interval is open-ended ({at_knee})" if open_end else f"{side} ({at_knee})"


# ----------------------------------------------------------------------------------------------
# many curves, compared with claims
# ----------------------------------------------------------------------------------------------

# (label, x, y) or (label, x, y, y_se): the optional fourth item holds per-point standard errors of y
Curve = tuple[str, Sequence[float], Sequence[float]] | tuple[str, Sequence[float], Sequence[float], Sequence[float]]


def _unpack(curve: Curve) -> tuple[str, Sequence[float], Sequence[float], Sequence[float] | None]:
    if len(curve) not in (3, 4):
        raise MPTError(f"a curve has {len(curve)} items", "pass curves as (label, x, y) or (label, x, y, y_se)")
    label, x, y, *rest = curve
    return label, x, y, (rest[0] if rest else None)


def _claim_for(claims: pd.DataFrame, family: str, label: str) -> pd.Series | None:
    """The claim row for a curve: an exact method match, a 'Method (...)' label, or the family's '*'."""
    rows = claims[claims["family"] == family]
    for _, row in rows.iterrows():
        if row["method"] != "*" and (label == row["method"] or label.startswith(f"{row['method']} ")):
            return row
    star = rows[rows["method"] == "*"]
    return star.iloc[0] if len(star) else None


def _axis_for(claims: pd.DataFrame | None, family: str, label: str) -> str:
    claim = _claim_for(claims, family, label) if claims is not None else None
    return str(claim["axis"]) if claim is not None else "sparsity"


def fit_all(curves: Mapping[str, Iterable[Curve]], claims: pd.DataFrame | None = None,
            **fit_kwargs) -> dict[str, dict[str, PTPFit]]:
    """Fit every curve of every family; the axis comes from the family's claim (default sparsity).
    A curve's fourth item, when present, is its per-point SEs (`fit_ptp(y_se=...)`)."""
    out: dict[str, dict[str, PTPFit]] = {}
    for family, items in curves.items():
        out[family] = {}
        for curve in items:
            label, x, y, se = _unpack(curve)
            out[family][label] = fit_ptp(x, y, y_se=se, axis=_axis_for(claims, family, label), **fit_kwargs)
    return out


Dense = float | Mapping[str, float] | None


def limits_all(curves: Mapping[str, Iterable[Curve]], claims: pd.DataFrame | None = None, dense: Dense = None,
               **limit_kwargs) -> dict[str, dict[str, NearLossless]]:
    """`near_lossless_limit` of every curve, axis as in `fit_all`. `dense`: one value for all curves, a
    {label: value} mapping (labels not in it fall back to the curve's own points), or None."""
    out: dict[str, dict[str, NearLossless]] = {}
    for family, items in curves.items():
        out[family] = {}
        for curve in items:
            label, x, y, se = _unpack(curve)
            value = dense.get(label) if isinstance(dense, Mapping) else dense
            out[family][label] = near_lossless_limit(x, y, value, y_se=se, axis=_axis_for(claims, family, label),
                                                     **limit_kwargs)
    return out


def _claim_in_s(claim: pd.Series, baseline_bits: float) -> tuple[float, float]:
    lo, hi = float(claim["lo"]), float(claim["hi"])
    if claim["axis"] == "bits":
        return float(bits_to_ratio(hi, baseline_bits)), float(bits_to_ratio(lo, baseline_bits))
    return lo, hi


def agreement(fit: PTPFit, claim: pd.Series | None, min_pre: int = 2, min_post: int = 2) -> str:
    """Compare one fit with a claimed PTP range, saying why when the data cannot test it."""
    if claim is None:
        return "no claim"
    if fit.verdict.startswith("too few points"):
        return "untestable: too few points"
    lo, hi = _claim_in_s(claim, fit.baseline_bits)
    uniq = np.unique(fit.s)
    reachable = (uniq[min_pre - 1], uniq[len(uniq) - min_post])  # where eq. 5 can place s0 at all
    if hi < reachable[0] or lo >= reachable[1]:
        return f"untestable: s0 needs ≥{min_pre} points before and ≥{min_post} after it; the claim leaves fewer"
    if not fit.has_ptp:
        return "disagrees: no PTP found"
    where = fit.s0_flat or (fit.s0, fit.s0)  # a flat profile only locates s0 within a stretch
    if lo <= where[0] and where[1] <= hi:
        return "agrees"
    if fit.s0_ci[0] <= hi and fit.s0_ci[1] >= lo:
        return "consistent: CI overlaps claim"
    return "disagrees: PTP " + ("later (more compression)" if fit.s0 > hi else "earlier (less compression)") \
        + " than claimed"


def _claim_text(claim: pd.Series | None) -> str:
    if claim is None:
        return ""
    unit = " bits" if claim["axis"] == "bits" else ""
    return f"{float(claim['lo']):g}–{float(claim['hi']):g}{unit}"


PTP_TABLE_COLUMNS = [
    "family", "curve", "axis", "n", "censored", "s0", "s0_lo", "s0_hi", "ci_low_open", "ci_high_open", "s0_ci",
    "ptp", "ptp_lo", "ptp_hi", "ptp_ci", "s0_flat", "has_ptp", "delta_bic", "verdict", "claim", "agreement",
    "dense", "dense_source", "limit", "limit_low", "limit_high", "limit_low_open", "limit_high_open", "limit_text",
    "knee_x_dense", "knee_vs_limit"]


def ptp_table(curves: Mapping[str, Iterable[Curve]], claims: pd.DataFrame,
              fits: Mapping[str, Mapping[str, PTPFit]] | None = None, *,
              limits: Mapping[str, Mapping[str, NearLossless]] | None = None, dense: Dense = None,
              delta: float = NEAR_LOSSLESS_REL, absolute: bool = False, **fit_kwargs) -> pd.DataFrame:
    """One row per curve: PTP (ratio and native axis), CI, verdict, the claim and the agreement, and
    beside the knee the near-lossless limit (`limits`, else `limits_all(curves, claims, dense, delta=...,
    absolute=...)`) with `knee_vs_limit`.

    Ratio-axis columns: s0, s0_lo, s0_hi (open ends flagged by ci_low_open / ci_high_open and shown
    as "≤" / "≥" in the text column s0_ci), limit, limit_low, limit_high (flags limit_low_open /
    limit_high_open). Native-axis text (bits for quantization): ptp_ci, limit_text. dense and
    dense_source say what the limit was measured against, knee_x_dense is PPL(s0)/dense on the
    measured curve.
    """
    fits = fits if fits is not None else fit_all(curves, claims, **fit_kwargs)
    limits = limits if limits is not None else limits_all(curves, claims, dense, delta=delta, absolute=absolute)
    rows = []
    for family, by_label in fits.items():
        for label, fit in by_label.items():
            claim = _claim_for(claims, family, label)
            lim = limits.get(family, {}).get(label)
            native = fit.ptp_bits if fit.axis == "bits" else fit.s0
            native_ci = fit.ptp_bits_ci if fit.axis == "bits" else fit.s0_ci
            none = lim is None
            rows.append({"family": family, "curve": label, "axis": fit.axis, "n": fit.n_points,
                         "censored": fit.n_censored, "s0": fit.s0, "s0_lo": fit.s0_ci[0], "s0_hi": fit.s0_ci[1],
                         "ci_low_open": fit.ci_low_open, "ci_high_open": fit.ci_high_open,
                         "s0_ci": fit.s0_ci_text,
                         "ptp": native if fit.has_ptp else math.nan,
                         "ptp_lo": native_ci[0] if fit.has_ptp else math.nan,
                         "ptp_hi": native_ci[1] if fit.has_ptp else math.nan,
                         "ptp_ci": fit.ptp_ci_text if fit.has_ptp else "",
                         "s0_flat": "" if fit.s0_flat is None else f"{fit.s0_flat[0]:.3f}–{fit.s0_flat[1]:.3f}",
                         "has_ptp": fit.has_ptp, "delta_bic": fit.delta_bic, "verdict": fit.verdict,
                         "claim": _claim_text(claim), "agreement": agreement(fit, claim),
                         "dense": math.nan if none else lim.dense, "dense_source": "" if none else lim.dense_source,
                         "limit": math.nan if none else lim.limit, "limit_low": math.nan if none else lim.low,
                         "limit_high": math.nan if none else lim.high,
                         "limit_low_open": False if none else lim.low_open,
                         "limit_high_open": False if none else lim.high_open,
                         "limit_text": "" if none else lim.text(),
                         "knee_x_dense": lim.relative(fit.s0) if not none and fit.has_ptp else math.nan,
                         "knee_vs_limit": knee_vs_limit(fit, lim)})
    return pd.DataFrame(rows, columns=PTP_TABLE_COLUMNS)  # the columns also when no curve could be fitted
