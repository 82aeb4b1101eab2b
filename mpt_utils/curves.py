"""Curves and per-point tables from the tidy rows of a sweep, shared by notebooks 02-05.

Every sweep stores, per point, a `metric == "ppl"` row (with `stderr`, the standard error of the PPL
over windows) and the paired divergence rows from the dense model on the same windows (`kl_mean`,
`same_top`, ... see `mpt_utils.eval.divergence`). This module turns those rows into

- `measured_curves`: (label, x, y, y_se) curves for `mpt_utils.ptp.fit_ptp(x, y, y_se=se)` /
  `fit_all` and `mpt_utils.plots.plot_ptp_curves`, for PPL or any other metric;
- `metric_values` / `metric_table`: one line per point, "PPL ± SE | KL ± SE | same-top-1 %";
- `paired_note`: a one-line note when points stored by older code lack the paired rows;
- `decisive_point`, `order_agreement`, `widest_interval`: sentences a notebook's computed conclusion
  builds from the data (does the KL order of methods agree with the PPL order where it matters,
  and how wide the s0 intervals are once the evaluation noise is carried);
- `ranking_at`, `ptp_summary`, `ptp_shift`, `ptp_later`, `speedup_claim`: sentences ranking the
  measured curves and comparing fitted PTPs (a `mpt_utils.ptp.ptp_table`) and measured speed-ups with
  the paper's claims and published curves;
- `plot_metric_curves`: a metric (e.g. KL) against the ratio, with ±SE bars.

Missing metrics never raise: their values are NaN (blank in tables), curves without them are left
out, and the sentences say what could not be compared.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from scipy.stats import kendalltau

from mpt_utils.errors import MPTError
from mpt_utils.plots import plot_line
from mpt_utils.ptp import PTPFit, bits_to_ratio, ratio_to_bits

Curve4 = tuple[str, np.ndarray, np.ndarray, np.ndarray]
PAIRED_METRICS = ("ppl", "kl_mean", "same_top")
METRIC_LABELS = {"ppl": "PPL ± SE", "kl_mean": "KL ± SE", "same_top": "same-top-1 %", "nll_diff": "ΔNLL ± SE",
                 "kl_p99": "KL p99", "kl_max": "KL max", "dp_rms": "Δp rms"}
METRIC_NAMES = {"ppl": "PPL", "kl_mean": "KL", "same_top": "same-top-1", "nll_diff": "ΔNLL"}
Where = Mapping[str, Any] | None


def select(rows: pd.DataFrame, where: Where = None) -> pd.DataFrame:
    """Rows matching every `where` item: column -> a value, a list/tuple/set of values, or a
    predicate on the column (e.g. `lambda s: s != "F32"`)."""
    for col, want in (where or {}).items():
        if col not in rows.columns:
            raise MPTError(f"the rows have no column {col!r}", f"filter on one of: {', '.join(map(str, rows.columns))}")
        if callable(want):
            mask = np.asarray(want(rows[col]), dtype=bool)
        else:
            mask = rows[col].isin(list(want) if isinstance(want, (list, tuple, set, frozenset)) else [want])
        rows = rows[mask]
    return rows


def _dedupe(rows: pd.DataFrame, group: Sequence[str] = ()) -> pd.DataFrame:
    """One row per stored point, corpus and metric within each `group` (a point may be loaded twice,
    e.g. a speed twin; one point may also serve several curves, e.g. the dense ratio-0 point)."""
    keys = [c for c in ("config_hash", "data", "metric", *group) if c in rows.columns]
    return rows.drop_duplicates(subset=keys) if "config_hash" in keys else rows


def _stderr(rows: pd.DataFrame) -> np.ndarray:
    if "stderr" not in rows.columns:
        return np.full(len(rows), np.nan)
    return pd.to_numeric(rows["stderr"], errors="coerce").to_numpy(dtype=float)


def _paired_se(rows: pd.DataFrame, part: pd.DataFrame) -> np.ndarray:
    """PPL × the standard error of the paired NLL difference to the dense model (`nll_diff`, same
    point and corpus), NaN where that row is missing. Every point of a curve is scored on the same
    windows, so the difficulty of the text, common to all of them, cancels in the comparison of
    points: this is the noise of the curve's shape, which is what places s0 (delta method on log PPL)."""
    if not {"config_hash", "data", "stderr"} <= set(rows.columns) or not (rows["metric"] == "nll_diff").any():
        return np.full(len(part), np.nan)
    diff = rows[rows["metric"] == "nll_diff"].drop_duplicates(subset=["config_hash", "data"])
    lookup = pd.to_numeric(diff.set_index(["config_hash", "data"])["stderr"], errors="coerce")
    keys = pd.MultiIndex.from_frame(part[["config_hash", "data"]])
    se = lookup.reindex(keys).to_numpy(dtype=float)
    return pd.to_numeric(part["value"], errors="coerce").to_numpy(dtype=float) * se


def _x_values(rows: pd.DataFrame, part: pd.DataFrame, x: str, on: Sequence[str]) -> np.ndarray:
    """Column `x` of `part`, or, when `x` is a metric, its value on the same point (joined on `on`);
    a column that is empty on some rows is completed from the metric when there is one."""
    column = pd.to_numeric(part[x], errors="coerce").to_numpy(dtype=float) if x in part.columns else None
    is_metric = "metric" in rows.columns and (rows["metric"] == x).any()
    if column is not None and (np.isfinite(column).all() or not is_metric):
        return column
    if not is_metric:
        raise MPTError(f"{x!r} is neither a column nor a metric of the rows",
                       "pass a column (e.g. ratio, sparsity, bits) or a stored metric (e.g. bits_per_weight)")
    missing = [c for c in on if c not in rows.columns]
    if missing:
        raise MPTError(f"cannot join metric {x!r} to its points: no column {missing}", "pass on=... key columns")
    lookup = rows[rows["metric"] == x].drop_duplicates(subset=list(on)).set_index(list(on))["value"]
    keys = pd.MultiIndex.from_frame(part[list(on)]) if len(on) > 1 else part[on[0]]
    looked_up = pd.to_numeric(lookup.reindex(keys), errors="coerce").to_numpy(dtype=float)
    return looked_up if column is None else np.where(np.isfinite(column), column, looked_up)


def _rename(label: Any, rename: Mapping | Callable | None) -> str:
    if rename is None:
        return str(label)
    if callable(rename):
        return str(rename(label))
    return str(rename.get(label, label))


def measured_curves(rows: pd.DataFrame, by: str, x: str, *, metric: str = "ppl", order: Sequence | None = None,
                    min_points: int = 2, where: Where = None, rename: Mapping | Callable | None = None,
                    anchor: tuple[float, float, float] | None = None, on: Sequence[str] = ("config_hash",),
                    paired: bool = True) -> list[Curve4]:
    """(label, x, y, y_se) per group of `by`, for `metric` against `x`, x ascending.

    rows: tidy rows (`metric`, `value`, optional `stderr`). x: a column of the metric's rows (ratio,
    sparsity, bits) or another metric of the same point (e.g. "bits_per_weight", "param_reduction"),
    joined on the `on` columns (before `where` applies: such rows often have no `data`). y_se comes
    from `stderr` (NaN where absent, which `fit_ptp` counts as unknown). `where` filters rows first (see `select`); `order` keeps only these groups, in this
    order (default: every group, in order of appearance); `rename` maps a group to its label (a
    mapping or a function). `anchor` = (x, y, y_se) is added to every curve that has no point at
    that x, e.g. the dense model at ratio 0 or 16 bits. Collapsed points (inf, NaN) stay in: the fit
    censors them. Repeated x values stay as replicates (e.g. two GGUF schemes of one size). A group
    with fewer than `min_points` distinct x values, or none with a finite value, is left out, and so
    is every group when no row has `metric` (older stores: the caller gets []).

    `paired` (PPL only): where a point stored its paired difference to the dense model (`nll_diff`),
    y_se is PPL × that difference's SE (`_paired_se`), and the anchor, the dense reference itself,
    gets SE 0; points without it keep the unpaired SE over windows.
    """
    for col in (by, "metric", "value"):
        if col not in rows.columns:
            raise MPTError(f"the rows have no column {col!r}", "pass tidy sweep rows (metric, value, ...)")
    every = _dedupe(rows)  # an x metric is looked up on every row of its point (its `data` may be empty)
    rows = _dedupe(select(rows, where), [by])
    mine = rows[rows["metric"] == metric]
    groups = list(pd.unique(mine[by])) if order is None else [g for g in order if (mine[by] == g).any()]
    out: list[Curve4] = []
    for group in groups:
        part = mine[mine[by] == group]
        xs = _x_values(every, part, x, on)
        ys = pd.to_numeric(part["value"], errors="coerce").to_numpy(dtype=float)
        ses = _stderr(part)
        pair_se = _paired_se(every, part) if paired and metric == "ppl" else np.full(len(part), np.nan)
        is_paired = np.isfinite(pair_se).any()
        ses = np.where(np.isfinite(pair_se), pair_se, ses)
        keep = np.isfinite(xs)
        xs, ys, ses = xs[keep], ys[keep], ses[keep]
        if anchor is not None and not np.isclose(xs, anchor[0]).any():
            anchor_se = 0.0 if is_paired else anchor[2]
            xs, ys, ses = np.append(xs, anchor[0]), np.append(ys, anchor[1]), np.append(ses, anchor_se)
        if np.unique(xs).size < min_points or not np.isfinite(ys).any():
            continue
        idx = np.argsort(xs, kind="stable")
        out.append((_rename(group, rename), xs[idx], ys[idx], ses[idx]))
    return out


def metric_values(rows: pd.DataFrame, index: str | Sequence[str], *, metrics: Sequence[str] = PAIRED_METRICS,
                  where: Where = None, order: Sequence | None = None) -> pd.DataFrame:
    """One line per point (the `index` columns; the points that have a row of `metrics[0]`, else of any
    of them), with columns `<metric>` and `<metric>_se` for each of `metrics` (NaN where a point has no
    such row). Lines follow `order` on the first index column
    (others after it, in order of appearance), then the other index columns ascending."""
    index = [index] if isinstance(index, str) else list(index)
    rows = _dedupe(select(rows, where), index)
    rows = rows[rows["metric"].isin(metrics)]
    points = rows[rows["metric"] == metrics[0]] if (rows["metric"] == metrics[0]).any() else rows
    keys = points[index].drop_duplicates()
    out = keys.set_index(index) if len(index) > 1 else keys.set_index(index[0])
    for metric in metrics:
        part = rows[rows["metric"] == metric].drop_duplicates(subset=index)
        values = part.set_index(index)["value"] if len(part) else pd.Series(dtype=float)
        ses = pd.Series(_stderr(part), index=values.index) if len(part) else pd.Series(dtype=float)
        out[metric] = pd.to_numeric(values.reindex(out.index), errors="coerce")
        out[f"{metric}_se"] = pd.to_numeric(ses.reindex(out.index), errors="coerce")
    first = out.index.get_level_values(0)
    rank = {g: i for i, g in enumerate(order or [])}
    sort_key = pd.DataFrame({"rank": [rank.get(g, len(rank)) for g in first], "appear": pd.factorize(first)[0]})
    for level in range(1, len(index)):
        sort_key[f"k{level}"] = out.index.get_level_values(level)
    try:
        idx = sort_key.sort_values(list(sort_key.columns), kind="stable").index
    except TypeError:  # mixed types in an index column: keep the order of appearance there
        idx = sort_key.sort_values(["rank", "appear"], kind="stable").index
    return out.iloc[idx]


def _fmt(metric: str, value: float, se: float) -> str:
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "–"
    if metric == "same_top":
        text = f"{100 * value:.1f}"
        return text + (f" ± {100 * se:.1f}" if math.isfinite(se) and se > 0 else "")
    if metric == "ppl":
        text = f"{value:.2f}" if math.isfinite(value) else "inf (collapsed)"
        return text + (f" ± {se:.2f}" if math.isfinite(se) and math.isfinite(value) else "")
    text = f"{value:.3g}"
    return text + (f" ± {se:.2g}" if math.isfinite(se) else "")


def metric_table(rows: pd.DataFrame, index: str | Sequence[str], columns: str | None = None, *,
                 metrics: Sequence[str] = PAIRED_METRICS, where: Where = None, order: Sequence | None = None
                 ) -> pd.DataFrame:
    """The per-point table to display: "PPL ± SE | KL ± SE | same-top-1 %" (text cells, "–" where a
    point lacks the metric, e.g. stored by older code). `columns`: a column of the rows to spread
    across (e.g. ratio), giving (value, metric) column pairs; None keeps one line per point."""
    keys = [index] if isinstance(index, str) else list(index)
    values = metric_values(rows, keys + ([columns] if columns else []), metrics=metrics, where=where, order=order)
    text = pd.DataFrame(index=values.index)
    for metric in metrics:
        text[METRIC_LABELS.get(metric, f"{metric} ± SE")] = [
            _fmt(metric, v, s) for v, s in zip(values[metric], values[f"{metric}_se"])]
    if columns is None:
        return text
    wide = text.unstack(columns).swaplevel(0, 1, axis=1)
    spread = list(pd.unique(values.index.get_level_values(columns)))
    try:
        spread = sorted(spread)
    except TypeError:
        pass
    labels = [METRIC_LABELS.get(m, f"{m} ± SE") for m in metrics]
    wide = wide.reindex(columns=pd.MultiIndex.from_product([spread, labels], names=[columns, None]))
    lines = values.index.droplevel(columns).unique()
    return wide.reindex(lines).fillna("–")


def paired_note(rows: pd.DataFrame, metric: str = "kl_mean", *, where: Where = None) -> str | None:
    """A one-line note when some points have a PPL row but no `metric` row (points stored by code that
    predates the paired evaluation): their `metric` cells stay blank and their curves are left out.
    None when every point has it."""
    rows = _dedupe(select(rows, where))
    key = "config_hash" if "config_hash" in rows.columns else None
    ppl = rows[rows["metric"] == "ppl"]
    if ppl.empty:
        return None
    if key is None:
        have, total = int((rows["metric"] == metric).sum()), len(ppl)
    else:
        with_metric = set(rows.loc[rows["metric"] == metric, key])
        total = ppl[key].nunique()
        have = sum(k in with_metric for k in pd.unique(ppl[key]))
    if have >= total:
        return None
    return (f"note: {total - have} of {total} points have no {metric} rows (stored before the paired evaluation); "
            f"their {METRIC_NAMES.get(metric, metric)} cells are blank and they are left out of its curves "
            "(re-run them to add it)")


# -- sentences for the computed conclusions -------------------------------------------------------

def decisive_point(fits: Mapping[str, PTPFit], candidates: Iterable[float], axis: str = "sparsity",
                   baseline_bits: float = 16.0) -> float | None:
    """The first measured point at or past the median fitted PTP of `fits` (the compression just
    after the knee, where methods part ways), from `candidates` on the curves' own axis (ratios, or
    bits for axis="bits", where "past" means fewer bits). None when no fit has a PTP."""
    s0 = [f.s0 for f in fits.values() if f.has_ptp and math.isfinite(f.s0)]
    values = np.unique(np.asarray(list(candidates), dtype=float))
    values = values[np.isfinite(values)]
    if not s0 or values.size == 0:
        return None
    ratio = bits_to_ratio(values, baseline_bits) if axis == "bits" else values
    past = ratio >= float(np.median(s0)) - 1e-9
    if not past.any():
        return None
    return float(values[past][np.argmin(ratio[past])])


def _at_values(rows: pd.DataFrame, by: str, at_col: str, metrics: Sequence[str], at: float | None,
               prefer: str) -> tuple[float | None, pd.DataFrame]:
    values = metric_values(rows, [by, at_col], metrics=metrics)
    finite = values[list(metrics)].notna().all(axis=1)
    if at is None:
        counts = values[finite].groupby(level=at_col).size()
        if counts.empty:
            return None, values.iloc[0:0]
        best = counts[counts == counts.max()].index.to_numpy(dtype=float)
        at = float(best.max() if prefer == "max" else best.min())
    pick = np.isclose(values.index.get_level_values(at_col).to_numpy(dtype=float), at)
    return at, values[pick].droplevel(at_col)


def order_agreement(rows: pd.DataFrame, by: str, at_col: str, *, at: float | None = None, metric: str = "kl_mean",
                    reference: str = "ppl", where: Where = None, rename: Mapping | Callable | None = None,
                    prefer: str = "max", at_text: str = "ratio {:g}") -> str:
    """One sentence: at `at_col` == `at`, is the order of the `by` groups (best first) by `metric`
    the same as by `reference` (PPL)? Kendall's τ when they differ. `at` None: the value of `at_col`
    where the most groups have both metrics, the largest (prefer="max") or smallest ("min", e.g.
    fewest bits) among ties; `at_text` formats it ("{:g} bits"). Says so, instead of raising, when the
    metric is missing."""
    rows = select(rows, where)
    name, ref = METRIC_NAMES.get(metric, metric), METRIC_NAMES.get(reference, reference)
    if not (rows["metric"] == metric).any():
        return f"No {name} rows are stored for these points (older code): the {name} order is not compared."
    at, values = _at_values(rows, by, at_col, (reference, metric), at, prefer)
    where_text = at_text.format(at) if at is not None else ""
    both = values[values[metric].notna() & values[reference].notna()]
    if len(both) < 2:
        return (f"Fewer than two curves have both {ref} and {name} at {where_text or 'a common point'}: "
                f"the {name} order is not compared.")
    labels = [_rename(g, rename) for g in both.index]
    by_ref = [labels[i] for i in np.argsort(both[reference].to_numpy(dtype=float), kind="stable")]
    by_metric = [labels[i] for i in np.argsort(both[metric].to_numpy(dtype=float), kind="stable")]
    lacking = len(values) - len(both)
    tail = f" ({lacking} curve(s) there lack {name})" if lacking else ""
    if by_ref == by_metric:
        return (f"At {where_text}, the {name} order of the {len(both)} curves (best first: "
                f"{', '.join(by_metric)}) agrees with the {ref} order{tail}.")
    tau = kendalltau(both[reference].rank(), both[metric].rank()).statistic  # ranks: a collapse (inf) is last
    return (f"At {where_text}, the {name} order (best first: {', '.join(by_metric)}) differs from the {ref} "
            f"order ({', '.join(by_ref)}; Kendall τ = {tau:.2f}){tail}.")


def widest_interval(fits: Mapping[str, PTPFit]) -> str:
    """One sentence: the curve whose PTP has the widest 95% s0 interval (and whether the fits carried
    per-point SEs), or why there is none."""
    with_ptp = {k: f for k, f in fits.items() if f.has_ptp and all(map(math.isfinite, f.s0_ci))}
    if not with_ptp:
        return "No measured curve has a PTP, so there is no s0 interval to compare."
    label, fit = max(with_ptp.items(), key=lambda kv: kv[1].s0_ci[1] - kv[1].s0_ci[0])
    width = fit.s0_ci[1] - fit.s0_ci[0]
    size = f"{width * fit.baseline_bits:.2f} bits" if fit.axis == "bits" else f"{width:.3f} in ratio"
    n_weighted = sum(f.weighted for f in fits.values())
    noise = (f"with the per-point SEs in {n_weighted} of {len(fits)} fits" if n_weighted
             else "without per-point SEs (none stored)")
    return (f"The widest PTP interval ({len(with_ptp)} curve(s) with a PTP, {noise}) is {label}'s: "
            f"{fit.ptp_ci_text} (width {size}).")


def ranking_at(table: pd.DataFrame | None, dense: float | None = None, at: float | None = None,
               at_text: str = "ratio {:g}") -> str:
    """One sentence: the curves (rows of `table`, one numeric column per ratio, values PPL) ranked best
    first at column `at`, by default the largest ratio every row was measured at (else the one most
    rows reached); each value as a multiple of `dense` when given. A collapse (inf) ranks last."""
    if table is None or table.empty:
        return "No measured point to rank."
    reached = table.notna().sum()
    if at is None:
        full = [c for c in table.columns if reached[c] == len(table)]
        at = max(full) if full else max(c for c in table.columns if reached[c] == reached.max())
    if at not in table.columns:
        return f"No curve was measured at {at_text.format(at)}."
    values = table[at].dropna().astype(float).sort_values(na_position="last")
    if values.empty:
        return f"No curve has a measured value at {at_text.format(at)}."

    def text(v: float) -> str:
        if not math.isfinite(v):
            return "collapsed"
        return f"×{v / dense:.2f} of dense" if dense and math.isfinite(dense) else f"PPL {v:.4g}"

    return (f"At {at_text.format(at)} ({len(values)} of {len(table)} curves measured there; best first): "
            + ", ".join(f"{label} {text(v)}" for label, v in values.items()) + ".")


AGREEMENT_KINDS = ("agrees", "consistent", "disagrees", "untestable", "no claim")  # `ptp_table`'s verdicts


def _native(s0: float, axis: str) -> str:
    """A ratio-axis s0 on its curve's own axis: '3.20 bits' for quantization, else '0.350'."""
    return f"{float(ratio_to_bits(s0)):.2f} bits" if axis == "bits" else f"{s0:.3f}"


def _with_ptp(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["has_ptp"].astype(bool) & np.isfinite(table["s0"].astype(float))]


def ptp_summary(table: pd.DataFrame | None, name: str, max_names: int = 4) -> str:
    """One sentence on a `mpt_utils.ptp.ptp_table` (one group of curves, e.g. ours or the published
    ones): how many curves have a PTP and where (on the claim's own axis: bits for quantization), the
    claimed range, and how many curves agree, are consistent with, disagree with or cannot test the
    claim, naming the curves of each verdict when there are at most `max_names`. Says so instead of
    raising when the table is empty."""
    if table is None or len(table) == 0:
        return f"{name}: no curve was fitted (nothing measured for it in this run)."
    found = _with_ptp(table)
    where = ""
    if len(found):
        bits = str(found["axis"].iloc[0]) == "bits"
        values = ratio_to_bits(found["s0"].to_numpy(float)) if bits else found["s0"].to_numpy(float)
        digits, unit = (2, " bits") if bits else (3, "")
        lo, hi = f"{values.min():.{digits}f}", f"{values.max():.{digits}f}"
        where = f", at {lo if lo == hi else f'{lo}–{hi}'}{unit}"
    claims = sorted({str(c) for c in table["claim"] if isinstance(c, str) and c})
    claim = f"; claimed {', '.join(claims)}" if claims else "; no published claim"
    kinds = table["agreement"].astype(str).str.split(":").str[0].str.strip()
    parts = []
    for kind in [*AGREEMENT_KINDS, *sorted(set(kinds) - set(AGREEMENT_KINDS))]:
        curves = table.loc[kinds == kind, "curve"].astype(str).tolist()
        if curves:
            parts.append(f"{kind} {len(curves)}" + (f" ({', '.join(curves)})" if len(curves) <= max_names else ""))
    return f"{name}: PTP in {len(found)} of {len(table)} curves{where}{claim}: {'; '.join(parts)}."


def ptp_shift(ours: pd.DataFrame | None, published: pd.DataFrame | None, ours_name: str = "ours",
              published_name: str = "the published curves") -> str:
    """One sentence: the median fitted PTP of our curves against that of the published ones under
    the same fit (on the ratio axis, shown on the curves' own axis), and which side transitions
    earlier (less compression), or why they cannot be compared."""
    a = _with_ptp(ours) if ours is not None and len(ours) else None
    b = _with_ptp(published) if published is not None and len(published) else None
    missing = [n for n, t in ((ours_name, a), (published_name, b)) if t is None or t.empty]
    if missing:
        return f"Median PTP not compared: no PTP was found for {' nor '.join(missing)}."
    ma, mb = float(a["s0"].median()), float(b["s0"].median())
    axis = str(a["axis"].iloc[0])
    if math.isclose(ma, mb, abs_tol=1e-3):
        side = "at the same point"
    else:
        side = (f"{'earlier (less compression)' if ma < mb else 'later (more compression)'}, "
                f"by {abs(ma - mb):.3f} in ratio")
    return (f"Median PTP: {ours_name} {_native(ma, axis)} ({len(a)} curve(s)) vs {published_name} "
            f"{_native(mb, axis)} ({len(b)} curve(s)): {ours_name} transition(s) {side}.")


def ptp_later(table: pd.DataFrame | None, by: str, early: str, late: str, name: str = "") -> str:
    """One sentence: is the median PTP of the curves whose `by` column is `late` at more compression
    than that of those marked `early` (e.g. low-rank Mode II against Mode I)? Or why it cannot say."""
    prefix = f"{name}: " if name else ""
    if table is None or len(table) == 0 or by not in table.columns:
        return f"{prefix}no fitted curves to compare {early} with {late}."
    found = _with_ptp(table)
    medians = found.groupby(found[by].astype(str))["s0"].median()
    lacking = [g for g in (early, late) if g not in medians.index]
    if lacking:
        return f"{prefix}no curve of {' nor '.join(lacking)} has a PTP: {early} vs {late} not compared."
    e, lt = float(medians[early]), float(medians[late])
    verdict = "later (more compression)" if lt > e else "not later"
    return f"{prefix}median PTP {early} {e:.3f} vs {late} {lt:.3f}: {late} transitions {verdict}."


def speedup_claim(speed: pd.DataFrame | None, *, label: str = "label", ratio: str = "ratio",
                  value: str = "value", below: float = 0.5, limit: float = 2.0) -> str:
    """One sentence on the Perspective's speed claim (structured sparsity below ~50% gains less than
    2×): the largest measured speed-up among the points with `ratio` < `below`, and whether it stays
    under `limit`. `speed`: one row per timed point with its `label`, `ratio` and speed-up `value`."""
    if speed is None or len(speed) == 0:
        return "No speed point was timed: the speed claim is not checked."
    part = speed[(speed[ratio].astype(float) < below) & np.isfinite(speed[value].astype(float))]
    if part.empty:
        return f"No speed point below {below:.0%} was timed: the speed claim is not checked."
    best = part.loc[part[value].astype(float).idxmax()]
    under = float(best[value]) < limit
    return (f"Below {below:.0%} the largest speed-up over dense of {len(part)} timed point(s) is ×{float(best[value]):.2f} "
            f"({best[label]} at {float(best[ratio]):g}): {'under' if under else 'not under'} ×{limit:g}, "
            f"{'as the Perspective claims' if under else 'against the Perspective claim'}.")


# -- figure ---------------------------------------------------------------------------------------

def plot_metric_curves(ax: plt.Axes, curves: Sequence[tuple], *, ylabel: str, xlabel: str | None = None,
                       title: str | None = None, logy: bool = True, invert_x: bool = False,
                       palette: str | Sequence | None = None, legend: bool = True) -> plt.Axes:
    """Each (label, x, y[, y_se]) curve as a line with ±SE bars, e.g. KL against the ratio. Values
    ≤ 0 (dense KL = 0) are left out (`mpt_utils.plots.plot_line` draws positive values only); inf/NaN
    are marked at the top edge. Colors follow `sns.color_palette(palette)` in curve order, as in
    `plot_ptp_curves`, so the same curves get the same colors."""
    curves = list(curves)
    colors = sns.color_palette(palette, n_colors=max(len(curves), 1))
    for color, (label, x, y, *rest) in zip(colors, curves):
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        if rest and rest[0] is not None:
            se = np.asarray(rest[0], dtype=float)
            ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(se) & (y > 0 if logy else True)
            low = np.minimum(se[ok], 0.999 * y[ok]) if logy else se[ok]  # a log axis has no room below 0
            ax.errorbar(x[ok], y[ok], yerr=[low, se[ok]], fmt="none", ecolor=color, elinewidth=0.8, capsize=2,
                        label="_nolegend_")
        plot_line(ax, x, y, "-o", ms=3, color=color, label=label)
    if logy:
        ax.set_yscale("log")
    if invert_x and not ax.xaxis_inverted():
        ax.invert_xaxis()
    ax.set(xlabel=xlabel or "compression ratio", ylabel=ylabel)
    if title:
        ax.set_title(title)
    if legend and curves:
        ax.legend(fontsize="x-small", ncol=1 if len(curves) < 8 else 2)
    return ax
