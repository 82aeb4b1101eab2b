"""How a metric moves with the compression ratio r: linear, quadratic or exponential, by AIC/BIC.

"Compression Laws for Large Language Models" (arXiv:2504.04342) reports that test cross-entropy
rises quadratically while downstream accuracy falls linearly with r. Each curve (one model, method
and corpus or task, no recovery) is fitted on the metric's own scale by

    linear       y = a + b·r                (OLS)
    quadratic    y = a + b·r + c·r²         (OLS)
    exponential  y = a·exp(b·r)             (least squares on y, started from the log-linear fit)

and the shapes are ranked by AIC, AICc (its small-sample correction, harsh at 7 points: +20 for the
quadratic against +8 for a line) and BIC, from the Gaussian likelihood of the residuals (same
response scale for all three, so the criteria are comparable). The claims use BIC.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy.optimize import OptimizeWarning, curve_fit

from mpt_utils.errors import MPTError

SHAPES = ("linear", "quadratic", "exponential")
N_COEF = {"linear": 2, "quadratic": 3, "exponential": 2}


def _criteria(rss: float, n: int, k: int) -> tuple[float, float, float]:
    """Gaussian AIC, AICc and BIC; k counts coefficients plus the noise variance."""
    rss = max(rss, 1e-300)
    ll = -0.5 * n * (math.log(2 * math.pi * rss / n) + 1)
    aic = -2 * ll + 2 * k
    aicc = aic + 2 * k * (k + 1) / (n - k - 1) if n - k - 1 > 0 else math.inf
    return aic, aicc, -2 * ll + k * math.log(n)


def _fit_shape(shape: str, r: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    if shape in ("linear", "quadratic"):
        x = np.column_stack([r ** p for p in range(N_COEF[shape])])
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        resid = y - x @ coef
        return coef, float(resid @ resid)
    if np.any(y <= 0):  # a sign change cannot be an exponential
        return np.array([math.nan, math.nan]), math.inf
    b0, la0 = np.polyfit(r, np.log(y), 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            coef, _ = curve_fit(lambda t, a, b: a * np.exp(b * t), r, y, p0=(math.exp(la0), b0), maxfev=20000)
    except RuntimeError:  # no convergence: keep the log-linear start
        coef = np.array([math.exp(la0), b0])
    resid = y - coef[0] * np.exp(coef[1] * r)
    return np.asarray(coef, dtype=float), float(resid @ resid)


def predict_shape(shape: str, coef, r) -> np.ndarray:
    r = np.asarray(r, dtype=float)
    if shape == "exponential":
        return coef[0] * np.exp(coef[1] * r)
    return sum(c * r ** p for p, c in enumerate(coef))


def compare_shapes(r, y, label: str = "") -> pd.DataFrame:
    """One row per shape: coefficients, RSS, AIC, AICc, BIC, ΔAICc/ΔBIC to the best, and which wins."""
    r, y = np.asarray(r, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    ok = np.isfinite(y)
    r, y = r[ok], y[ok]
    if r.size != y.size or np.unique(r).size < 4:
        raise MPTError(f"{label or 'curve'}: {np.unique(r).size} distinct ratios with a finite value; telling a "
                       "quadratic from a line needs at least 4", "measure more ratios (include r=0, the dense model)")
    rows = []
    for shape in SHAPES:
        coef, rss = _fit_shape(shape, r, y)
        aic, aicc, bic = _criteria(rss, r.size, N_COEF[shape] + 1)
        rows.append({"curve": label, "shape": shape, "coef": [float(c) for c in coef], "rss": rss, "n": int(r.size),
                     "aic": aic, "aicc": aicc, "bic": bic})
    out = pd.DataFrame(rows)
    for crit in ("aic", "aicc", "bic"):
        out[f"d_{crit}"] = out[crit] - out[crit].min()
        out[f"best_{crit}"] = out[f"d_{crit}"] == 0
    return out


def shape_verdicts(curves: pd.DataFrame, *, by: list[str], x: str = "ratio", y: str = "value") -> pd.DataFrame:
    """`compare_shapes` on every group of `curves` (e.g. by model, method, data); one row per group
    naming the shape preferred by AIC, AICc and BIC, with the BIC margin over the runner-up."""
    rows = []
    for key, group in curves.groupby(by, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        label = " / ".join(map(str, key))
        try:
            table = compare_shapes(group[x], group[y], label)
        except MPTError as err:
            rows.append({**dict(zip(by, key)), "best_aic": None, "best_aicc": None, "best_bic": None,
                         "bic_margin": math.nan, "note": err.message})
            continue
        ranked = table.sort_values("bic")
        rows.append({**dict(zip(by, key)), "best_aic": table.loc[table.best_aic, "shape"].iloc[0],
                     "best_aicc": table.loc[table.best_aicc, "shape"].iloc[0],
                     "best_bic": ranked["shape"].iloc[0], "bic_margin": float(ranked["bic"].iloc[1] - ranked["bic"].iloc[0]),
                     "n": int(table["n"].iloc[0]), "note": ""})
    return pd.DataFrame(rows)
