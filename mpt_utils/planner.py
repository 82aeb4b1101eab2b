"""The phase-avoidance planner (eq. 6 of the Perspective).

    min_C Size(C)  s.t.  L(C) − L_base ≤ ε  and  C ∈ S_safe = {s < PTP_prune, b > PTP_quant, r < PTP_rank}

Each compression dimension d contributes a fitted curve L_d(s_d) on its own compression-ratio axis
(fraction of weight bytes it removes). Following the Perspective's orthogonality argument, the
damages add: L(C) = L_base + Σ_d (L_d(s_d) − L_d(0)), and sizes multiply: Size(C) = Π_d (1 − s_d).
The additivity is an assumption the user can check against measured combined points (Tables 8–10).
The planner solves the problem exactly on a grid (a few dimensions × ~50 steps is cheap), and the
execution order is fixed by the paper's argument: decomposition → pruning → quantization.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mpt_utils.errors import MPTError

EXECUTION_ORDER = ("lowrank", "prune", "quant")  # structural changes first, quantize last


@dataclass
class Dimension:
    """One compression axis: `predict(s)` gives the metric (PPL) at ratio s; `ptp` bounds the safe zone."""

    name: str  # "quant", "prune" or "lowrank" (any name works; these fix the execution order)
    predict: Callable[[np.ndarray], np.ndarray]
    ptp: float  # safe zone is s < ptp (use the largest measured ratio when no PTP was found)
    grid: Sequence[float] | None = None  # ratios the dimension can actually realise (e.g. bit widths)
    margin: float = 0.0  # stay this far below the PTP

    def safe_grid(self, steps: int) -> np.ndarray:
        values = np.asarray(self.grid if self.grid is not None else np.linspace(0, self.ptp, steps), float)
        # strictly below the PTP (the event horizon), and the uncompressed point is always allowed
        return np.unique(np.append(values[values < self.ptp - self.margin - 1e-12], 0.0))


@dataclass
class Plan:
    ratios: dict[str, float]
    size: float  # fraction of the original weight bytes kept
    predicted: float  # predicted metric of the combined configuration
    base: float
    epsilon: float
    order: tuple[str, ...]

    @property
    def compression(self) -> float:
        return 1.0 - self.size


def _validate(dims: Sequence[Dimension], epsilon: float) -> None:
    if not dims:
        raise MPTError("the planner needs at least one dimension", "pass Dimension(...) for quant/prune/lowrank")
    if epsilon < 0:
        raise MPTError(f"epsilon={epsilon} is negative", "pass the tolerated metric increase, e.g. 0.5 PPL")
    names = [d.name for d in dims]
    if len(set(names)) != len(names):
        raise MPTError(f"dimension names repeat: {names}", "give each dimension its own name")


def _table(dims: Sequence[Dimension], steps: int, base: float | None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Every safe combination: ratios [k, d], kept size [k], predicted metric [k], base metric.
    `base` is the dense metric; by default the first dimension's curve at ratio 0."""
    grids = [d.safe_grid(steps) for d in dims]
    if base is None:
        base = float(dims[0].predict(np.array([0.0]))[0])
    combos = np.array(list(itertools.product(*grids)), dtype=float)
    damage = np.zeros(len(combos))
    for j, d in enumerate(dims):
        at0 = float(d.predict(np.array([0.0]))[0])
        damage += np.asarray(d.predict(combos[:, j]), float) - at0
    size = np.prod(1.0 - combos, axis=1)
    return combos, size, base + damage, base


def plan(dims: Sequence[Dimension], epsilon: float, steps: int = 41, base: float | None = None) -> Plan:
    """The smallest configuration inside the safe zone whose predicted metric stays within ε."""
    _validate(dims, epsilon)
    combos, size, predicted, base = _table(dims, steps, base)
    ok = np.isfinite(predicted) & (predicted - base <= epsilon)
    if not ok.any():
        raise MPTError("no configuration meets the tolerance", "raise epsilon")
    idx = np.flatnonzero(ok)
    best = idx[np.lexsort((predicted[idx], size[idx]))[0]]  # smallest size, then lowest metric
    order = tuple(sorted((d.name for d in dims),
                         key=lambda n: EXECUTION_ORDER.index(n) if n in EXECUTION_ORDER else len(EXECUTION_ORDER)))
    return Plan({d.name: float(combos[best, j]) for j, d in enumerate(dims)}, float(size[best]),
                float(predicted[best]), base, float(epsilon), order)


def trajectory(dims: Sequence[Dimension], sizes: Sequence[float], steps: int = 41,
               base: float | None = None) -> pd.DataFrame:
    """Minimum-metric safe configuration at each size budget: the 'minimum energy path' of Fig. 8."""
    _validate(dims, 0.0)
    combos, size, predicted, base = _table(dims, steps, base)
    rows = []
    for budget in sorted(sizes, reverse=True):
        fits = np.flatnonzero((size <= budget + 1e-12) & np.isfinite(predicted))
        if fits.size == 0:
            rows.append({"size_budget": budget, "feasible": False})
            continue
        best = fits[np.argmin(predicted[fits])]
        rows.append({"size_budget": budget, "feasible": True, "size": float(size[best]),
                     "predicted": float(predicted[best]), "delta": float(predicted[best] - base),
                     **{d.name: float(combos[best, j]) for j, d in enumerate(dims)}})
    return pd.DataFrame(rows)


def dimension_from_fit(name: str, fit, grid: Sequence[float] | None = None, margin: float = 0.0) -> Dimension:
    """A planner dimension from a `mpt_utils.ptp.PTPFit`: its prediction, and its PTP as the bound
    (or the largest measured ratio when the fit found no PTP: we do not extrapolate past the data).
    Without a PTP, a collapsed (censored) point also caps the bound: nothing at or past it is safe."""
    s = np.asarray(fit.s, dtype=float)
    censored = np.asarray(getattr(fit, "censored", np.zeros(s.shape, bool)), dtype=bool)
    bound = float(fit.s0) if fit.has_ptp else float(np.max(s[~censored]))
    if not fit.has_ptp and censored.any():
        bound = min(bound, float(np.min(s[censored])))
    return Dimension(name, lambda s: fit.predict(s), bound, grid, margin)


def additivity_check(grid: pd.DataFrame, row: str = "ratio", col: str = "scheme", value: str = "value",
                     base_row=0.0, base_col="FP16") -> pd.DataFrame:
    """Test the orthogonality assumption on a measured 2-D grid (e.g. Table 10: Wanda ratio × GGUF
    scheme): predict each combined point from its two marginals, L(a,b) ≈ L(a,0) + L(0,b) − L(0,0),
    and report the prediction next to the measurement."""
    table = grid.pivot_table(index=row, columns=col, values=value, aggfunc="first")
    if base_row not in table.index or base_col not in table.columns:
        raise MPTError(f"grid lacks the uncompressed margins ({row}={base_row}, {col}={base_col})",
                       "pass a grid that contains both single-method margins")
    base = table.loc[base_row, base_col]
    pred = table[[base_col]].to_numpy() + table.loc[[base_row]].to_numpy() - base
    out = table.stack().rename("measured").to_frame()
    out["predicted"] = pd.DataFrame(pred, index=table.index, columns=table.columns).stack()
    out["rel_error"] = out["predicted"] / out["measured"] - 1.0
    return out.reset_index()


def published_dimensions(fit=None) -> tuple[list[Dimension], dict[str, object], float]:
    """Planner dimensions for LLaMA-2-7B from the published curves the Perspective's Fig. 8 uses:
    GGUF ladder (Table 10, 0% row; ratio = 1 − relative size), ADMM (Table 2), ASVD (Table 7).
    Returns the dimensions, their fits and the dense PPL of the GGUF protocol (Table 10 FP16)."""
    from mpt_utils.ptp import fit_ptp
    from mpt_utils.published import load_published

    fit = fit or fit_ptp
    t10 = load_published("table10")
    ladder = t10[t10.ratio == 0].sort_values("size_pct", ascending=False)
    quant_s = 1.0 - ladder.size_pct.to_numpy(float) / 100.0
    t2 = load_published("table2")
    admm = t2[(t2.method == "ADMM") & (t2.pattern == "unstructured")]
    t7 = load_published("table7")
    asvd = t7[(t7.method == "ASVD") & (t7.metric == "wikitext2_ppl")]
    fits = {"quant": fit(quant_s, ladder.value.to_numpy(float)),
            "prune": fit(admm.ratio.to_numpy(float), admm.value.to_numpy(float)),
            "lowrank": fit(asvd.ratio.to_numpy(float), asvd.value.to_numpy(float))}
    dims = [dimension_from_fit("quant", fits["quant"], grid=quant_s), dimension_from_fit("prune", fits["prune"]),
            dimension_from_fit("lowrank", fits["lowrank"])]
    return dims, fits, float(ladder[ladder.scheme == "FP16"].value.iloc[0])


# the Perspective's Table 3 (data/published/perspective_table3.csv): the PTP-guided point's ratio per dimension
PUBLISHED_RATIOS = {"quant": "quant_compression_pct", "prune": "prune_sparsity_pct", "lowrank": "rank_reduction_pct"}


def published_ptp_point(paper: pd.DataFrame) -> dict | None:
    """The Perspective's PTP-guided LLaMA2-7B point from its Table 3 (`load_published("perspective_table3")`,
    the first model whose name holds "PTP" and that prints a WikiText-2 PPL): `model`, `config`, `ppl`,
    `size_gb`, `kept` (1 − compression_pct/100) and `ratios` per planner dimension (fractions). None when
    the table has no such point."""
    ptp = paper[paper["model"].astype(str).str.contains("PTP")]
    with_ppl = ptp[ptp["metric"] == "wikitext2_ppl"]
    if with_ppl.empty:
        return None
    first = with_ppl.iloc[0]
    rows = ptp[(ptp["model"] == first["model"]) & (ptp["config"] == first["config"])]
    value = rows.groupby("metric")["value"].first()
    return {"model": first["model"], "config": first["config"], "ppl": float(first["value"]),
            "size_gb": float(value.get("size_gb", np.nan)),
            "kept": 1.0 - float(value.get("compression_pct", np.nan)) / 100.0,
            "ratios": {d: float(value[m]) / 100.0 for d, m in PUBLISHED_RATIOS.items() if m in value.index}}


def _ratios_text(ratios: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())


def plan_vs_published(dims: Sequence[Dimension], dense: float, point: dict | None, steps: int = 41) -> list[str]:
    """Sentences comparing our eq. 6 plan with the published PTP-guided point: the plan at the same
    tolerance (ε = the published point's PPL − `dense`), its size kept and ratios against the
    published ones, and, where our plan compresses a dimension less than the paper, whether that
    dimension's fitted safe bound (its PTP) lies before the published ratio. Says so instead of
    raising when there is no published point or no plan."""
    if point is None:
        return ["no published PTP-guided point to compare with"]
    eps = point["ppl"] - dense
    if eps < 0:
        return [f"the published point's PPL {point['ppl']:g} is below dense {dense:.2f}: no tolerance to plan at"]
    try:
        p = plan(dims, eps, steps=steps, base=dense)
    except MPTError as err:
        return [f"no plan within ε = {eps:.2f} PPL: {err.message}"]
    lines = [f"at ε = {eps:.2f} PPL (the published point's {point['ppl']:g} − dense {dense:.2f}) our plan keeps "
             f"{p.size:.1%} of the weight bytes ({_ratios_text(p.ratios)}; predicted PPL {p.predicted:.2f}); the "
             f"published {point['model']} ({point['config']}) keeps {point['kept']:.1%} "
             f"({_ratios_text(point['ratios'])}), {'smaller' if point['kept'] < p.size else 'not smaller'} than ours"]
    by_name = {d.name: d for d in dims}
    for name, theirs in point["ratios"].items():
        ours = p.ratios.get(name)
        if ours is None or ours >= theirs - 1e-9 or name not in by_name:
            continue
        bound = by_name[name].ptp
        why = (f"our fitted safe bound {bound:.3f} lies at or before the published {theirs:.2f}, so the plan "
               "may not go there" if bound <= theirs + 1e-9 else
               f"its safe bound {bound:.3f} allows {theirs:.2f}, but another dimension costs less PPL per byte")
        lines.append(f"{name}: the plan uses {ours:.2f}, less than the published {theirs:.2f}: {why}")
    return lines
