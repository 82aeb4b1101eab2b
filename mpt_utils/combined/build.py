"""Compress a model to a target in one call: its own curves -> a plan -> a recipe -> a GGUF and its card.

`compress_to_target(model_spec, eval_data=..., calib_data=..., epsilon=... and/or budget_bytes=...,
curves=rows, out_dir=...)` is the whole user path:

1. `curves_from_rows` reads the model's single-method curves (PPL ± SE and KL ± SE against the ratio)
   from tidy results-store rows: the single-step recipe points (family "combined") of notebooks 02
   (unstructured pruning, e.g. "wanda@0.5"), 03 (torch quantizers on the bit axis, e.g. "gptq:3bit")
   and 05 (low rank, e.g. "asvd@0.1"), notebook 03's GGUF ladder (family "quant"), or any other
   single-step grid point (`grid_point` of e.g. "wanda@0.3", "gguf:Q4_K_M"). Per dimension one
   method (the first
   of PREFERENCE that has a curve, or the caller's `methods`), one protocol (the largest group of
   points sharing seqlen, windows, calibration and mode), one point per ratio, the dense point of the
   same protocol as its ratio-0 anchor;
2. `mpt_utils.combined.plan.dimensions_from_curves` fits each curve (eq. 5, weighted by the SEs) and
   bounds its safe zone by the low end of the PTP interval; the predictions are anchored at the dense
   PPL measured on THIS call's protocol (the recipe "dense" through `grid_point`), so a plan predicts
   dense + the sum of the single-method damages on the same windows it is then measured on;
3. `plan_for` picks the smallest configuration within ε (and/or the lowest predicted PPL within the
   byte budget, nominal accounting: `block_size_model` of the dense model's block-linear and other
   bytes), `plan_to_recipe` writes it with the curves' own methods (a GGUF scheme for a GGUF curve,
   `rtn:<b>bit` for an RTN curve, ...);
4. `grid_point` executes the recipe (keeping the GGUF), the file is moved to `out_dir`, and when
   llama.cpp is there the file and the dense model's F16 GGUF are timed side by side (stored as a
   point of its own); the card (`mpt_utils.combined.card`) is written next to the file.

Every measurement is a results-store point, so a second call with the same arguments computes
nothing (the GGUF is rebuilt only when its file was removed). An ε or budget that no safe
configuration meets is one MPTError naming the closest feasible plan and its recipe.

Command line: `python -m mpt_utils.combined.build --model smollm2-135m --epsilon 2 --results DIR --out DIR`
(or `mpt plan ... --build --out DIR`; `mpt plan` without --build prints the plan and builds nothing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mpt_utils.combined.card import ModelCard, build_card, gguf_speed, safe_zone_margins
from mpt_utils.combined.grid import GridBench, GridSetup, grid_point, point_config
from mpt_utils.combined.plan import (
    BASELINE_BITS,
    SizedPlan,
    block_size_model,
    dimensions_from_curves,
    plan_for,
    plan_to_recipe,
)
from mpt_utils.errors import MPTError, cli_main
from mpt_utils.recipe import Bits, Recipe, apply_recipe, needs_calibration
from mpt_utils.store import ResultsStore

DIMENSIONS = ("lowrank", "prune", "quant")
# which notebook (and store family) measures each dimension's single-method curve
PRODUCED_BY = {"prune": ("02_unstructured_pruning", "unstructured"), "quant": ("03_quantization", "quant"),
               "lowrank": ("05_low_rank", "lowrank")}
STORE_FAMILIES = {family: dim for dim, (_, family) in PRODUCED_BY.items()}
EXAMPLE_STEPS = {"prune": "wanda@0.3", "quant": "gguf:Q4_K_M", "lowrank": "asvd@0.1"}
# auto choice among the methods a model has curves for, per dimension (first found wins)
PREFERENCE = {"prune": ("admm", "sparsegpt", "wanda", "ria", "magnitude"),
              "quant": ("gguf", "gptq", "awq", "rtn"),
              "lowrank": ("asvd", "svd_llm", "svd")}
RECIPE_FAMILIES = {"prune": ("prune",), "quant": ("quant", "gguf"), "lowrank": ("lowrank",)}
# columns that tell two protocols (or two variants of one method) apart
VARIANT_COLUMNS = ("seqlen", "n_windows", "calib_data", "n_calib", "calib_seqlen", "mode", "group_size")
EXCLUDED = {"smoothquant"}  # W8A8: its curve is activation quantization, not the weight bits a plan sets
EQ5_POINTS = 7  # what eq. 5 needs to claim a PTP
MIN_POINTS = 3  # distinct ratios, dense anchor included (eq. 5 needs 7 to find a PTP)


# -- recipes as coordinates ---------------------------------------------------------------------------
def recipe_settings(recipe: Recipe | str) -> dict[str, Any]:
    """Where a recipe sits on the planner's axes: lowrank ratio, prune sparsity (N:M as N/M), bits
    (16 without a quantization step) and quant = 1 − bits/16, with each step's method, the GGUF
    scheme, the N:M pattern and the number of steps."""
    from mpt_utils.combined.sizes import gguf_bits

    recipe = Recipe.parse(recipe)
    out: dict[str, Any] = {"recipe": str(recipe), "lowrank": 0.0, "prune": 0.0, "bits": BASELINE_BITS,
                           "lowrank_method": None, "prune_method": None, "quant_method": None, "scheme": None,
                           "pattern": None, "structured": 0.0, "structured_method": None, "n_steps": len(recipe)}
    for step in recipe:
        if step.family == "lowrank":
            out.update(lowrank=float(step.setting), lowrank_method=step.method)
        elif step.family == "prune":
            nm = isinstance(step.setting, tuple)
            out.update(prune=step.setting[0] / step.setting[1] if nm else float(step.setting),
                       prune_method=step.method, pattern=step.setting_text if nm else "unstructured")
        elif step.family == "structured":
            out.update(structured=float(step.setting), structured_method=step.method)
        elif step.family == "gguf":
            out.update(bits=gguf_bits(str(step.setting)), quant_method="gguf", scheme=str(step.setting))
        elif step.family == "quant":
            assert isinstance(step.setting, Bits)
            out.update(bits=float(step.setting.bits), quant_method=step.method)
    out["quant"] = 1.0 - out["bits"] / BASELINE_BITS
    return out


# -- the model's single-method curves -------------------------------------------------------------------
@dataclass
class Curve:
    """One dimension's measured single-method curve. `x` is on the dimension's native axis (bits for
    quant, the ratio otherwise), ascending in compression; `kl` NaN where a point has no KL row."""

    dimension: str
    method: str
    x: np.ndarray
    y: np.ndarray
    y_se: np.ndarray
    kl: np.ndarray
    kl_se: np.ndarray
    source: str  # "store family <f>" or "grid points"
    protocol: dict[str, Any] = field(default_factory=dict)
    anchored: bool = False  # the dense point was added as the ratio-0 point
    options: dict[str, Any] = field(default_factory=dict)  # the method options of the curve's recipe steps

    @property
    def ratio(self) -> np.ndarray:
        return 1.0 - self.x / BASELINE_BITS if self.dimension == "quant" else self.x

    @property
    def axis(self) -> str:
        return "bits" if self.dimension == "quant" else "sparsity"

    def as_tuple(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.x, self.y, self.y_se

    def table(self) -> pd.DataFrame:
        """One line per point: the setting on the native axis (bits for quant), the ratio, PPL and KL ± SE."""
        return pd.DataFrame({"dimension": self.dimension, "method": self.method,
                             "setting": [f"{v:g} bits" if self.dimension == "quant" else f"{v:.4g}" for v in self.x],
                             "ratio": self.ratio, "ppl": self.y, "ppl_se": self.y_se, "kl": self.kl, "kl_se": self.kl_se})

    def predicted_kl(self, ratio: float) -> float:
        """KL at `ratio`, linear between the measured points (NaN outside them or without KL)."""
        r, k = self.ratio, self.kl
        ok = np.isfinite(k)
        if ok.sum() < 2 or not (r[ok].min() <= ratio <= r[ok].max()):
            return math.nan if ratio > 0 else 0.0
        order = np.argsort(r[ok])
        return float(np.interp(ratio, r[ok][order], k[ok][order]))


def _frame(rows: pd.DataFrame | Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    df = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if df.empty:
        return pd.DataFrame(columns=["metric", "value", "config_hash"])
    for col in ("metric", "value"):
        if col not in df.columns:
            raise MPTError(f"the curve rows have no column {col!r}",
                           "pass tidy results-store rows (ResultsStore(dir).frame()) or grid_point rows")
    if "config_hash" not in df.columns:
        df["config_hash"] = None
    missing = df["config_hash"].isna()
    df.loc[missing, "config_hash"] = [f"row{i}" for i in np.flatnonzero(missing.to_numpy())]
    return df


def _col(df: pd.DataFrame, name: str, default: Any = None) -> pd.Series:
    return df[name] if name in df.columns else pd.Series(default, index=df.index, dtype=object)


def _points(df: pd.DataFrame, model: str, data: str) -> pd.DataFrame:
    """One line per stored point of `model` scored on `data`: its identifying columns, ppl ± SE, kl ± SE."""
    if "model" in df.columns:
        df = df[df["model"] == model]
    scored = df[df["metric"].isin(["ppl", "kl_mean"])]
    if "data" in scored.columns:
        scored = scored[scored["data"] == data]
    ppl = scored[scored["metric"] == "ppl"].drop_duplicates("config_hash").set_index("config_hash")
    kl = scored[scored["metric"] == "kl_mean"].drop_duplicates("config_hash").set_index("config_hash")
    out = ppl.copy()
    out["ppl"] = pd.to_numeric(ppl["value"], errors="coerce")
    out["ppl_se"] = pd.to_numeric(_col(ppl, "stderr", np.nan), errors="coerce")
    out["kl"] = pd.to_numeric(_col(kl, "value", np.nan), errors="coerce").reindex(out.index)
    out["kl_se"] = pd.to_numeric(_col(kl, "stderr", np.nan), errors="coerce").reindex(out.index)
    # the sparsity a pruning point reached is its own metric row in notebook 02's store
    sparsity = df[df["metric"] == "sparsity"].drop_duplicates("config_hash").set_index("config_hash")["value"]
    out["measured_sparsity"] = pd.to_numeric(sparsity, errors="coerce").reindex(out.index)
    return out.reset_index()


def _locate(point: pd.Series, families: Mapping[str, str]) -> tuple[str, str, float, str, int] | None:
    """(dimension, method, x, options as JSON, rank) of one stored point; ("dense", "dense", 0, "{}", 0)
    for a dense point; None when it is not a single-method point a recipe can reproduce. rank 0 marks
    the GGUF scheme `plan_to_recipe` writes for that width (the one a plan would execute)."""
    import json

    from mpt_utils.combined.plan import scheme_for_bits
    from mpt_utils.combined.sizes import gguf_bits
    from mpt_utils.quant.gguf.quantize import NEEDS_IMATRIX, SCHEMES

    def gguf(scheme: str, opts: str = "{}") -> tuple[str, str, float, str, int] | None:
        if scheme not in SCHEMES or scheme in NEEDS_IMATRIX or gguf_bits(scheme) > BASELINE_BITS:
            return None
        bits = gguf_bits(scheme)
        return "quant", "gguf", bits, opts, int(scheme != scheme_for_bits(int(bits)))

    family, method = str(point.get("family")), str(point.get("method"))
    if family == "combined":
        if method != "recipe" or not isinstance(point.get("recipe"), str):
            return None
        recipe = Recipe.parse(point["recipe"])
        if len(recipe) == 0:
            return "dense", "dense", 0.0, "{}", 0
        if len(recipe) != 1:
            return None
        step = recipe[0]
        opts = json.dumps(step.opts, sort_keys=True)
        if step.family == "gguf":
            return gguf(str(step.setting), opts)
        if step.family == "quant":
            if step.setting.group_size is not None:
                return None  # plan_to_recipe writes <method>:<b>bit, the method's default group size
            return "quant", step.method, float(step.setting.bits), opts, 0
        if step.family in ("prune", "lowrank") and isinstance(step.setting, float):
            return step.family, step.method, float(step.setting), opts, 0
        return None
    if method == "dense":
        return ("dense", "dense", 0.0, "{}", 0) if family in ("dense", *STORE_FAMILIES) else None
    dim = STORE_FAMILIES.get(family)
    if dim is None or families.get(method) not in RECIPE_FAMILIES[dim]:
        return None
    if dim == "prune":
        if str(point.get("pattern", "unstructured")) not in ("unstructured", "nan", "None"):
            return None
        if str(point.get("mode")) == "dense":  # the dense-statistics shortcut, not the published protocol
            return None
        x = _num(point.get("sparsity"))
        x = x if math.isfinite(x) else _num(point.get("measured_sparsity"))
        return dim, method, x if math.isfinite(x) else _num(point.get("ratio")), "{}", 0
    if dim == "quant":
        if method == "gguf":
            return gguf(str(point.get("scheme")))
        return dim, method, _num(point.get("bits")), "{}", 0
    return dim, method, _num(point.get("ratio")), "{}", 0


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _variant(frame: pd.DataFrame) -> pd.Series:
    cols = [c for c in VARIANT_COLUMNS if c in frame.columns]
    if not cols:
        return pd.Series("", index=frame.index)
    return frame[cols].map(str).agg("|".join, axis=1)  # map, not astype: pandas 3 keeps NaN under astype(str)


def curves_from_rows(rows: pd.DataFrame | Sequence[Mapping[str, Any]], model: str, eval_data: str, *,
                     calib_data: str | None = None, methods: Mapping[str, str] | None = None,
                     min_points: int = MIN_POINTS) -> tuple[dict[str, Curve], dict[str, str]]:
    """The model's single-method curves per dimension (module docstring), and for each dimension
    without one the reason. `methods`: {dimension: method} to use instead of the PREFERENCE order."""
    from mpt_utils.recipe import method_families

    families = method_families()
    df = _frame(rows)
    points = _points(df, model, eval_data)
    located = [(_locate(p, families), p) for _, p in points.iterrows()]
    found = pd.DataFrame([{**p.to_dict(), "_dim": loc[0], "_method": loc[1], "_x": loc[2], "_opts": loc[3],
                           "_rank": loc[4]}
                          for loc, p in located if loc is not None and math.isfinite(loc[2])])
    curves: dict[str, Curve] = {}
    why: dict[str, str] = {}
    if found.empty:
        return curves, {d: f"no single-method point of {model} scored on {eval_data}" for d in DIMENSIONS}
    found["_variant"] = _variant(found) + "|" + found["_opts"]
    found["_proto"] = _variant(found[[c for c in ("seqlen", "n_windows") if c in found.columns]])
    dense = found[found["_dim"] == "dense"]
    for dim in DIMENSIONS:
        mine = found[found["_dim"] == dim]
        wanted = (methods or {}).get(dim)
        order = [wanted] if wanted else [m for m in PREFERENCE[dim] if m in set(mine["_method"])]
        order += [] if wanted else sorted(set(mine["_method"]) - set(order) - EXCLUDED)
        made = {}
        for method in order:
            curve, reason = _curve(dim, method, mine[mine["_method"] == method], dense, calib_data, min_points)
            if curve is None:
                why[dim] = reason
            else:
                made[method] = curve
        # the first method whose curve eq. 5 can fit (EQ5_POINTS), else the first with a curve at all
        pick = next((m for m in made if made[m].x.size >= EQ5_POINTS), next(iter(made), None))
        if pick is not None:
            curves[dim] = made[pick]
        else:
            why.setdefault(dim, f"no single-method {dim} point of {model} scored on {eval_data}")
    return curves, {d: r for d, r in why.items() if d not in curves}


def _curve(dim: str, method: str, part: pd.DataFrame, dense: pd.DataFrame, calib_data: str | None,
           min_points: int) -> tuple[Curve | None, str]:
    if part.empty:
        return None, f"no {method} points"
    # one protocol and variant: the calibration set asked for first, then the largest group
    score = part.groupby("_variant").size().to_dict()
    calib = _col(part, "calib_data")
    # a recipe point's rows do not name its calibration set (its key does): unknown is no mismatch
    same = (calib.astype(str) == str(calib_data)) | calib.isna()
    matches = part.assign(_calib=same).groupby("_variant")["_calib"].any().to_dict()
    best = max(score, key=lambda v: (matches.get(v, False), score[v], v))
    part = part[part["_variant"] == best].sort_values(["_x", "_rank", "config_hash"]).drop_duplicates("_x")
    first = part.iloc[0]
    options = json.loads(first["_opts"])
    protocol = {c: first.get(c) for c in ("seqlen", "n_windows", "calib_data", "mode", "group_size") if c in part}
    source = "grid points" if first.get("family") == "combined" else f"store family {first.get('family')}"
    zero = BASELINE_BITS if dim == "quant" else 0.0
    anchored = False
    if not np.isclose(part["_x"].to_numpy(float), zero).any():
        same = dense[dense["_proto"] == first["_proto"]]
        # the curve's own family's dense point first, then a store family's, then a grid point's
        same = same.assign(_own=same["family"] != first.get("family"), _grid=same["family"] == "combined")
        same = same.sort_values(["_own", "_grid", "config_hash"])
        if not same.empty:
            part = pd.concat([same.iloc[[0]].assign(_x=zero, kl=0.0, kl_se=0.0), part], ignore_index=True)
            anchored = True
    part = part.sort_values("_x", ascending=dim != "quant")  # compression grows down the table
    n = part["_x"].nunique()
    if n < min_points:
        return None, (f"{method}: {n} distinct {'bit widths' if dim == 'quant' else 'ratios'} with the dense point "
                      f"({', '.join(f'{v:g}' for v in part['_x'])}); {min_points} needed")
    arr = {k: part[k].to_numpy(float) for k in ("_x", "ppl", "ppl_se", "kl", "kl_se")}
    return Curve(dim, method, arr["_x"], arr["ppl"], arr["ppl_se"], arr["kl"], arr["kl_se"], source,
                 protocol, anchored, options), ""


def missing_curve_error(dims: Sequence[str], reasons: Mapping[str, str], model: str, eval_data: str,
                        where: str) -> MPTError:
    """The one error for dimensions without a curve: what is missing and which notebook measures it."""
    what = "; ".join(f"{d}: {reasons.get(d, 'no curve')}" for d in dims)
    runs = ", ".join(PRODUCED_BY[d][0] for d in dims if d in PRODUCED_BY)
    steps = ", ".join(f"'{EXAMPLE_STEPS[d]}'" for d in dims if d in EXAMPLE_STEPS)
    return MPTError(f"no single-method curve of {model} on {eval_data} in {where} for {', '.join(dims)} ({what})",
                    f"run notebook(s) {runs} with model={model!r} and eval_data={eval_data!r} into this store "
                    f"(e.g. `python -m mpt_utils.reproduce --profile embedded --only {runs.replace(', ', ' ')}` "
                    f"writes results/embedded), "
                    f"or store single-step grid points ({steps}, ... at 2+ ratios) with "
                    f"mpt_utils.combined.grid.grid_point and pass their rows as curves=")


def _interpolated(name: str, curve: Curve, dense_ppl: float, fit) -> Any:
    """A planner dimension from a curve too short for eq. 5 (fewer than 7 points: `fit_ptp` returns no
    model): the measured curve itself, linear in log PPL between the points and anchored at `dense_ppl`;
    its bound is the largest ratio measured before any collapse (the planner stays strictly below it)."""
    from mpt_utils.combined.plan import CurveDimension, gguf_ratio_grid
    from mpt_utils.ptp import collapsed

    r, y = curve.ratio, curve.y
    gone = collapsed(y)
    order = np.argsort(r[~gone])
    nodes, logy = r[~gone][order], np.log(y[~gone][order])
    at0 = float(np.interp(0.0, nodes, logy))
    bound = float(nodes.max())
    if gone.any():
        bound = min(bound, float(r[gone].min()))

    def predict(s: np.ndarray) -> np.ndarray:
        return dense_ppl * np.exp(np.interp(np.asarray(s, dtype=float), nodes, logy) - at0)

    return CurveDimension(name, predict, bound, gguf_ratio_grid() if name == "quant" else None, 0.0, fit=fit,
                          bound="interpolated")


def planner_dimensions(curves: Mapping[str, Curve], dense_ppl: float, conservative: bool = True) -> list[Any]:
    """One planner dimension per curve: `dimensions_from_curves` (eq. 5 fitted with the SEs, bounded by
    the low end of the PTP interval) where the curve has the points eq. 5 needs, else the measured
    curve interpolated (`_interpolated`), so a short curve still plans, inside what was measured."""
    from mpt_utils.planner import EXECUTION_ORDER
    from mpt_utils.ptp import fit_ptp

    dims = []
    for name in sorted(curves, key=EXECUTION_ORDER.index):
        c = curves[name]
        fit = fit_ptp(c.x, c.y, y_se=c.y_se, axis=c.axis)
        if fit.model == "none":
            dims.append(_interpolated(name, c, dense_ppl, fit))
        else:
            dims += dimensions_from_curves({name: c.as_tuple()}, dense_ppl, conservative, axes={name: c.axis})
    return dims


def gguf_exportable(bench: GridBench) -> bool:
    """Whether the GGUF export supports the bench's model architecture (loads the model)."""
    from mpt_utils.quant.gguf.names import gguf_arch

    try:
        gguf_arch(bench.loaded.model)
    except MPTError:
        return False
    return True


def _torch_twin(recipe: str) -> str | None:
    """A recipe's GGUF step as RTN at the scheme's nominal bits (None when no torch width matches)."""
    from mpt_utils.combined.sizes import gguf_bits
    from mpt_utils.recipe import BITS_RANGE, Step

    parsed = Recipe.parse(recipe)
    if parsed.gguf_scheme is None:
        return str(parsed)
    bits = int(gguf_bits(parsed.gguf_scheme))
    if not BITS_RANGE[0] <= bits <= BITS_RANGE[1]:
        return None
    return str(Recipe((*parsed.torch_part.steps, Step.of("rtn", Bits(bits)))))


def ensure_curves(store: ResultsStore, bench: GridBench, recipes: Sequence[str], *,
                  methods: Mapping[str, str] | None = None, dimensions: Sequence[str] | None = None,
                  progress: bool = False) -> tuple[dict[str, Curve], pd.DataFrame, list[str]]:
    """The model's single-method curves and the rows they come from: the rows of the single-method
    notebooks (single-step recipe points, family "combined", of notebooks 02, 03 and 05; notebook
    03's GGUF ladder and older stores' families "dense", "unstructured", "quant", "lowrank"), and when a wanted
    dimension (`dimensions`, default: any) has no curve there, also the dense point and the single-step
    `recipes` (e.g. "wanda@0.3", "gguf:Q4_K_M") through `grid_point` on `bench`'s protocol. Without
    llama.cpp, or for an architecture the GGUF export does not support, a GGUF step becomes RTN at the
    scheme's nominal bits (`rtn:4bit` for Q4_K_M; F16 and widths outside 2..8 bits are left out), so
    the quant curve is a torch one. A build's own planned point joins these rows only when it is a
    single step on a curve's protocol (one more measured point of that curve). Returns (curves, rows,
    recipes measured or read)."""
    from mpt_utils.native import has_llama_cpp

    s = bench.setup
    every = store.frame()
    # notebooks 02, 03 and 05 store recipe points (family "combined"); curves_from_rows keeps single steps
    rows = every[every["family"].isin(["dense", "combined", *STORE_FAMILIES])] if "family" in every else every
    found, _ = curves_from_rows(rows, s.model, s.eval_data, calib_data=s.calib_data, methods=methods)
    want = list(dimensions) if dimensions else []
    if (want and all(d in found for d in want)) or (not want and found):
        return found, rows.reset_index(drop=True), []
    todo = ["dense", *(r if has_llama_cpp() and gguf_exportable(bench) else _torch_twin(r) for r in recipes)]
    todo = [r for r in dict.fromkeys(todo) if r is not None]
    measured = [row for recipe in todo for row in grid_point(store, bench, recipe, progress=progress)]
    rows = pd.concat([rows, pd.DataFrame(measured)], ignore_index=True)
    found, _ = curves_from_rows(rows, s.model, s.eval_data, calib_data=s.calib_data, methods=methods)
    return found, rows, todo


# -- stored helpers: the dense model's bytes, speed, scored bytes -----------------------------------------
def dense_size(store: ResultsStore, bench: GridBench) -> dict[str, float]:
    """The dense model's nominal bytes split into decoder-block linears and the rest (what a byte
    budget is planned against), stored as a point of its own."""
    from mpt_utils.compression_axis import weight_bytes

    s = bench.setup
    cfg = {"model": s.model, "family": "combined", "method": "dense_bytes", "dense_dtype_bytes": s.dense_dtype_bytes}

    def compute():
        wb = weight_bytes(bench.loaded.model, s.dense_dtype_bytes)
        return [{"metric": "total_bytes", "value": float(wb.total)},
                {"metric": "block_linear_bytes", "value": float(wb.block_linear)}]

    rows = {r["metric"]: float(r["value"]) for r in store.get_or_compute(cfg, compute)}
    return {"total_bytes": rows["total_bytes"], "block_linear_bytes": rows["block_linear_bytes"],
            "other_bytes": rows["total_bytes"] - rows["block_linear_bytes"]}


def _speed_point(store: ResultsStore, bench: GridBench, recipe: Recipe, path: Path, *, seqlen: int, rounds: int,
                 progress: bool) -> dict[str, Any]:
    """`gguf_speed` of the file against the dense model's F16 GGUF (exported for it), stored."""
    from mpt_utils.combined.export import export_recipe_gguf

    s = bench.setup
    cfg = {**point_config(s, recipe), "method": "gguf_speed",
           "speed": {"seqlen": seqlen, "rounds": rounds, "n_threads": bench.n_threads, "dense": "F16", "mode": "prefill"}}

    def compute():
        with tempfile.TemporaryDirectory(prefix="mpt-speed-") as tmp:
            dense = export_recipe_gguf(bench.loaded.model, bench.loaded.tokenizer, Path(tmp) / "dense-F16.gguf",
                                       dtype="f16", tokenizer_gguf=bench.tokenizer_gguf, name=s.model)
            got = gguf_speed(path, dense, seqlen=seqlen, rounds=rounds, n_threads=bench.n_threads)
        return [{"metric": "tokens_per_s", "value": got.pop("tokens_per_s"), **got, "recipe": str(recipe),
                 "host": platform.node(), "cpu": platform.processor() or platform.machine()}]

    row = dict(store.get_or_compute(cfg, compute)[0])
    row["tokens_per_s"] = row.pop("value")
    return {k: row.get(k) for k in ("tokens_per_s", "dense_tokens_per_s", "speedup", "spread", "seqlen", "rounds",
                                    "n_threads", "engine", "side_by_side", "mode", "host")}


def scored_bytes(store: ResultsStore, bench: GridBench) -> int:
    """UTF-8 bytes of the tokens the protocol scores (`mpt_utils.laws.intrinsic.scored_bytes`), stored."""
    from mpt_utils.data import eval_ids
    from mpt_utils.laws.intrinsic import scored_bytes as count

    s = bench.setup
    cfg = {"model": s.model, "family": "combined", "method": "scored_bytes", "data": s.eval_data,
           "seqlen": s.seqlen, "max_windows": s.max_windows}

    def compute():
        tok = bench.loaded.tokenizer
        return [{"metric": "n_bytes", "value": count(tok, eval_ids(tok, s.eval_data), s.seqlen, s.max_windows)}]

    return int(store.get_or_compute(cfg, compute)[0]["value"])


def bits_per_byte(store: ResultsStore, bench: GridBench, recipe: Recipe | str = "dense") -> dict[str, Any]:
    """Bits per byte of `recipe`'s point on `bench`'s protocol: the NLL summed over the scored
    tokens, in bits, over the bytes they decode to (comparable across tokenizers). The grid
    protocol adds no BOS token before a window (a model trained with one, like Gemma, is scored
    without it, as every other point of the suite)."""
    from mpt_utils.combined.grid import metric

    rows = grid_point(store, bench, recipe)
    ppl = metric(rows, "ppl")
    n_bytes = scored_bytes(store, bench)
    bpb = float(ppl["nll"]) * float(ppl["n_tokens"]) / (math.log(2) * n_bytes)
    return {"model": bench.setup.model, "recipe": str(Recipe.parse(recipe)), "bits_per_byte": bpb,
            "ppl": float(ppl["value"]), "nll": float(ppl["nll"]), "n_tokens": int(ppl["n_tokens"]), "n_bytes": n_bytes,
            **{m: float(metric(rows, m)["value"]) for m in ("nominal_bytes", "artifact_bytes", "sparse_bytes")}}


# -- the one function ---------------------------------------------------------------------------------
@dataclass
class Built:
    """What `compress_to_target` made; unpacks as (plan, recipe, gguf_path, card)."""

    plan: SizedPlan
    recipe: Recipe
    gguf_path: Path | None
    card: ModelCard
    point: list[dict[str, Any]]
    dense: list[dict[str, Any]]
    dims: list[Any]
    curves: dict[str, Curve]
    card_paths: tuple[Path, Path]
    setup: GridSetup

    def __iter__(self) -> Iterator[Any]:
        return iter((self.plan, self.recipe, self.gguf_path, self.card))

    def comparison(self) -> pd.DataFrame:
        """Predicted vs measured PPL and KL."""
        q, p = self.card.quality, self.card.plan
        return pd.DataFrame([
            {"metric": "PPL", "predicted": p["predicted_ppl"], "measured": q["ppl"], "measured_se": q["ppl_se"],
             "dense": q["dense_ppl"]},
            {"metric": "KL to dense", "predicted": p["predicted_kl"], "measured": q["kl_mean"], "measured_se": q["kl_se"],
             "dense": 0.0}]).assign(z=lambda t: (t.measured - t.predicted) / t.measured_se)


    def summary(self) -> str:
        """The build in sentences, from the card's numbers (a notebook's computed conclusion)."""
        card, q, p = self.card, self.card.quality, self.card.plan
        asked = " and ".join(x for x in (f"ε = {p['epsilon']:g} PPL above dense" if p.get("epsilon") is not None else "",
                                          f"a budget of {p['budget_bytes']:,.0f} bytes" if p.get("budget_bytes") else "")
                             if x)
        z = (q["ppl"] - p["predicted_ppl"]) / q["ppl_se"] if q["ppl_se"] > 0 else math.nan
        verdict = ("within 2 SE of" if abs(z) <= 2 else "above" if z > 2 else "below") if math.isfinite(z) else "next to"
        text = [f"For {asked or 'the target'} the planner chose `{self.recipe}` ({self.plan.describe()}).",
                f"Predicted PPL {p['predicted_ppl']:.4g} (dense {q['dense_ppl']:.4g} + {p['predicted_delta']:.3g}); "
                f"measured {q['ppl']:.4g} ± {q['ppl_se']:.2g}, {verdict} the additive prediction (z = {z:+.2f}).",
                f"KL to dense: predicted {p['predicted_kl']:.3g}, measured {q['kl_mean']:.3g} ± {q['kl_se']:.2g}."]
        if card.margins:
            tight = min(card.margins, key=lambda m: m.margin)
            text.append(("Every planned dimension stays inside its safe zone" if card.inside_safe_zone
                         else "At least one dimension is OUTSIDE its safe zone") + f" (tightest: {tight.text()}).")
        s, d = card.sizes, card.dense_sizes
        real = (f"the real {'file' if card.file_bytes else 'artifact'} keeps "
                f"{s['artifact_bytes'] / d['artifact_bytes']:.1%}" if d.get("artifact_bytes") else "")
        text.append(f"Size: the paper's count keeps {1 - s['compression_nominal']:.1%} of dense, {real}"
                    + (f" ({card.file_bytes:,} bytes on disk)." if card.file_bytes else "."))
        sp = card.speed
        if sp.get("side_by_side"):
            text.append(f"llama.cpp runs it at {sp['tokens_per_s']:.1f} tokens/s, ×{sp['speedup']:.2f} against the "
                        "dense F16 GGUF timed side by side.")
        return " ".join(text)


def _with_options(recipe: Recipe, options: Mapping[str, Mapping[str, Any]]) -> Recipe:
    """`recipe` with each dimension's step given that dimension's method options (a GGUF step takes none)."""
    from mpt_utils.recipe import Step

    dims = {"lowrank": "lowrank", "prune": "prune", "quant": "quant"}
    steps = []
    for step in recipe:
        extra = dict(options.get(dims.get(step.family, ""), {}))
        steps.append(Step(step.family, step.method, step.setting, tuple({**step.opts, **extra}.items()))
                     if extra else step)
    return Recipe(tuple(steps))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")[:120] or "dense"


def _rebuild_gguf(bench: GridBench, recipe: Recipe, folder: Path, progress: bool) -> Path:
    """The recipe's GGUF again (its point was read from the store, its file is gone)."""
    from mpt_utils.combined.grid import _gguf_file

    model = bench.fresh_model()
    calib = bench.calib_ids() if any(needs_calibration(step) for step in recipe) else None
    apply_recipe(model, recipe.torch_part, calib, device=bench.setup.device, progress=progress)
    path, _ = _gguf_file(bench, model, recipe, folder, progress)
    return path


def _gguf_in(folder: Path, recipe: Recipe) -> Path:
    tag = hashlib.sha256(str(recipe).encode()).hexdigest()[:12]  # grid._gguf_file's name for it
    return folder / f"{tag}-{recipe.gguf_scheme}.gguf"


@dataclass
class Target:
    """What `plan_target` chose, before anything is built: the plan, the recipe that executes it, the
    planner's dimensions, the curve planned on per dimension, its method, and the dense point (on the
    call's protocol) that anchors the predictions."""

    plan: SizedPlan
    recipe: Recipe
    dims: list[Any]
    curves: dict[str, Curve]
    methods: dict[str, str]
    dense: list[dict[str, Any]]


def plan_target(store: ResultsStore, bench: GridBench, *, epsilon: float | None = None,
                budget_bytes: float | None = None,
                curves: pd.DataFrame | Sequence[Mapping[str, Any]] | None = None,
                methods: Mapping[str, str] | None = None, dimensions: Sequence[str] | None = None,
                conservative: bool = True, steps: int = 41,
                options: Mapping[str, Mapping[str, Any]] | None = None, progress: bool = False) -> Target:
    """Steps 1-3 of the module docstring, nothing built: the model's curves (`curves` rows, None: every
    row of `store`), the dense point of `bench`'s protocol (measured once, then read from the store),
    the plan for `epsilon` and/or `budget_bytes` and its recipe. Arguments as `compress_to_target`."""
    unknown = [d for d in (dimensions or ()) if d not in DIMENSIONS]
    if unknown:
        raise MPTError(f"unknown dimension(s) {unknown}", f"choose among {', '.join(DIMENSIONS)}")
    s = bench.setup
    where = "the given rows" if curves is not None else f"the results store {store.root}"

    def find(rows, min_points: int = MIN_POINTS) -> tuple[dict[str, Curve], list[str]]:
        found, reasons = curves_from_rows(rows, s.model, s.eval_data, calib_data=s.calib_data, methods=methods,
                                          min_points=min_points)
        wanted = list(dimensions) if dimensions is not None else [d for d in DIMENSIONS if d in found]
        missing = [d for d in (wanted or DIMENSIONS) if d not in found]
        if missing and (dimensions is not None or not wanted):
            raise missing_curve_error(missing, reasons, s.model, s.eval_data, where)
        return found, wanted

    find(store.frame() if curves is None else curves, MIN_POINTS - 1)  # fail before any work (the anchor adds one)
    # the dense point next: it anchors the predictions, and a curve of grid points finds its ratio-0 point in it
    dense_rows = grid_point(store, bench, "dense", progress=progress)
    dense_ppl = next(float(r["value"]) for r in dense_rows if r["metric"] == "ppl")
    rows = store.frame() if curves is None else pd.concat([_frame(curves), _frame(dense_rows)], ignore_index=True)
    found, wanted = find(rows)
    chosen = {d: found[d] for d in wanted}
    use = {d: c.method for d, c in chosen.items()}
    step_options = {d: {**c.options, **dict((options or {}).get(d, {}))} for d, c in chosen.items()}

    dims = planner_dimensions(chosen, dense_ppl, conservative)
    sizes = dense_size(store, bench)
    size_model = block_size_model(sizes["block_linear_bytes"], sizes["other_bytes"])
    try:
        plan = plan_for(dims, epsilon=epsilon, budget_bytes=budget_bytes, size_model=size_model, steps=steps)
    except MPTError as err:
        closest = getattr(err, "closest", None)
        if closest is None:
            raise
        text = str(_with_options(plan_to_recipe(closest, use), step_options))
        again = MPTError(f"{err.message} (as a recipe: {text})", err.fix)
        again.closest, again.closest_recipe = closest, text  # type: ignore[attr-defined]
        raise again from None
    recipe = _with_options(plan_to_recipe(plan, use), step_options)
    return Target(plan, recipe, dims, chosen, use, dense_rows)


def compress_to_target(model_spec: str, *, eval_data: str, calib_data: str, epsilon: float | None = None,
                       budget_bytes: float | None = None,
                       curves: pd.DataFrame | Sequence[Mapping[str, Any]] | None = None,
                       out_dir: str | os.PathLike, results: str | os.PathLike | ResultsStore | None = None,
                       seqlen: int = 256, n_calib: int = 8, max_windows: int | None = 4, seed: int = 0,
                       device: str | None = None, methods: Mapping[str, str] | None = None,
                       dimensions: Sequence[str] | None = None, conservative: bool = True, steps: int = 41,
                       loader: Callable[[], Any] | None = None, n_threads: int | None = None, speed: bool = True,
                       speed_seqlen: int | None = None, speed_rounds: int = 3,
                       downstream: Mapping[str, Any] | None = None,
                       options: Mapping[str, Mapping[str, Any]] | None = None, progress: bool = False) -> Built:
    """Plan, build and describe the compressed model (module docstring). Returns a `Built` that
    unpacks as (plan, recipe, gguf_path, card); gguf_path is None for a recipe without a GGUF step.

    curves: tidy rows holding the model's single-method points (None: every row of the results
    store). results: the results store (folder or `ResultsStore`; default `<out_dir>/results`).
    The evaluation protocol (seqlen, n_calib, max_windows, seed, corpora) is the one every point of
    this call is measured on. methods: {dimension: method} instead of PREFERENCE (the recipe uses
    the method whose curve was planned on). dimensions: plan only these (each must have a curve;
    default: every dimension that has one). loader: returns the dense model (default: `load_model`).
    options: {dimension: {option: value}} for the recipe's steps, over the options of the curve's own
    grid points (e.g. {"lowrank": {"granularity": "part"}}); a GGUF step takes none.
    downstream: scores the caller measured on the result, copied onto the card."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = results if isinstance(results, ResultsStore) else ResultsStore(results if results is not None
                                                                            else out / "results")
    setup = GridSetup(model=model_spec, eval_data=eval_data, calib_data=calib_data, seqlen=seqlen, n_calib=n_calib,
                      max_windows=max_windows, seed=seed, device=device)
    work = out / ".work"
    bench = GridBench(setup, loader, work_dir=work, n_threads=n_threads)
    target = plan_target(store, bench, epsilon=epsilon, budget_bytes=budget_bytes, curves=curves, methods=methods,
                         dimensions=dimensions, conservative=conservative, steps=steps, options=options,
                         progress=progress)
    plan, recipe, dims, chosen, use, dense_rows = (target.plan, target.recipe, target.dims, target.curves,
                                                   target.methods, target.dense)
    if use.get("quant") == "gguf":
        from mpt_utils.native import has_llama_cpp

        if not has_llama_cpp():
            raise MPTError("the quant curve is a GGUF ladder, and executing a GGUF plan needs llama.cpp",
                           "pip install llama-cpp-python, or plan on a torch quantizer's curve: methods={'quant': 'rtn'}")

    gguf = recipe.gguf_scheme is not None
    point = grid_point(store, bench, recipe, keep_files=gguf, progress=progress)
    path: Path | None = None
    stem = f"{_slug(Path(model_spec).name)}__{_slug(str(recipe))}"
    if gguf:
        from mpt_utils.combined.grid import metric

        path = out / f"{stem}.gguf"
        made = _gguf_in(work, recipe)
        stored = int(metric(point, "artifact_bytes")["value"])
        if made.exists():
            os.replace(made, path)
        elif not path.exists() or path.stat().st_size != stored:
            os.replace(_rebuild_gguf(bench, recipe, work, progress), path)
    if work.exists() and not any(work.iterdir()):
        shutil.rmtree(work, ignore_errors=True)

    speed_row = None
    if gguf and speed:
        speed_row = _speed_point(store, bench, recipe, path, seqlen=speed_seqlen or seqlen, rounds=speed_rounds,
                                 progress=progress)
    planned_kl = sum(chosen[d].predicted_kl(plan.ratios[d]) for d in plan.ratios)
    plan_info = {"epsilon": epsilon, "budget_bytes": budget_bytes, "predicted_ppl": plan.predicted,
                 "base_ppl": plan.base, "predicted_delta": plan.predicted - plan.base, "predicted_kl": planned_kl,
                 "planned_nominal_bytes": plan.size_bytes, "ratios": plan.ratios, "describe": plan.describe(),
                 "curves": {d: {"method": c.method, "source": c.source, "points": int(c.x.size),
                                "protocol": c.protocol} for d, c in chosen.items()}}
    notes = [f"planned on the {d} curve of {c.method} ({c.source}, {c.x.size} points)" for d, c in chosen.items()]
    no_kl = [d for d in plan.ratios if plan.ratios[d] > 0 and not math.isfinite(chosen[d].predicted_kl(plan.ratios[d]))]
    if no_kl:
        notes.append(f"no KL prediction: the {', '.join(no_kl)} curve has no KL rows at the planned setting")
    if not gguf:
        notes.append("a torch recipe: the card's artifact size is the compressed model's tensors written densely "
                     "(zeros stored, simulated quantization at 16 bits); no file is kept")
    card = build_card(model_spec, recipe, point, dense_rows, file=path, speed=speed_row,
                      margins=safe_zone_margins(plan, dims, use, recipe), plan=plan_info, downstream=downstream,
                      notes=notes)
    paths = card.write(out, stem)
    return Built(plan, recipe, path, card, point, dense_rows, dims, chosen, paths, setup)


# -- command line ---------------------------------------------------------------------------------------
def parse_methods(items: Sequence[str]) -> dict[str, str]:
    """--method DIMENSION=METHOD items as {dimension: method}."""
    out = {}
    for item in items:
        dim, eq, method = item.partition("=")
        if not eq or dim not in DIMENSIONS:
            raise MPTError(f"--method {item!r} is not DIMENSION=METHOD", f"e.g. --method prune=wanda ({', '.join(DIMENSIONS)})")
        out[dim] = method
    return out


def add_arguments(parser: argparse.ArgumentParser, out_required: bool = True) -> argparse.ArgumentParser:
    """The build's options on `parser` (shared with `mpt plan`, where --out is only needed to build)."""
    parser.add_argument("--model", required=True, help="model spec (e.g. smollm2-135m, a hub id or a path)")
    parser.add_argument("--epsilon", type=float, help="tolerated PPL above dense")
    parser.add_argument("--budget-bytes", type=float, help="byte budget (nominal accounting)")
    parser.add_argument("--results", required=True, help="results store holding the single-method curves")
    parser.add_argument("--out", required=out_required, help="folder for the GGUF and its card")
    parser.add_argument("--eval-data", default="embedded-wiki")
    parser.add_argument("--calib-data", default=None, help="calibration corpus (default: --eval-data)")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--n-calib", type=int, default=8)
    parser.add_argument("--max-windows", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--method", action="append", default=[], help="DIMENSION=METHOD, e.g. prune=wanda (repeatable)")
    parser.add_argument("--dimensions", nargs="*", help=f"plan only these of {', '.join(DIMENSIONS)}")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads")
    parser.add_argument("--no-speed", action="store_true", help="do not time the GGUF against the dense one")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Bad input found before any work: no target, no results store."""
    if args.epsilon is None and args.budget_bytes is None:
        raise MPTError("nothing to plan for", "pass --epsilon (PPL above dense) and/or --budget-bytes")
    if not (Path(args.results) / "points").is_dir():
        raise MPTError(f"no results store at {args.results} (no points/ folder)",
                       "pass --results DIR, the store notebooks 02 / 03 / 05 wrote (e.g. results/embedded)")


def run(args: argparse.Namespace) -> int:
    """Build what `add_arguments` parsed and print the plan, the recipe, the measurement and the files."""
    check_arguments(args)
    if args.out is None:
        raise MPTError("building needs a folder for the GGUF and its card", "pass --out DIR")
    built = compress_to_target(args.model, eval_data=args.eval_data, calib_data=args.calib_data or args.eval_data,
                               epsilon=args.epsilon, budget_bytes=args.budget_bytes, out_dir=args.out,
                               results=args.results, seqlen=args.seqlen, n_calib=args.n_calib,
                               max_windows=args.max_windows, seed=args.seed, device=args.device,
                               methods=parse_methods(args.method), dimensions=args.dimensions, n_threads=args.threads,
                               speed=not args.no_speed)
    card = built.card
    print(f"plan: {built.plan.describe()}")
    print(f"recipe: {built.recipe}")
    print(f"measured PPL {card.ppl:.4g} ± {card.quality['ppl_se']:.2g} (dense {card.quality['dense_ppl']:.4g}), "
          f"KL {card.kl:.4g}")
    if built.gguf_path is not None:
        print(f"GGUF: {built.gguf_path} ({card.file_bytes:,} bytes)")
    print(f"card: {built.card_paths[0]}")
    return 0


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpt_utils.combined.build",
                                     description="Compress a model to an ε or byte budget on its own measured curves "
                                                 "and write the GGUF with its model card.")
    return run(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
