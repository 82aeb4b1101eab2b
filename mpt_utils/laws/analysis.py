"""From the sweep's rows to the notebook's tables: law fits per method and metric kind, r-shape
verdicts, bits per byte of the dense models, and the claim-by-claim conclusion."""

from __future__ import annotations

import math

import pandas as pd

from mpt_utils.errors import MPTError
from mpt_utils.laws import claims
from mpt_utils.laws.critical import critical_table
from mpt_utils.laws.fit import LawFit, fit_law
from mpt_utils.laws.points import KINDS, curves
from mpt_utils.laws.shape import shape_verdicts


def fit_laws(points: pd.DataFrame) -> dict[tuple[str, str], LawFit]:
    """One OLS fit of the law per (method, kind). A factor that does not vary in the data (one RFT
    budget, so no γ) is left out rather than reported as an unidentified exponent."""
    fits: dict[tuple[str, str], LawFit] = {}
    for (method, kind), grp in points.groupby(["method", "kind"]):
        grp = grp[grp["value"] > 0]
        terms = ["alpha"] + (["beta"] if grp["ratio"].nunique() > 1 else []) \
            + (["gamma"] if grp["tokens"].nunique() > 1 else [])
        try:
            fits[(method, kind)] = fit_law(grp["L0"], grp["ratio"], grp["tokens"], grp["value"], terms=terms,
                                           label=f"{method}/{kind}")
        except MPTError as err:  # too few points for this pair: reported by its absence
            print(f"law fit {method}/{kind} skipped: {err.message}")
    return fits


def law_table(fits: dict[tuple[str, str], LawFit]) -> pd.DataFrame:
    """Exponents with standard errors and 95% intervals, n and R², one row per (method, kind, term)."""
    if not fits:
        return pd.DataFrame()
    out = pd.concat([f.table().assign(method=m, kind=k) for (m, k), f in fits.items()], ignore_index=True)
    return out[["method", "kind", "term", "estimate", "se", "ci_low", "ci_high", "t", "n", "r2"]]


def shape_tables(points: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per kind: the r-shape preferred by AICc and BIC for each no-RFT curve."""
    return {kind: shape_verdicts(curves(points, kind, 0), by=["model", "method", "item"]) for kind in KINDS
            if (points["kind"] == kind).any()}


def bpb_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Dense models' intrinsic quality per corpus: nats/token, bits/byte, tokens per byte."""
    dense = rows[(rows["method"] == "dense") & (rows["kind"] == "ce")]
    if dense.empty:
        return pd.DataFrame()
    t = dense.pivot_table(index=["model", "data"], columns="metric", values="value", aggfunc="first")
    meta = dense[dense["metric"] == "bpb"].set_index(["model", "data"])[["n_tokens", "n_bytes", "n_params"]]
    t = t.join(meta)
    t["bytes_per_token"] = t["n_bytes"] / t["n_tokens"]
    return t.rename(columns={"ce": "ce_nats_per_token", "bpb": "bits_per_byte"}).reset_index()


def conclusions(points: pd.DataFrame, rows: pd.DataFrame, fits: dict[tuple[str, str], LawFit],
                shapes: dict[str, pd.DataFrame], critical: pd.DataFrame | None = None) -> pd.DataFrame:
    """Each published claim with our verdict and the numbers behind it."""
    out = []
    if "intrinsic" in shapes:
        out.append(claims.shape_claim(shapes["intrinsic"], "quadratic",
                                      "test cross-entropy rises quadratically with r"))
    if "extrinsic" in shapes:
        out.append(claims.shape_claim(shapes["extrinsic"], "linear", "downstream accuracy falls linearly with r"))
    out.append(claims.law_claim(fits))
    out.append(claims.calibration_free_claim(points)[0])
    out.append(claims.rft_claim(points))
    speed = rows[rows["kind"] == "speed"] if "kind" in rows else pd.DataFrame()
    n_params = rows[rows["method"] == "dense"].groupby("model")["n_params"].max().to_dict() if "n_params" in rows else {}
    out.append(claims.speed_claim(speed, n_params))
    if critical is not None and not critical.empty:
        parts = [f"{r.model} {r.method} {r.data}: r_c={r.critical_ratio:.2f} vs PTP "
                 f"{'none' if math.isnan(r.ptp) else f'{r.ptp:.2f}'}" for r in critical.itertuples()]
        found = int(critical["critical_ratio"].notna().sum())
        verdict = "holds" if found > len(critical) / 2 else "does not hold"
        out.append({"claim": f"beyond a critical ratio RFT recovers < {critical['threshold'].iloc[0]:.0%} of the "
                             "loss gap (eq. 5 PTP beside it)", "verdict": verdict,
                    "evidence": f"crossing found on {found} of {len(critical)} curves; " + "; ".join(parts)})
    return pd.DataFrame(out)


def analyze(rows: pd.DataFrame, threshold: float = 0.5) -> dict[str, object]:
    """Everything the notebook shows, from the sweep's rows."""
    from mpt_utils.laws.points import law_points

    points = law_points(rows)
    fits = fit_laws(points)
    shapes = shape_tables(points)
    crit = critical_table(points, threshold) if (points["tokens"] > 0).any() else pd.DataFrame()
    return {"points": points, "fits": fits, "law_table": law_table(fits), "shapes": shapes, "critical": crit,
            "bpb": bpb_table(rows), "calibration": claims.calibration_free_claim(points)[1],
            "conclusions": conclusions(points, rows, fits, shapes, crit)}
