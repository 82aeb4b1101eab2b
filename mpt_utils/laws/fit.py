"""The compression law of "Compression Laws for Large Language Models" (Sengupta, Chaudhary,
Chakraborty; arXiv:2504.04342), fitted by ordinary least squares in log space:

    L = L0^α · (1 + r)^β · (1 + 1/(D + 1))^γ
    log L = α·log L0 + β·log(1 + r) + γ·log(1 + 1/(D + 1))

L0 is the dense model's value of the metric, r the compression ratio, D the number of recovery
fine-tuning tokens (D = 0: no recovery, the last factor is 2^γ; D → ∞: it tends to 1). The paper's
form has no intercept, so none is fitted by default (`intercept=True` adds one, for comparison).
Standard errors are the classical OLS ones, s²(XᵀX)⁻¹ with s² = RSS/(n − p); R² is the centred one
(1 − RSS/TSS about the mean of log L), which does not reward the missing intercept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from mpt_utils.errors import MPTError

TERMS = ("alpha", "beta", "gamma")


def law_design(l0, r, d) -> np.ndarray:
    """The regressors [log L0, log(1+r), log(1+1/(D+1))], one row per point."""
    l0, r, d = (np.asarray(v, dtype=float).ravel() for v in (l0, r, d))
    if not (l0.size == r.size == d.size):
        raise MPTError(f"L0, r and D differ in length ({l0.size}, {r.size}, {d.size})", "pass one value per point")
    if np.any(l0 <= 0) or np.any(r < 0) or np.any(d < 0):
        raise MPTError("the law needs L0 > 0, r >= 0 and D >= 0", "drop points with a non-positive metric")
    return np.column_stack([np.log(l0), np.log1p(r), np.log1p(1.0 / (d + 1.0))])


def law_predict(coef: Sequence[float], l0, r, d) -> np.ndarray:
    """L predicted by exponents (α, β, γ) (and an intercept as a 4th value, if fitted)."""
    x = law_design(l0, r, d)
    c = np.asarray(coef, dtype=float)
    out = x @ c[:3] + (c[3] if c.size > 3 else 0.0)
    return np.exp(out)


@dataclass
class LawFit:
    """One OLS fit: exponents with standard errors and 95% intervals, R², AIC/BIC (Gaussian on log L)."""

    coef: dict[str, float]
    se: dict[str, float]
    ci: dict[str, tuple[float, float]]
    r2: float
    resid_sd: float
    n: int
    aic: float
    bic: float
    intercept: bool
    label: str = ""
    cov: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)), repr=False)

    def table(self) -> pd.DataFrame:
        """Tidy rows: term, estimate, se, 95% CI, t, plus n and R² of the fit."""
        rows = [{"fit": self.label, "term": t, "estimate": self.coef[t], "se": self.se[t], "ci_low": self.ci[t][0],
                 "ci_high": self.ci[t][1], "t": self.coef[t] / self.se[t] if self.se[t] > 0 else math.nan,
                 "n": self.n, "r2": self.r2} for t in self.coef]
        return pd.DataFrame(rows)

    def predict(self, l0, r, d) -> np.ndarray:
        return law_predict([self.coef[t] for t in self.coef], l0, r, d)


def _information(rss: float, n: int, k: int) -> tuple[float, float]:
    """Gaussian AIC and BIC from an RSS; `k` counts the fitted coefficients plus the noise variance."""
    ll = -0.5 * n * (math.log(2 * math.pi * max(rss, 1e-300) / n) + 1)
    return -2 * ll + 2 * k, -2 * ll + k * math.log(n)


def ols(x: np.ndarray, y: np.ndarray, names: Sequence[str], label: str = "", level: float = 0.95) -> LawFit:
    """OLS of y on the columns of x, with classical standard errors."""
    n, p = x.shape
    if n <= p:
        raise MPTError(f"{n} points cannot fit {p} coefficients with standard errors ({label or 'law'})",
                       f"measure at least {p + 1} points (more ratios or recovery budgets)")
    if np.linalg.matrix_rank(x) < p:
        raise MPTError(f"the regressors of {label or 'the law'} are collinear ({', '.join(names)})",
                       "vary every factor: several base models for α, several ratios for β, several D for γ; "
                       "or fit with fewer terms")
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ coef
    rss = float(resid @ resid)
    s2 = rss / (n - p)
    cov = s2 * np.linalg.inv(x.T @ x)
    se = np.sqrt(np.clip(np.diag(cov), 0, None))
    q = stats.t.ppf(0.5 + level / 2, n - p)
    tss = float(np.sum((y - y.mean()) ** 2))
    aic, bic = _information(rss, n, p + 1)
    return LawFit(coef=dict(zip(names, map(float, coef))), se=dict(zip(names, map(float, se))),
                  ci={t: (float(c - q * s), float(c + q * s)) for t, c, s in zip(names, coef, se)},
                  r2=1.0 - rss / tss if tss > 0 else math.nan, resid_sd=math.sqrt(s2), n=n, aic=aic, bic=bic,
                  intercept="intercept" in names, label=label, cov=cov)


def fit_law(l0, r, d, value, *, terms: Sequence[str] = TERMS, intercept: bool = False, label: str = "") -> LawFit:
    """Fit log L = α log L0 + β log(1+r) + γ log(1+1/(D+1)) [+ c] by OLS. `terms` may drop factors
    that do not vary in the data (e.g. ("beta", "gamma") for a single base model with an intercept)."""
    value = np.asarray(value, dtype=float).ravel()
    x = law_design(l0, r, d)
    if value.size != x.shape[0]:
        raise MPTError(f"{value.size} values for {x.shape[0]} points", "pass one value per point")
    ok = np.isfinite(value) & (value > 0)
    if not ok.all():  # a collapsed model (inf CE) or a zero accuracy has no logarithm
        x, value = x[ok], value[ok]
    unknown = [t for t in terms if t not in TERMS]
    if unknown:
        raise MPTError(f"unknown law terms {unknown}", f"use a subset of {TERMS}")
    cols = [TERMS.index(t) for t in terms]
    x = x[:, cols]
    names = list(terms)
    if intercept:
        x, names = np.column_stack([x, np.ones(x.shape[0])]), [*names, "intercept"]
    return ols(x, np.log(value), names, label)


def fit_law_frame(frame: pd.DataFrame, *, value: str = "value", l0: str = "L0", ratio: str = "ratio",
                  tokens: str = "tokens", label: str = "", **kwargs) -> LawFit:
    """`fit_law` on a tidy frame with columns L0, ratio, tokens and the metric value."""
    missing = [c for c in (value, l0, ratio, tokens) if c not in frame.columns]
    if missing:
        raise MPTError(f"law frame lacks columns {missing}", "build it with mpt_utils.laws.law_points")
    return fit_law(frame[l0], frame[ratio], frame[tokens], frame[value], label=label, **kwargs)
