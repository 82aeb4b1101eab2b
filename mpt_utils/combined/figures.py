"""Grids of combined recipes, their tables and paper-quality figures, with the numbers they show.

From the rows `grid_point` stores (one point per recipe):

- `grid_recipes`: the recipes of a two-axis grid (e.g. Wanda sparsity × GGUF scheme, the Table 10
  analogue), a zero setting meaning "no step on that axis";
- `points_table`: one line per point with its coordinates on the planner's axes (lowrank ratio,
  prune sparsity, bits and quant = 1 − bits/16), PPL ± SE, KL ± SE and the three size columns (bytes
  and the fraction of dense each keeps);
- `frontier`: the cost-effective frontier, the lowest PPL per size budget, under a chosen size
  accounting (the paper's nominal count or the artifact really written);
- `transition_lines`: along every row and every column of a 2-D grid, where the curve crosses its
  phase transition: the eq. 5 PTP (`fit_ptp`, weighted by the SEs) where the line has the points
  and the fit finds one, else the near-lossless limit (`near_lossless_limit`) of that line against
  its own uncompressed end, each with its interval;
- `compression_limit`: the two families of lines bound a safe region of the grid; its most
  compressed point (where the lines intersect, when both bind there) is the compression limit,
  given as compression under each accounting (the measured sizes interpolated over the grid), with
  the interval from the lines' low and high ends. Computed, not only drawn;
- `size_conclusion`: what "~10 % of the original size" (the Perspective's headline) is in real bytes;
- `fig_surface`, `fig_frontier`: the PPL surface and contour over two axes with the transition
  lines and the limit (like Figs. 6–7 of the Perspective), and the frontier under both accountings.

Axes: "lowrank", "prune" and "quant" are compression ratios in [0, 1); quant is drawn in bits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from mpt_utils.combined.build import BASELINE_BITS, recipe_settings
from mpt_utils.errors import MPTError
from mpt_utils.ptp import NEAR_LOSSLESS_REL, collapsed, fit_ptp, near_lossless_limit

AXES = ("lowrank", "prune", "quant")
AXIS_LABELS = {"lowrank": "low-rank parameter reduction", "prune": "sparsity", "quant": "bits per weight (nominal)"}
ACCOUNTINGS = ("nominal", "artifact", "sparse")
ACCOUNTING_LABELS = {"nominal": "nominal size (the paper's count)", "artifact": "real artifact size",
                     "sparse": "sparse-encoding size"}
SIZE_METRICS = ("nominal_bytes", "artifact_bytes", "sparse_bytes", "compression_nominal", "compression_artifact",
                "compression_sparse", "bits_per_weight")


# -- grids --------------------------------------------------------------------------------------------
def _step(method: str, value: Any, options: Mapping[str, Any] | None = None):
    """One axis step of a grid: a GGUF scheme, a torch quantizer's bits (16: none) or a ratio (0: none)."""
    from mpt_utils.recipe import Bits, Step, method_families

    family = method_families().get(method)
    if family is None:
        raise MPTError(f"unknown method {method!r} for a grid axis", "use a recipe method, e.g. wanda, gptq, gguf")
    if family == "gguf":
        return Step.of("gguf", str(value))
    if family == "quant":
        return None if float(value) >= BASELINE_BITS else Step.of(method, Bits(int(value)), **dict(options or {}))
    return None if float(value) == 0 else Step.of(method, float(value), **dict(options or {}))


def grid_recipes(first: str, first_values: Sequence[Any], second: str, second_values: Sequence[Any], *,
                 first_options: Mapping[str, Any] | None = None,
                 second_options: Mapping[str, Any] | None = None) -> list[str]:
    """Recipes of the grid first_values × second_values (row-major), e.g.
    grid_recipes("wanda", [0, 0.5], "gguf", ["F16", "Q4_K_M"]) -> ["gguf:F16", "gguf:Q4_K_M",
    "wanda@0.5 > gguf:F16", "wanda@0.5 > gguf:Q4_K_M"]. A zero ratio (16 bits for a torch
    quantizer) leaves that axis out; steps are written in the recipe's stage order, each axis's
    steps with its method options (e.g. first_options={"granularity": "part"} for ASVD)."""
    from mpt_utils.recipe import Recipe

    out = []
    for a in first_values:
        for b in second_values:
            steps = [s for s in (_step(first, a, first_options), _step(second, b, second_options)) if s is not None]
            out.append(str(Recipe(tuple(sorted(steps, key=lambda s: s.stage)))))
    return list(dict.fromkeys(out))


def points_table(rows: pd.DataFrame | Sequence[Mapping[str, Any]], recipes: Sequence[str] | None = None,
                 grid: str | None = None) -> pd.DataFrame:
    """One line per grid point (family "combined", method "recipe") of `rows`: `recipe_settings`,
    ppl, ppl_se, kl, kl_se, same_top, the three sizes with compression_* and kept_* (= 1 −
    compression) fractions, the artifact kind, and `grid` (a label for tables and legends).
    `recipes`: keep these, in this order (canonical text or not)."""
    from mpt_utils.recipe import Recipe

    df = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if df.empty or "recipe" not in df.columns:
        return pd.DataFrame()
    if "family" in df.columns:
        df = df[(df["family"] == "combined") & (df.get("method", "recipe") == "recipe")]
    want = [str(Recipe.parse(r)) for r in recipes] if recipes is not None else None
    if want is not None:
        df = df[df["recipe"].isin(want)]
    lines = []
    for (_, recipe), part in df.groupby(["config_hash", "recipe"], sort=False):
        by = part.drop_duplicates("metric").set_index("metric")

        def get(metric: str, col: str = "value", by=by) -> float:
            return float(by.at[metric, col]) if metric in by.index and col in by.columns else math.nan

        ppl_row = by.loc["ppl"] if "ppl" in by.index else {}
        line = {**recipe_settings(recipe), "ppl": get("ppl"), "ppl_se": get("ppl", "stderr"), "kl": get("kl_mean"),
                "kl_se": get("kl_mean", "stderr"), "same_top": get("same_top"),
                **{m: get(m) for m in SIZE_METRICS},
                "artifact": by.at["artifact_bytes", "artifact"] if "artifact_bytes" in by.index and "artifact" in by else None,
                "seqlen": ppl_row.get("seqlen") if len(ppl_row) else None,
                "n_windows": ppl_row.get("n_windows") if len(ppl_row) else None,
                "config_hash": part["config_hash"].iloc[0]}
        for acc in ACCOUNTINGS:
            line[f"kept_{acc}"] = 1.0 - line[f"compression_{acc}"]
        lines.append(line)
    out = pd.DataFrame(lines)
    if out.empty:
        return out
    if grid is not None:
        out.insert(0, "grid", grid)
    if want is not None:
        out = out.set_index("recipe").reindex([r for r in want if r in set(out["recipe"])]).reset_index()
    return out.reset_index(drop=True)


def size_columns(points: pd.DataFrame) -> pd.DataFrame:
    """The table a notebook shows: recipe, PPL ± SE, KL ± SE and the three sizes (bytes, % of dense)."""
    cols = {"recipe": points["recipe"], "PPL": points["ppl"], "± SE": points["ppl_se"], "KL": points["kl"],
            "KL SE": points["kl_se"]}
    for acc in ACCOUNTINGS:
        cols[f"{acc} bytes"] = points[f"{acc}_bytes"]
        cols[f"{acc} % of dense"] = 100 * points[f"kept_{acc}"]
    cols["artifact"] = points["artifact"]
    return pd.DataFrame(cols)


def grid_additivity(points: pd.DataFrame, row: str, col: str = "bits", value: str = "ppl") -> pd.DataFrame:
    """`planner.additivity_check` on a measured 2-D grid of `points`: every combined point (both
    settings non-zero; the margins are exact by construction and left out) predicted from its two
    single-method margins, L(a,b) ≈ L(a,0) + L(0,b) − L(0,0). Empty when the grid lacks a margin
    (the uncompressed row or column)."""
    from mpt_utils.planner import additivity_check

    base_col = BASELINE_BITS if col == "bits" else 0.0
    try:
        check = additivity_check(points, row=row, col=col, value=value, base_row=0.0, base_col=base_col)
    except MPTError:
        return pd.DataFrame(columns=[row, col, "measured", "predicted", "rel_error"])
    combined = ~np.isclose(check[row].astype(float), 0.0) & ~np.isclose(check[col].astype(float), base_col)
    return check[combined & check["measured"].notna()].reset_index(drop=True)


# -- the frontier ---------------------------------------------------------------------------------------
def frontier(points: pd.DataFrame, size: str = "nominal", metric: str = "ppl") -> pd.DataFrame:
    """The cost-effective frontier: the points that have the lowest `metric` of every point at most
    their size (`kept_<size>`, fraction of dense), smallest first. A budget B's best configuration is
    the frontier's last point with kept ≤ B. Collapsed points (PPL inf/NaN) are never on it."""
    if size not in ACCOUNTINGS:
        raise MPTError(f"unknown size accounting {size!r}", f"use one of {ACCOUNTINGS}")
    col = f"kept_{size}"
    points = points.reset_index(drop=True)
    ok = points[np.isfinite(points[col]) & np.isfinite(points[metric]) & ~collapsed(points[metric].to_numpy(float))]
    ordered = ok.sort_values([col, metric])
    best, keep = math.inf, []
    for i, value in zip(ordered.index, ordered[metric]):
        if value < best:
            keep.append(i)
            best = value
    out = ordered.loc[keep].sort_values(col)
    return out.assign(size=size).reset_index(drop=True)


def best_within(points: pd.DataFrame, budget: float, size: str = "nominal") -> pd.Series | None:
    """The lowest-PPL point whose `kept_<size>` fraction is at most `budget` (None: nothing fits)."""
    front = frontier(points, size)
    fits = front[front[f"kept_{size}"] <= budget + 1e-12]
    return None if fits.empty else fits.iloc[-1]


# -- phase-transition lines -------------------------------------------------------------------------------
def _native(axis: str, ratio):
    r = np.asarray(ratio, dtype=float)
    return BASELINE_BITS * (1 - r) if axis == "quant" else r


def _line_fit(axis: str, part: pd.DataFrame, criterion: str, delta: float) -> dict[str, Any]:
    part = part.sort_values(axis)
    x = _native(axis, part[axis].to_numpy(float))
    y, se = part["ppl"].to_numpy(float), part["ppl_se"].to_numpy(float)
    kind_axis = "bits" if axis == "quant" else "sparsity"
    out = {"n_points": int(np.unique(x).size), "kind": "none", "crossing": math.nan, "low": math.nan,
           "high": math.nan, "low_open": False, "high_open": False, "verdict": ""}
    if np.unique(x).size < 2 or collapsed(y).all():
        out["verdict"] = "fewer than 2 measured points"
        return out
    if criterion == "ptp" and np.unique(x).size >= 3:
        try:
            fit = fit_ptp(x, y, y_se=se, axis=kind_axis)
        except MPTError as err:
            fit, out["verdict"] = None, err.message
        if fit is not None:
            out["verdict"] = fit.verdict
            if fit.has_ptp:
                lo, hi = (float(v) for v in fit.s0_ci)
                return {**out, "kind": "ptp", "crossing": float(fit.s0), "low": lo, "high": hi,
                        "low_open": bool(fit.ci_low_open), "high_open": bool(fit.ci_high_open)}
    try:
        lim = near_lossless_limit(x, y, None, delta, y_se=se, axis=kind_axis)
    except MPTError as err:
        return {**out, "verdict": err.message}
    return {**out, "kind": "near_lossless", "crossing": float(lim.limit), "low": float(lim.low),
            "high": float(lim.high), "low_open": bool(lim.low_open), "high_open": bool(lim.high_open),
            "verdict": (out["verdict"] + "; " if out["verdict"] else "") + f"near-lossless limit (PPL within "
                       f"{delta:.0%} of the line's uncompressed end, {lim.dense_source})"}


def _grid_only(points: pd.DataFrame, row: str, col: str) -> pd.DataFrame:
    others = [a for a in AXES if a not in (row, col)]
    keep = np.ones(len(points), dtype=bool)
    for a in others:
        keep &= np.isclose(points[a].to_numpy(float), 0.0)
    return points[keep]


def transition_lines(points: pd.DataFrame, row: str, col: str, *, criterion: str = "ptp",
                     delta: float = NEAR_LOSSLESS_REL) -> pd.DataFrame:
    """Where each row and each column of the (row × col) grid crosses its phase transition (module
    docstring). One line per grid line: `along` (the axis the line varies), `at_axis` / `at` (its fixed
    coordinate), `crossing` with `low`–`high` (ratios on `along`, so quant as 1 − bits/16), `kind`
    ("ptp", "near_lossless" or "none"), open ends, points and the fit's verdict. `criterion`:
    "ptp" (eq. 5 where it finds a PTP, else the near-lossless limit) or "near_lossless"."""
    if row not in AXES or col not in AXES or row == col:
        raise MPTError(f"axes {row!r} × {col!r}", f"pick two different axes of {AXES}")
    if criterion not in ("ptp", "near_lossless"):
        raise MPTError(f"unknown criterion {criterion!r}", "use 'ptp' or 'near_lossless'")
    grid = _grid_only(points, row, col)
    lines = []
    for along, fixed in ((col, row), (row, col)):
        for at, part in grid.groupby(fixed):
            fit = _line_fit(along, part, criterion, delta)
            lines.append({"along": along, "at_axis": fixed, "at": float(at), **fit})
    return pd.DataFrame(lines)


# -- the compression limit -----------------------------------------------------------------------------
@dataclass
class CompressionLimit:
    """The most compressed point of the grid's safe region (module docstring). `compression[acc]` =
    (value, low, high): the fraction of dense bytes removed there under accounting `acc`, low from
    the lines' low ends (conservative), high from their high ends. `at` / `at_low` / `at_high`: the
    (row, col) ratios of those points. `open`: some binding line never left its tolerance, so the
    limit is at least this (the grid ends first)."""

    row: str
    col: str
    at: dict[str, float]
    at_low: dict[str, float]
    at_high: dict[str, float]
    compression: dict[str, tuple[float, float, float]]
    binding: list[str]
    open: bool
    criterion: str
    note: str = ""
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def found(self) -> bool:
        return bool(self.at) and all(math.isfinite(v) for v in self.at.values())

    def coordinates(self, where: Mapping[str, float] | None = None) -> str:
        where = self.at if where is None else where
        parts = []
        for axis in (self.row, self.col):
            v = where.get(axis, math.nan)
            parts.append(f"{float(_native(axis, v)):.2f} bits" if axis == "quant" else f"{axis} {v:.3f}")
        return ", ".join(parts)

    def text(self) -> str:
        if not self.found:
            return f"no compression limit on the {self.row} × {self.col} grid: {self.note}"
        parts = []
        for acc, (v, lo, hi) in self.compression.items():
            if math.isfinite(v):
                interval = f" ({lo:.1%}–{hi:.1%})" if hi - lo >= 5e-4 else ""
                parts.append(f"{ACCOUNTING_LABELS.get(acc, acc)}: {'≥ ' if self.open else ''}{v:.1%} removed"
                             f"{interval}, {1 - v:.1%} of dense kept")
        if self.open:
            where = "at the end of the measured grid"
        elif len(self.binding) == 2:
            where = "where the two transition lines meet"
        else:
            where = f"on the {self.binding[0]} line" if self.binding else "at the edge of the measured grid"
        return (f"compression limit of the {self.row} × {self.col} grid at {self.coordinates()} ({where}; "
                f"from {self.criterion}): " + "; ".join(parts) + (f". {self.note}" if self.note else ""))

    def as_dict(self) -> dict[str, Any]:
        return {"row": self.row, "col": self.col, "at": self.at, "at_low": self.at_low, "at_high": self.at_high,
                "compression": {k: list(v) for k, v in self.compression.items()}, "binding": self.binding,
                "open": self.open, "criterion": self.criterion, "note": self.note, "text": self.text()}


def _bound(lines: pd.DataFrame, along: str, which: str) -> tuple[np.ndarray, np.ndarray, bool] | None:
    part = lines[(lines["along"] == along) & (lines["kind"] != "none")].sort_values("at")
    if part.empty:
        return None
    col = {"mid": "crossing", "low": "low", "high": "high"}[which]
    values = part[col].to_numpy(float)
    values = np.where(np.isfinite(values), values, part["crossing"].to_numpy(float))
    return part["at"].to_numpy(float), values, bool(part["high_open"].any())


def _open_at(lines: pd.DataFrame, along: str, at: float) -> bool:
    """Whether the lines along `along` that the bound at fixed value `at` interpolates between never
    left their tolerance (their crossing is only a lower bound)."""
    part = lines[(lines["along"] == along) & (lines["kind"] != "none")].sort_values("at")
    if part.empty:
        return False
    values = part["at"].to_numpy(float)
    j = int(np.searchsorted(values, at))
    near = {max(j - 1, 0), min(j, len(values) - 1)}
    if any(np.isclose(values, at)):
        near = {int(np.argmin(np.abs(values - at)))}
    return bool(part["high_open"].to_numpy(bool)[sorted(near)].any())


def _interpolator(points: pd.DataFrame, row: str, col: str, acc: str):
    from scipy.interpolate import griddata

    ok = np.isfinite(points[f"compression_{acc}"].to_numpy(float))
    xy = points.loc[ok, [row, col]].to_numpy(float)
    z = points.loc[ok, f"compression_{acc}"].to_numpy(float)
    if len(z) == 0:
        return None

    for k in (0, 1):  # a grid along one axis only: interpolate along the other
        if np.unique(xy[:, k]).size == 1 and np.unique(xy[:, 1 - k]).size > 1:
            other = 1 - k
            order = np.argsort(xy[:, other])

            def along(a: np.ndarray, b: np.ndarray, other=other, order=order) -> np.ndarray:
                return np.interp((a, b)[other], xy[order, other], z[order])

            return along

    def at(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        q = np.column_stack([a, b])
        try:
            out = griddata(xy, z, q, method="linear")
        except Exception:  # noqa: BLE001 - a degenerate (1-D) grid: fall back to the nearest point
            out = np.full(len(q), np.nan)
        near = griddata(xy, z, q, method="nearest")
        return np.where(np.isfinite(out), out, near)

    return at


def compression_limit(points: pd.DataFrame, row: str, col: str, lines: pd.DataFrame | None = None, *,
                      criterion: str = "ptp", accountings: Sequence[str] = ("nominal", "artifact"),
                      resolution: int = 201) -> CompressionLimit:
    """The compression limit of the (row × col) grid (module docstring), from `transition_lines`."""
    grid = _grid_only(points, row, col)
    grid = grid[np.isfinite(grid["ppl"].to_numpy(float))]
    lines = transition_lines(points, row, col, criterion=criterion) if lines is None else lines
    empty = CompressionLimit(row, col, {}, {}, {}, {}, [], False, criterion)
    if grid.empty:
        empty.note = "no measured point on the grid"
        return empty
    b_of_a = _bound(lines, along=col, which="mid")  # the col-axis crossing as a function of the row value
    a_of_b = _bound(lines, along=row, which="mid")
    if b_of_a is None and a_of_b is None:
        empty.note = "no grid line has two measured points, so no transition line can be drawn"
        return empty
    a = np.linspace(0.0, float(grid[row].max()), resolution)
    b = np.linspace(0.0, float(grid[col].max()), resolution)
    A, B = np.meshgrid(a, b, indexing="ij")
    sizes = {acc: _interpolator(grid, row, col, acc) for acc in accountings}
    main = next((acc for acc in accountings if sizes.get(acc) is not None), None)
    if main is None:
        empty.note = "the points carry no sizes"
        return empty
    comp = {acc: f(A.ravel(), B.ravel()).reshape(A.shape) for acc, f in sizes.items() if f is not None}
    step_a, step_b = (a[1] - a[0]) if a.size > 1 else 0.0, (b[1] - b[0]) if b.size > 1 else 0.0

    def solve(which: str):
        safe = np.ones(A.shape, dtype=bool)
        bound_ab = _bound(lines, along=col, which=which)
        bound_ba = _bound(lines, along=row, which=which)
        lim_b = lim_a = None
        if bound_ab is not None:
            lim_b = np.interp(A, bound_ab[0], bound_ab[1])
            safe &= B <= lim_b + 1e-12
        if bound_ba is not None:
            lim_a = np.interp(B, bound_ba[0], bound_ba[1])
            safe &= A <= lim_a + 1e-12
        value = np.where(safe & np.isfinite(comp[main]), comp[main], -np.inf)
        i = np.unravel_index(int(np.argmax(value)), value.shape)
        if not np.isfinite(value[i]):
            return None
        binding = []
        if lim_b is not None and B[i] >= lim_b[i] - step_b:
            binding.append(f"{col} transition")
        if lim_a is not None and A[i] >= lim_a[i] - step_a:
            binding.append(f"{row} transition")
        return i, binding

    mid, low, high = solve("mid"), solve("low"), solve("high")
    if mid is None:
        empty.note = "no grid point lies inside the safe region"
        return empty
    (i, binding) = mid
    il = low[0] if low is not None else i
    ih = high[0] if high is not None else i

    def where(k):
        return {row: float(A[k]), col: float(B[k])}

    compression = {}
    for acc, c in comp.items():
        v, lo, hi = float(c[i]), float(c[il]), float(c[ih])
        compression[acc] = (v, min(lo, v), max(hi, v))
    fixed = {f"{col} transition": (col, A[i]), f"{row} transition": (row, B[i])}
    is_open = any(_open_at(lines, *fixed[name]) for name in binding)
    used = lines[lines["kind"] != "none"]
    kinds = sorted(set(used["kind"]))
    criterion = " and ".join({"ptp": "eq. 5 PTPs", "near_lossless": "near-lossless limits"}[k] for k in kinds)
    note = ("a binding line never left its tolerance inside the grid, so the limit is at least this "
            "(measure further along it)") if is_open else ""
    return CompressionLimit(row, col, where(i), where(il), where(ih), compression, binding, is_open, criterion,
                            note, {"lines": lines})


# -- what "10 % of the original size" is in real bytes ----------------------------------------------------
def size_conclusion(points: pd.DataFrame, target: float = 0.10) -> dict[str, Any]:
    """The Perspective's headline, "lossless compression to ~10 % of the original size", read on the
    measured points: the best (lowest-PPL) point at ≤ `target` of dense under the nominal count and
    what it keeps as a real artifact; the best real artifact within `target`; and, when nothing
    reaches it, the smallest nominal size measured and its real size. Returns numbers and `text`."""
    ok = points[np.isfinite(points["kept_nominal"]) & np.isfinite(points["kept_artifact"])]
    if ok.empty:
        return {"text": "no point with both sizes", "target": target}
    nominal = best_within(ok, target, "nominal")
    real = best_within(ok, target, "artifact")
    smallest = ok.loc[ok["kept_nominal"].idxmin()]
    ratio = ok["kept_artifact"] / ok["kept_nominal"]
    out: dict[str, Any] = {"target": target, "smallest_nominal": float(smallest["kept_nominal"]),
                           "smallest_nominal_artifact": float(smallest["kept_artifact"]),
                           "smallest_nominal_recipe": smallest["recipe"],
                           "median_artifact_over_nominal": float(ratio.median()),
                           "smallest_artifact": float(ok["kept_artifact"].min())}
    if nominal is not None:
        out.update(nominal_recipe=nominal["recipe"], nominal_kept=float(nominal["kept_nominal"]),
                   nominal_real_kept=float(nominal["kept_artifact"]), nominal_ppl=float(nominal["ppl"]))
        text = (f"{target:.0%} of the original size in the paper's count is reached by `{nominal['recipe']}` "
                f"({nominal['kept_nominal']:.1%} nominal, PPL {nominal['ppl']:.4g}); its real artifact keeps "
                f"{nominal['kept_artifact']:.1%} of the dense one")
    else:
        text = (f"no measured configuration reaches {target:.0%} of the original size even in the paper's count: the "
                f"smallest is `{smallest['recipe']}` at {smallest['kept_nominal']:.1%} nominal, "
                f"{smallest['kept_artifact']:.1%} as a real artifact")
    if real is not None:
        out.update(real_recipe=real["recipe"], real_kept=float(real["kept_artifact"]), real_ppl=float(real["ppl"]))
        text += (f"; the best real artifact within {target:.0%} is `{real['recipe']}` ({real['kept_artifact']:.1%}, "
                 f"PPL {real['ppl']:.4g})")
    else:
        text += (f"; no real artifact is that small (the smallest keeps {out['smallest_artifact']:.1%})")
    kinds = set(ok["artifact"].dropna()) if "artifact" in ok else set()
    why = ["pruned zeros are stored"]
    if "gguf" in kinds:
        why.append("GGUF block scales and higher-precision tensors add bits")
    if "torch" in kinds:
        why.append("torch-simulated quantization is stored as 16-bit floats")
    text += (f". Across the grid the real artifact is {out['median_artifact_over_nominal']:.2f}× the nominal size "
             f"(median): {'; '.join(why)}.")
    out["text"] = text
    return out


# -- figures ------------------------------------------------------------------------------------------
def _tick_bits(ax, axis: str, which: str, values: Sequence[float]) -> None:
    if axis != "quant":
        return
    ticks = sorted(set(np.round(np.asarray(values, dtype=float), 6)))
    labels = [f"{BASELINE_BITS * (1 - t):g}" for t in ticks]
    if which == "x":
        ax.set_xticks(ticks, labels)
    else:
        ax.set_yticks(ticks, labels)


def _draw_lines(ax, lines: pd.DataFrame, row: str, col: str, colors=("tab:red", "tab:blue")) -> None:
    for (along, fixed), color in zip(((col, row), (row, col)), colors):
        part = lines[(lines["along"] == along) & (lines["kind"] != "none")].sort_values("at")
        if part.empty:
            continue
        at, cross = part["at"].to_numpy(float), part["crossing"].to_numpy(float)
        lo, hi = part["low"].to_numpy(float), part["high"].to_numpy(float)
        err = np.vstack([np.clip(cross - lo, 0, None), np.clip(hi - cross, 0, None)])
        kinds = "/".join(sorted(set(part["kind"])))
        label = f"{along} transition along each {fixed} line ({kinds.replace('_', '-')})"
        if along == col:  # x = row value, y = crossing on col
            ax.errorbar(at, cross, yerr=err, color=color, marker="o", ms=4, lw=1.6, capsize=3, label=label)
        else:
            ax.errorbar(cross, at, xerr=err, color=color, marker="s", ms=4, lw=1.6, capsize=3, label=label)


def fig_surface(points: pd.DataFrame, row: str, col: str, *, lines: pd.DataFrame | None = None,
                limit: CompressionLimit | None = None, title: str | None = None) -> plt.Figure:
    """Left: the PPL surface over (row, col) in 3-D; right: its contour with the measured points,
    the transition lines (with their intervals) and the compression limit. log10 PPL is drawn."""
    grid = _grid_only(points, row, col)
    grid = grid[np.isfinite(grid["ppl"].to_numpy(float)) & ~collapsed(grid["ppl"].to_numpy(float))]
    x, y = grid[row].to_numpy(float), grid[col].to_numpy(float)
    z = np.log10(grid["ppl"].to_numpy(float))
    fig = plt.figure(figsize=(12, 4.8))
    ax3 = fig.add_subplot(1, 2, 1, projection="3d")
    ax = fig.add_subplot(1, 2, 2)
    surface = np.unique(x).size >= 2 and np.unique(y).size >= 2 and len(z) >= 3
    if surface:
        try:
            ax3.plot_trisurf(x, y, z, cmap="viridis", alpha=0.85, linewidth=0.2, edgecolor="k")
            levels = ax.tricontourf(x, y, z, levels=12, cmap="viridis")
            fig.colorbar(levels, ax=ax, label="log10 PPL")
        except (ValueError, RuntimeError):  # collinear points: no triangulation
            surface = False
    if not surface:
        ax3.scatter(x, y, z, c=z, cmap="viridis")
    ax3.scatter(x, y, z, color="k", s=10)
    ax3.set(xlabel=AXIS_LABELS[row], ylabel=AXIS_LABELS[col], zlabel="log10 PPL")
    sc = ax.scatter(x, y, c=z, cmap="viridis", edgecolor="white", s=45, zorder=3)
    if not surface:
        fig.colorbar(sc, ax=ax, label="log10 PPL")
    for xi, yi, p in zip(x, y, grid["ppl"].to_numpy(float)) if len(x) <= 36 else ():
        ax.annotate(f"{p:.3g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7, color="0.15")
    if lines is not None and not lines.empty:
        _draw_lines(ax, lines, row, col)
    if limit is not None and limit.found:
        ax.scatter([limit.at[row]], [limit.at[col]], marker="*", s=260, color="gold", edgecolor="k", zorder=5,
                   label="compression limit")
        lo, hi = limit.at_low, limit.at_high
        ax.plot([lo[row], limit.at[row], hi[row]], [lo[col], limit.at[col], hi[col]], color="k", ls=":", lw=1.2,
                label="limit interval (line low → high ends)")
    for a3 in (ax3,):
        _tick_bits(a3, row, "x", x)
        _tick_bits(a3, col, "y", y)
    _tick_bits(ax, row, "x", x)
    _tick_bits(ax, col, "y", y)
    for setter, values in ((ax.set_xlim, x), (ax.set_ylim, y)):
        if values.size:
            lo, hi = float(values.min()), float(values.max())
            pad = 0.06 * (hi - lo) if hi > lo else 0.05
            setter(lo - pad, hi + pad)
    ax.set(xlabel=AXIS_LABELS[row], ylabel=AXIS_LABELS[col])
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def fig_frontier(points: pd.DataFrame, *, sizes: Sequence[str] = ("nominal", "artifact"), hue: str = "grid",
                 target: float | None = 0.10, title: str | None = None) -> plt.Figure:
    """PPL against the fraction of dense kept, one panel per size accounting: every point (by `hue`)
    and the cost-effective frontier as a step line; a dotted line at `target` (the headline 10 %)."""
    import seaborn as sns

    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.3), sharey=True, squeeze=False)
    hue = hue if hue in points.columns else None
    groups = list(pd.unique(points[hue])) if hue else [None]
    palette = dict(zip(groups, sns.color_palette(n_colors=max(len(groups), 1))))
    ok = points[~collapsed(points["ppl"].to_numpy(float))]
    for ax, size in zip(axes[0], sizes):
        col = f"kept_{size}"
        for g in groups:
            part = ok if g is None else ok[ok[hue] == g]
            ax.errorbar(100 * part[col], part["ppl"], yerr=part["ppl_se"], fmt="o", ms=4, alpha=0.75,
                        color=palette[g], label=str(g) if g is not None else "points")
        front = frontier(points, size)
        if not front.empty:  # the last frontier point stays the best up to the largest size measured
            xs = np.append(100 * front[col].to_numpy(float), 100 * float(ok[col].max()))
            ys = np.append(front["ppl"].to_numpy(float), float(front["ppl"].iloc[-1]))
            ax.step(xs, ys, where="post", color="k", lw=1.6, label="frontier (lowest PPL ≤ size)")
        if target is not None:
            ax.axvline(100 * target, color="0.4", ls=":", lw=1, label=f"{target:.0%} of dense")
        finite = ok["ppl"][np.isfinite(ok["ppl"])]
        wide = not finite.empty and float(finite.max()) > 3 * float(finite.min())
        ax.set(xlabel=f"{ACCOUNTING_LABELS[size]}, % of dense", yscale="log" if wide else "linear",
               title=ACCOUNTING_LABELS[size])
        ax.invert_xaxis()
    axes[0][0].set_ylabel("perplexity")
    axes[0][-1].legend(fontsize="x-small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def fig_plan(built, title: str | None = None) -> plt.Figure:
    """One panel per planned dimension: the measured single-method curve (± SE) with its fit, the
    safe-zone bound (dotted) and the planned setting (a diamond at its predicted PPL)."""
    from mpt_utils.plots import plot_ptp_curves

    dims = {d.name: d for d in built.dims}
    names = list(built.curves)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        c, d = built.curves[name], dims[name]
        fit = d.fit if getattr(d.fit, "model", "none") != "none" else None
        finite = c.y[np.isfinite(c.y)]
        logy = finite.size > 0 and float(finite.max()) > 3 * float(finite.min())
        plot_ptp_curves(ax, [(c.method, c.x, c.y, c.y_se)], {c.method: fit} if fit is not None else None,
                        title=f"{name}: {c.method} ({c.source})", logy=logy, xlabel=AXIS_LABELS[name],
                        invert_bits=False)
        ratios = np.linspace(0.0, float(np.nanmax(c.ratio)), 200)
        ax.plot(_native(name, ratios), d.predict(ratios), color="0.45", ls="--", lw=1,
                label="planner's prediction (anchored at dense)")
        ax.axvline(float(_native(name, d.ptp)), color="tab:red", ls=":", lw=1.2, label="safe-zone bound")
        planned = built.plan.ratios.get(name, 0.0)
        ax.scatter([float(_native(name, planned))], d.predict(np.array([planned])), marker="D", s=70,
                   color="gold", edgecolor="k", zorder=5, label="planned")
        if name == "quant" and not ax.xaxis_inverted():
            ax.invert_xaxis()  # compression grows to the right, as on the ratio axes
        ax.legend(fontsize="x-small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def fig_predicted(builds: Mapping[str, Any], title: str | None = None) -> plt.Figure:
    """Predicted (the additive plan) against measured (± SE) PPL and KL, one point per build."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (metric, label) in zip(axes, (("PPL", "perplexity"), ("KL to dense", "KL to dense (nats/token)"))):
        lo, hi = math.inf, -math.inf
        for name, built in builds.items():
            row = built.comparison().set_index("metric").loc[metric]
            if not (math.isfinite(row.predicted) and math.isfinite(row.measured)):
                continue
            ax.errorbar([row.predicted], [row.measured], yerr=[row.measured_se], fmt="o", ms=7, capsize=4,
                        label=f"{name}: {built.recipe}")
            lo = min(lo, row.predicted, row.measured - row.measured_se)
            hi = max(hi, row.predicted, row.measured + row.measured_se)
        if math.isfinite(lo):
            pad = 0.05 * (hi - lo) if hi > lo else 0.05 * abs(hi) + 1e-6
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1, label="measured = predicted")
            ax.legend(fontsize="x-small")
        ax.set(xlabel=f"predicted {label}", ylabel=f"measured {label}", title=metric)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def with_options(recipes: Sequence[str], options: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """`recipes` with `options[method]` added to every step of that method that sets none itself
    (e.g. {"asvd": {"granularity": "part"}} for a cheaper ASVD sensitivity search)."""
    from mpt_utils.recipe import Recipe, Step

    out = []
    for text in recipes:
        recipe = Recipe.parse(text)
        steps = tuple(Step(s.family, s.method, s.setting, tuple(dict(options[s.method]).items()))
                      if s.method in options and not s.options and s.family != "gguf" else s for s in recipe)
        out.append(str(Recipe(steps)))
    return out


__all__ = ["CompressionLimit", "best_within", "compression_limit", "fig_frontier", "fig_surface", "frontier",
           "fig_plan", "fig_predicted", "grid_additivity", "grid_recipes", "points_table", "size_columns", "size_conclusion",
           "transition_lines", "with_options"]
