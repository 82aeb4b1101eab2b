"""The published claims of "Compression Laws for Large Language Models" (Sengupta, Chaudhary,
Chakraborty; arXiv:2504.04342), each checked against our measurements with a computed verdict:
"holds", "does not hold" or "inconclusive" (the evidence is too noisy or missing to say).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from mpt_utils.laws.critical import recovery_fraction
from mpt_utils.laws.points import curves


def _row(claim: str, verdict: str, evidence: str) -> dict[str, str]:
    return {"claim": claim, "verdict": verdict, "evidence": evidence}


def shape_claim(verdicts: pd.DataFrame, expected: str, claim: str) -> dict[str, str]:
    """Holds when `expected` is the BIC-preferred shape of most curves."""
    got = verdicts.dropna(subset=["best_bic"])
    if got.empty:
        return _row(claim, "inconclusive", "no curve with enough ratios")
    counts = got["best_bic"].value_counts()
    wins = int(counts.get(expected, 0))
    verdict = "holds" if wins > len(got) / 2 else "does not hold"
    detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
    others = "; ".join(f"{c.upper()}: " + ", ".join(f"{k}: {v}" for k, v in got[f"best_{c}"].value_counts().items())
                       for c in ("aic", "aicc"))
    return _row(claim, verdict, f"BIC prefers {detail} of {len(got)} curves ({others})")


def paired_verdict(diff: np.ndarray, z: float = 2.0) -> tuple[str, float, float]:
    """Mean of paired differences, its standard error, and the verdict at |mean| > z·SE."""
    diff = diff[np.isfinite(diff)]
    if diff.size < 2:
        return "inconclusive", (float(diff.mean()) if diff.size else math.nan), math.nan
    mean, se = float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(diff.size))
    if mean > z * se:
        return "holds", mean, se
    if mean < -z * se:
        return "does not hold", mean, se
    return "inconclusive", mean, se


def calibration_free_claim(points: pd.DataFrame, free: str = "random_prunenet", based: str = "slicegpt"
                           ) -> tuple[dict[str, str], pd.DataFrame]:
    """Calibration-free beats calibration-based on downstream accuracy: per task, accuracy of `free`
    minus `based` on the same model at the same nominal ratio, without RFT."""
    ext = points[(points["kind"] == "extrinsic") & (points["tokens"] == 0)]
    a = ext[ext["method"] == free].set_index(["model", "item", "ratio"])["value"]
    b = ext[ext["method"] == based].set_index(["model", "item", "ratio"])["value"]
    both = pd.concat([a.rename("free"), b.rename("based")], axis=1).dropna()
    claim = "calibration-free compression beats calibration-based on downstream tasks"
    if both.empty:
        return _row(claim, "inconclusive", f"no model has both {free} and {based} points"), pd.DataFrame()
    both["diff"] = both["free"] - both["based"]
    per_task = []
    for task, grp in both.groupby(level="item"):
        verdict, mean, se = paired_verdict(grp["diff"].to_numpy())
        per_task.append({"task": task, "mean_acc_diff": mean, "se": se, "n_ratios": len(grp),
                         "free_wins": int((grp["diff"] > 0).sum()), "verdict": verdict})
    per_task = pd.DataFrame(per_task)
    verdict, mean, se = paired_verdict(both["diff"].to_numpy())
    tally = per_task["verdict"].value_counts().to_dict()
    return _row(claim, verdict, f"{free} − {based} accuracy {mean:+.3f} ± {se:.3f} (mean ± SE over "
                f"{len(both)} task×ratio pairs, same nominal ratio); per task: {tally}"), per_task


def rft_claim(points: pd.DataFrame) -> dict[str, str]:
    """RFT restores intrinsic loss more than downstream accuracy: the share of the damage closed by
    the largest budget, intrinsic vs extrinsic, over every (model, method, item, ratio)."""
    shares = {}
    for kind in ("intrinsic", "extrinsic"):
        sel = points[points["kind"] == kind]
        if sel.empty or (sel["tokens"] == 0).all():
            continue
        d = int(sel["tokens"].max())
        rft = sel[sel["tokens"] == d].set_index(["model", "method", "item", "ratio"])
        base = sel[sel["tokens"] == 0].set_index(["model", "method", "item", "ratio"])
        j = rft[["value"]].join(base[["value", "L0"]], rsuffix="_pruned", how="inner")
        sign = 1.0 if kind == "intrinsic" else -1.0  # CE: lower is better; accuracy: higher is better
        f = recovery_fraction(sign * j["value_pruned"], sign * j["value"], sign * j["L0"])
        shares[kind] = (float(np.nanmedian(f)) if np.isfinite(f).any() else math.nan, int(np.isfinite(f).sum()), d)
    claim = "RFT recovers intrinsic loss more than downstream accuracy"
    if len(shares) < 2:
        return _row(claim, "inconclusive", "RFT points missing for one kind")
    if any(math.isnan(v[0]) for v in shares.values()):
        return _row(claim, "inconclusive", "pruning left no measurable gap to recover for one kind")
    (fi, ni, di), (fe, ne, de) = shares["intrinsic"], shares["extrinsic"]
    verdict = "holds" if fi > fe else "does not hold"
    return _row(claim, verdict, f"median share of the gap closed: cross-entropy {fi:.0%} (n={ni}, D={di}) vs "
                f"accuracy {fe:.0%} (n={ne}, D={de})")


def speed_claim(speed: pd.DataFrame, n_params: dict[str, int]) -> dict[str, str]:
    """Larger models gain more inference speed-up at high ratios (the paper: >7B up to 60 %,
    small models little): speed-up at the highest ratio measured for every model."""
    claim = "inference speed-up at high compression grows with model size (small models gain little)"
    if speed.empty:
        return _row(claim, "inconclusive", "no speed points")
    top = speed[speed["ratio"] > 0].sort_values("ratio").groupby(["model", "method"]).tail(1)
    if top["model"].nunique() < 2:
        parts = [f"{r.model} {r.method} r={r.ratio:g}: ×{r.value:.2f}" for r in top.itertuples()]
        return _row(claim, "inconclusive", "one model size only; " + "; ".join(parts))
    best = top.groupby("model")["value"].max()
    order = sorted(best.index, key=lambda m: n_params.get(m, 0))
    verdict = "holds" if best[order[-1]] > best[order[0]] else "does not hold"
    return _row(claim, verdict, "; ".join(f"{m} ({n_params.get(m, 0) / 1e6:.0f}M): best ×{best[m]:.2f}" for m in order))


def law_claim(fits: dict[tuple[str, str], object]) -> dict[str, str]:
    """Signs of β: loss rises (β > 0 for cross-entropy) and accuracy falls (β < 0) with r."""
    claim = "the law fits: β > 0 for cross-entropy, β < 0 for accuracy"
    if not fits:
        return _row(claim, "inconclusive", "no fit")
    ok, parts = True, []
    for (method, kind), fit in fits.items():
        b, se = fit.coef.get("beta", math.nan), fit.se.get("beta", math.nan)
        good = (b - 2 * se > 0) if kind == "intrinsic" else (b + 2 * se < 0)
        ok &= bool(good)
        parts.append(f"{method}/{kind}: β={b:.2f}±{se:.2f}, R²={fit.r2:.2f}")
    return _row(claim, "holds" if ok else "does not hold", "; ".join(parts))


def intrinsic_delta(points: pd.DataFrame) -> pd.DataFrame:
    """Cross-entropy increase over dense at each ratio (no RFT), for the shape comparison tables."""
    c = curves(points, "intrinsic", 0)
    c["delta"] = c["value"] - c["L0"]
    return c
