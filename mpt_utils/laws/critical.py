"""The critical compression ratio of recovery fine-tuning, next to the Phase Transition Point.

"Compression Laws for Large Language Models" (arXiv:2504.04342) describes a critical ratio beyond
which RFT can no longer bring a pruned model back. We make it measurable: at each ratio r, the share
of the loss gap that RFT with D tokens closes,

    recovered(r) = (L_pruned(r) − L_rft(r)) / (L_pruned(r) − L0)        (cross-entropy, L0 dense)

and the critical ratio is where recovered(r) first falls below `threshold` (linear interpolation
between measured ratios). The PTP comes from the suite's eq. 5 fit (`mpt_utils.ptp.fit_ptp`, from
"Phase Transitions in Large Language Model Compression: A Perspective") on the same no-RFT curve in
perplexity (exp of the cross-entropy), so the two thresholds are read off one set of measurements.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from mpt_utils.laws.points import curves


def recovery_fraction(pruned, rft, dense) -> np.ndarray:
    """(pruned − rft) / (pruned − dense); NaN where pruning left no gap (≤ 1e-9 nats)."""
    pruned, rft, dense = (np.asarray(v, dtype=float) for v in (pruned, rft, dense))
    gap = pruned - dense
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gap > 1e-9, (pruned - rft) / gap, np.nan)


def crossing(ratios, fractions, threshold: float = 0.5) -> tuple[float, str]:
    """First ratio where `fractions` drops below `threshold` (interpolated), and how it was found."""
    r, f = np.asarray(ratios, dtype=float), np.asarray(fractions, dtype=float)
    keep = np.isfinite(f)
    r, f = r[keep], f[keep]
    order = np.argsort(r)
    r, f = r[order], f[order]
    if r.size == 0:
        return math.nan, "no ratio with a measurable gap"
    if f[0] < threshold:
        return float(r[0]), f"already below {threshold:.0%} at the smallest ratio r={r[0]:g}"
    for i in range(1, r.size):
        if f[i] < threshold:
            t = (f[i - 1] - threshold) / (f[i - 1] - f[i])
            return float(r[i - 1] + t * (r[i] - r[i - 1])), "interpolated"
    return math.nan, f"RFT recovers >= {threshold:.0%} up to r={r[-1]:g}: no critical ratio in range"


def critical_table(points: pd.DataFrame, threshold: float = 0.5, tokens: int | None = None) -> pd.DataFrame:
    """Per (model, method, corpus): recovered share at every RFT ratio, the critical ratio at the
    largest budget D (or `tokens`), and the eq. 5 PTP of the no-RFT perplexity curve."""
    from mpt_utils.ptp import fit_ptp

    intr = points[points["kind"] == "intrinsic"]
    base = curves(points, "intrinsic", 0)
    rows = []
    for (model, method, item), grp in intr[intr["tokens"] > 0].groupby(["model", "method", "item"]):
        d = int(grp["tokens"].max()) if tokens is None else int(tokens)
        rft = grp[grp["tokens"] == d].set_index("ratio")["value"]
        curve = base[(base["model"] == model) & (base["method"] == method) & (base["item"] == item)]
        pr = curve.set_index("ratio")["value"]
        shared = sorted(set(rft.index) & set(pr.index) - {0.0})
        frac = recovery_fraction(pr[shared].values, rft[shared].values, curve["L0"].iloc[0])
        r_crit, how = crossing(shared, frac, threshold)
        fit = fit_ptp(curve["ratio"].values, np.exp(curve["value"].values))
        row: dict[str, Any] = {"model": model, "method": method, "data": item, "tokens": d,
                               "threshold": threshold, "critical_ratio": r_crit, "critical_note": how,
                               "ptp": fit.s0 if fit.has_ptp else math.nan,
                               "ptp_ci": fit.s0_ci if fit.has_ptp else (math.nan, math.nan),
                               "ptp_verdict": fit.verdict, "ptp_points": fit.n_points}
        row.update({f"recovered@{r:g}": float(f) for r, f in zip(shared, frac)})
        rows.append(row)
    return pd.DataFrame(rows)
