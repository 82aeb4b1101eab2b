"""Eq. 6's planner on a model's own measured curves, and the plan turned back into a recipe.

`mpt_utils.planner` solves eq. 6 on a grid for any `Dimension`s (a prediction and a PTP bound per
compression axis, damages added, sizes multiplied). This module feeds it a model's own curves:

- `dimensions_from_curves` fits each measured curve with `fit_ptp` (weighted by the perplexity SEs)
  and bounds the safe zone by the LOW end of the PTP's confidence interval (`conservative=True`): the
  data cannot rule out a knee anywhere in the interval, so the planner must not step past its lower
  end. Without a PTP, `planner.dimension_from_fit`'s rule applies (the largest ratio measured without
  a collapse). Each prediction is anchored at the measured dense PPL, so a plan's predicted PPL is
  dense + Σ_d (L_d(s_d) − L_d(0));
- `plan_for` answers the two questions a user asks, on the planner's own table of safe
  configurations (`planner._table`, not a second grid search): the smallest configuration within ε
  of dense, or under a byte budget the lowest predicted PPL (both: the smallest within ε that fits).
  Bytes come from a `size_model` ({name: ratios} -> bytes), e.g. `size_model_for(dense_model)`;
  an ε or budget no safe configuration meets is one MPTError naming the closest feasible plan;
- `plan_to_recipe` writes the plan in the recipe grammar, e.g. `asvd@0.12 > admm@0.43 > gguf:Q5_K_M`,
  the quantization ratio s mapped back to bits = 16·(1 − s) and to the GGUF scheme with that many
  nominal bits (`quant.gguf.quantize.SCHEMES`; the quant dimension's default grid holds exactly
  those widths, so every plan lands on a scheme).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from mpt_utils.errors import MPTError
from mpt_utils.planner import EXECUTION_ORDER, Dimension, Plan, _table, _validate, dimension_from_fit

BASELINE_BITS = 16.0
# recipe methods for the planner's dimensions (the Perspective's Fig. 8 trio: ASVD, ADMM, the GGUF ladder)
DEFAULT_METHODS = {"lowrank": "asvd", "prune": "admm", "quant": "gguf"}
SCHEME_PREFERENCE = ("_K_M", "_K", "_0")  # among schemes of one nominal width: the k-quant mixes first
RATIO_DIGITS = 3  # recipe ratios are floored to this many decimals (flooring stays inside the safe zone)

SizeModel = Callable[[Mapping[str, np.ndarray]], np.ndarray]


@dataclass
class CurveDimension(Dimension):
    """A planner dimension fitted from a measured curve: the fit, and which bound limits it
    ("s0_ci_low", "s0", "max_measured" or "collapse")."""

    fit: Any = None
    bound: str = ""


@dataclass
class SizedPlan(Plan):
    """A `planner.Plan` with its bytes under the size model (nan without one) and the budget asked."""

    size_bytes: float = math.nan
    budget_bytes: float | None = None

    def describe(self) -> str:
        parts = [f"{name}={ratio:.4g}" + (f" ({BASELINE_BITS * (1 - ratio):.3g} bits)" if name == "quant" else "")
                 for name, ratio in self.ratios.items()]
        size = f"{self.size_bytes:,.0f} bytes" if math.isfinite(self.size_bytes) else f"{self.size:.3f} of dense"
        return f"{', '.join(parts)}: {size}, predicted PPL {self.predicted:.4g} (+{self.predicted - self.base:.3g})"


# -- dimensions from curves --------------------------------------------------------------------------
def gguf_bit_widths() -> list[int]:
    """Nominal widths llama.cpp can write without an importance matrix, up to 16 bits."""
    from mpt_utils.quant.gguf.quantize import NEEDS_IMATRIX, SCHEMES

    return sorted({int(bits) for scheme, (_, bits) in SCHEMES.items()
                   if scheme not in NEEDS_IMATRIX and bits <= BASELINE_BITS})


def gguf_ratio_grid() -> list[float]:
    """The quant dimension's realisable ratios, 1 − bits/16 for each `gguf_bit_widths` (0 = 16 bits)."""
    return sorted(1.0 - b / BASELINE_BITS for b in gguf_bit_widths())


def _axis(name: str, x: np.ndarray, axes: Mapping[str, str] | None) -> str:
    if axes and name in axes:
        return axes[name]
    return "bits" if x.size and float(np.nanmin(x)) >= 1.0 else "sparsity"


def _bound(fit, conservative: bool) -> tuple[float, str] | None:
    """The conservative bound of a fit with a PTP (None: `dimension_from_fit`'s rule applies)."""
    if not fit.has_ptp:
        return None
    lo = float(fit.s0_ci[0])
    if conservative and math.isfinite(lo):
        return min(lo, float(fit.s0)), "s0_ci_low"
    return float(fit.s0), "s0"


def dimensions_from_curves(curves: Mapping[str, Sequence[Any]], dense_ppl: float, conservative: bool = True, *,
                           grids: Mapping[str, Sequence[float] | None] | None = None,
                           axes: Mapping[str, str] | None = None, margin: float = 0.0,
                           **fit_options: Any) -> list[CurveDimension]:
    """One planner dimension per measured curve, `curves[name] = (x, y, y_se)` (`y_se` may be None).

    x is the compression ratio of that axis in [0, 1) (fraction of the weight bytes it removes:
    sparsity, low-rank parameter reduction, 1 − bits/16), or bits per weight (a curve whose x are
    all ≥ 1 is read as bits; `axes={name: "bits" | "sparsity"}` says it explicitly). Each is fitted
    with `fit_ptp(x, y, y_se=y_se, axis=..., **fit_options)`; its bound is the low end of the PTP's
    confidence interval (`conservative`, the default) or s0 itself, and without a PTP the largest ratio
    measured before any collapse. Predictions are anchored at `dense_ppl`. `grids`: the ratios a
    dimension can realise (default: the GGUF widths for "quant", a continuous grid otherwise)."""
    from mpt_utils.ptp import fit_ptp

    if not (isinstance(dense_ppl, int | float) and math.isfinite(dense_ppl) and dense_ppl > 0):
        raise MPTError(f"dense_ppl={dense_ppl!r} is not a positive perplexity", "pass the dense model's measured PPL")
    if not curves:
        raise MPTError("no curves to plan on", "pass {name: (x, y, y_se)} for quant / prune / lowrank")
    grids = dict(grids or {})
    dims = []
    for name in sorted(curves, key=lambda n: EXECUTION_ORDER.index(n) if n in EXECUTION_ORDER else len(EXECUTION_ORDER)):
        value = tuple(curves[name])
        if len(value) not in (2, 3):
            raise MPTError(f"curve {name!r} is not (x, y, y_se)", "pass each curve as (x, y, y_se); y_se may be None")
        x, y = np.asarray(value[0], dtype=float), np.asarray(value[1], dtype=float)
        y_se = None if len(value) == 2 or value[2] is None else np.asarray(value[2], dtype=float)
        fit = fit_ptp(x, y, y_se=y_se, axis=_axis(name, x, axes), **fit_options)
        at0 = float(fit.predict(np.array([0.0]))[0])
        if not math.isfinite(at0):
            raise MPTError(f"curve {name!r} could not be fitted ({fit.verdict})",
                           "measure at least 3 distinct ratios (7 or more to find a PTP)")
        grid = grids[name] if name in grids else (gguf_ratio_grid() if name == "quant" else None)
        base = dimension_from_fit(name, fit, grid, margin)
        chosen = _bound(fit, conservative)
        if chosen is None:
            measured = np.asarray(fit.s)[~np.asarray(fit.censored, dtype=bool)]
            chosen = base.ptp, "max_measured" if base.ptp >= float(np.max(measured)) else "collapse"
        dims.append(CurveDimension(name, _anchored(fit, at0, float(dense_ppl)), chosen[0], grid, margin,
                                   fit=fit, bound=chosen[1]))
    return dims


def _anchored(fit, at0: float, dense_ppl: float) -> Callable[[np.ndarray], np.ndarray]:
    def predict(s: np.ndarray) -> np.ndarray:
        return fit.predict(s) - at0 + dense_ppl

    return predict


# -- sizes ------------------------------------------------------------------------------------------------
def block_size_model(block_bytes: float, other_bytes: float) -> SizeModel:
    """Bytes = other + block · Π_d (1 − s_d): the compression axes act on the decoder-block linears,
    everything else (embeddings, head, norms) stays as it is (`compression_axis`'s accounting)."""

    def size(ratios: Mapping[str, np.ndarray]) -> np.ndarray:
        kept = np.ones(1)
        for s in ratios.values():
            kept = kept * (1.0 - np.asarray(s, dtype=float))
        return other_bytes + block_bytes * kept

    return size


def size_model_for(model: nn.Module, dense_dtype_bytes: float = 2) -> SizeModel:
    """`block_size_model` of a dense model's nominal bytes (`compression_axis.weight_bytes`)."""
    from mpt_utils.compression_axis import weight_bytes

    wb = weight_bytes(model, dense_dtype_bytes)
    return block_size_model(wb.block_linear, wb.total - wb.block_linear)


# -- planning -------------------------------------------------------------------------------------------
@dataclass
class _Table:
    """The planner's table of safe configurations (`planner._table`) with each one's bytes."""

    dims: Sequence[Dimension]
    combos: np.ndarray  # [k, d] ratios
    frac: np.ndarray  # [k] fraction of the block-linear bytes kept (the planner's size)
    nbytes: np.ndarray  # [k] bytes under the size model (= frac without one)
    predicted: np.ndarray  # [k]
    base: float
    has_bytes: bool

    def plan(self, i: int, epsilon: float | None, budget: float | None) -> SizedPlan:
        names = [d.name for d in self.dims]
        order = tuple(sorted(names, key=lambda n: EXECUTION_ORDER.index(n) if n in EXECUTION_ORDER
                             else len(EXECUTION_ORDER)))
        return SizedPlan({n: float(self.combos[i, j]) for j, n in enumerate(names)}, float(self.frac[i]),
                         float(self.predicted[i]), self.base, math.nan if epsilon is None else float(epsilon), order,
                         size_bytes=float(self.nbytes[i]) if self.has_bytes else math.nan, budget_bytes=budget)


def plan_for(dims: Sequence[Dimension], epsilon: float | None = None, budget_bytes: float | None = None,
             size_model: SizeModel | None = None, *, allow_dense: bool = False, steps: int = 41) -> SizedPlan:
    """The plan inside the safe zone (every dimension below its bound):

    - `epsilon` alone: the smallest configuration whose predicted PPL stays within ε of dense
      (ties: the lower PPL); sizes under `size_model` when given, else the planner's kept fraction.
      The uncompressed model is within any ε, so it only counts as an answer with `allow_dense`:
      an ε that no compressing configuration meets is unreachable;
    - `budget_bytes` alone (needs `size_model`): the lowest predicted PPL that fits the budget;
    - both: the smallest configuration within ε that also fits the budget.

    Unreachable (no safe configuration meets them): one MPTError naming the closest feasible plan
    (the lowest predicted PPL that fits the budget and compresses, or when nothing safe fits the
    budget, the smallest safe configuration), also attached to the error as `.closest`."""
    if epsilon is None and budget_bytes is None:
        raise MPTError("plan_for needs epsilon or budget_bytes", "pass epsilon=0.5 (PPL above dense) or budget_bytes=...")
    if budget_bytes is not None and size_model is None:
        raise MPTError("a byte budget needs a size model", "pass size_model=size_model_for(dense_model)")
    if budget_bytes is not None and not budget_bytes > 0:
        raise MPTError(f"budget_bytes={budget_bytes} is not positive", "pass the byte budget of the compressed model")
    _validate(dims, 0.0 if epsilon is None else epsilon)
    combos, frac, predicted, base = _table(dims, steps, None)
    nbytes = frac if size_model is None else np.broadcast_to(
        np.asarray(size_model({d.name: combos[:, j] for j, d in enumerate(dims)}), dtype=float), frac.shape)
    table = _Table(dims, combos, frac, nbytes, predicted, base, size_model is not None)
    finite = np.isfinite(predicted)
    fits = nbytes <= budget_bytes * (1 + 1e-12) if budget_bytes is not None else np.ones_like(finite)
    # in ε mode, compressing nothing is no plan (it meets every ε) unless asked for
    counts = finite & fits & ((combos > 0).any(axis=1) | allow_dense | (epsilon is None))
    within = predicted - base <= epsilon + 1e-12 if epsilon is not None else finite
    ok = np.flatnonzero(counts & within)
    if ok.size:
        keys = (predicted[ok], nbytes[ok]) if epsilon is not None else (nbytes[ok], predicted[ok])
        best = ok[np.lexsort(keys)[0]]  # np.lexsort sorts by its last key first: size (ε) or PPL (budget)
        return table.plan(best, epsilon, budget_bytes)
    raise _unreachable(table, finite, counts, epsilon, budget_bytes)


def _unreachable(table: _Table, finite: np.ndarray, counts: np.ndarray, epsilon: float | None,
                 budget: float | None) -> MPTError:
    """The one error of an unreachable ε / budget, naming the closest feasible plan."""
    safe = np.flatnonzero(finite)
    if safe.size == 0:
        return MPTError("no safe configuration has a finite predicted PPL", "check the curves and their fits")
    fitting = np.flatnonzero(counts)
    fit_text = f" that fits {budget:,.0f} bytes" if budget is not None else ""
    if fitting.size:  # the least damaging configuration that is allowed at all
        closest = table.plan(fitting[np.lexsort((table.nbytes[fitting], table.predicted[fitting]))[0]], epsilon, budget)
        what = "safe configuration" if budget is not None else "safe configuration that compresses anything"
        err = MPTError(f"no {what} stays within ε={epsilon:g} of dense PPL {table.base:.4g}{fit_text}; "
                       f"closest feasible plan: {closest.describe()}",
                       f"raise epsilon to ≥ {closest.predicted - table.base:.3g}"
                       + (", or raise the budget" if budget is not None else ""))
    elif budget is None:  # every bound sits at 0: only the dense model is safe
        closest = table.plan(safe[0], epsilon, budget)
        err = MPTError("no dimension can compress inside its safe zone (every bound is at ratio 0)",
                       "measure the curves further, or pass allow_dense=True to accept the dense model")
    else:  # nothing safe fits the budget: the smallest safe configuration
        closest = table.plan(safe[np.lexsort((table.predicted[safe], table.nbytes[safe]))[0]], epsilon, budget)
        err = MPTError(f"no safe configuration fits {budget:,.0f} bytes; the smallest safe one, at the PTP "
                       f"bounds, is {closest.describe()}",
                       f"raise the budget to ≥ {closest.size_bytes:,.0f} bytes: smaller crosses a phase transition")
    err.closest = closest  # type: ignore[attr-defined]
    return err


# -- back to a recipe ----------------------------------------------------------------------------------
def scheme_for_bits(bits: int) -> str:
    """The GGUF scheme of `bits` nominal bits llama.cpp writes without an importance matrix, k-quant
    mix first (8 -> Q8_0, 6 -> Q6_K, 5 -> Q5_K_M, 4 -> Q4_K_M, 3 -> Q3_K_M, 2 -> Q2_K, 16 -> F16)."""
    from mpt_utils.quant.gguf.quantize import NEEDS_IMATRIX, SCHEMES

    found = [s for s, (_, b) in SCHEMES.items() if b == bits and s not in NEEDS_IMATRIX]
    if not found:
        raise MPTError(f"no GGUF scheme has {bits} nominal bits", f"GGUF widths: {gguf_bit_widths()}")

    def rank(scheme: str) -> int:
        return next((i for i, suffix in enumerate(SCHEME_PREFERENCE) if scheme.endswith(suffix)),
                    len(SCHEME_PREFERENCE))

    return min(found, key=lambda s: (rank(s), found.index(s)))


def _quant_bits(ratio: float) -> int:
    bits = BASELINE_BITS * (1.0 - ratio)
    if abs(bits - round(bits)) > 1e-6:
        raise MPTError(f"quant ratio {ratio:.4g} is {bits:.4g} bits, not a whole bit width",
                       "give the quant dimension grid=gguf_ratio_grid() (the default of dimensions_from_curves)")
    return int(round(bits))


def plan_to_recipe(plan: Plan, methods: Mapping[str, str] | None = None,
                   schemes: Mapping[int, str] | None = None):
    """The recipe that executes `plan`: each dimension with a ratio > 0 becomes one step of its
    method (`methods`, default DEFAULT_METHODS: asvd, admm, gguf), in the recipe's stage order.
    Ratios are floored to RATIO_DIGITS decimals (never past the plan's safe point); the quant ratio
    becomes bits = 16·(1 − s) and, for "gguf", the scheme of that width (`schemes` overrides
    `scheme_for_bits`), for a torch quantizer `method:<bits>bit`. 16 bits: no quantization step."""
    from mpt_utils.recipe import Bits, Recipe, Step

    chosen = {**DEFAULT_METHODS, **(methods or {})}
    steps = []
    for name, ratio in plan.ratios.items():
        if name not in chosen:
            raise MPTError(f"no recipe method for dimension {name!r}",
                           f"pass methods={{{name!r}: <method>}} (known dimensions: {', '.join(DEFAULT_METHODS)})")
        method = chosen[name]
        if name == "quant":
            bits = _quant_bits(ratio)
            if bits >= BASELINE_BITS:
                continue
            if method == "gguf":
                scheme = (schemes or {}).get(bits) or scheme_for_bits(bits)
                steps.append(Step.of("gguf", scheme))
            else:
                steps.append(Step.of(method, Bits(bits)))
            continue
        floored = math.floor(ratio * 10**RATIO_DIGITS + 1e-9) / 10**RATIO_DIGITS
        if floored > 0:
            steps.append(Step.of(method, floored))
    return Recipe(tuple(sorted(steps, key=lambda s: s.stage)))


__all__ = ["DEFAULT_METHODS", "CurveDimension", "SizedPlan", "block_size_model", "dimensions_from_curves",
           "gguf_bit_widths", "gguf_ratio_grid", "plan_for", "plan_to_recipe", "scheme_for_bits", "size_model_for"]
