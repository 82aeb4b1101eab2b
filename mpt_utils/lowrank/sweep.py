"""Table 7 as recipe points: notebook 05's curves, their tidy rows, and the low-rank speed measurement.

A curve is one low-rank method with its options over a grid of requested parameter reductions; each
point is the one-step recipe `method@ratio[options]` (ratio 0: the dense point, shared by every
curve), measured by `Session.point` / `Session.sweep` on a `combined.grid.GridSetup` protocol and
stored once under the recipe key. The engine keeps each method's plan (its SVDs, ASVD's sensitivity
table) in the bench's `step_cache`, so a curve decomposes once; `release_plans` frees it after the
curve. Scoring on a second corpus is the same recipe on a second protocol (that `eval_data`), which
shares the plan.

`lowrank_rows` turns the recipe rows into what Table 7, the eq. 5 fits and the Mode I/II figures
read: one meaning per column (`curve`, `method`, `label`, `mode`, `requested`), the measured sizes of
the step report as metric rows (`param_reduction` of the decomposed linears, Table 7's x axis), and
one `layer_reduction` row per decomposed linear. `lowrank_speed` times the compressed models against
the dense one (not a recipe point: a throughput, not a score), on the same session.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from mpt_utils.catalogue import method_info
from mpt_utils.errors import MPTError
from mpt_utils.recipe import Recipe, Step
from mpt_utils.session import Session

FAMILY = "lowrank"
SIZE_METRICS = ("param_reduction", "model_param_reduction", "flops_reduction", "n_params", "n_factorized")


@dataclass(frozen=True)
class Curve:
    """One curve of Table 7: `method` with `options` at the requested `ratios` (0: the dense point),
    those in `extra_ratios` also scored on the extra corpus. `name` tells curves of one method apart
    (`svd_llm_seq`); `display` is its name in tables and figures."""

    name: str
    method: str
    ratios: tuple[float, ...]
    options: Mapping[str, Any] = field(default_factory=dict)
    extra_ratios: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for ratio in self.ratios:  # every recipe parses now: an unknown option fails before any model loads
            self.recipe(ratio)

    @property
    def display(self) -> str:
        name = method_info(self.method).display
        return f"{name} (seq)" if self.options.get("sequential") else name

    @property
    def mode(self) -> str | None:
        return method_info(self.method).mode

    def recipe(self, ratio: float) -> str:
        """The canonical recipe of the point at requested `ratio` ("dense" at 0)."""
        return "dense" if ratio == 0 else str(Recipe((Step.of(self.method, ratio, **self.options),)))

    @property
    def recipes(self) -> list[str]:
        return [self.recipe(r) for r in self.ratios]

    @property
    def extra_recipes(self) -> list[str]:
        """The recipes also scored on the extra corpus."""
        return [self.recipe(r) for r in self.ratios if _among(r, self.extra_ratios)]


def _among(value: float, values: Iterable[float]) -> bool:
    return any(math.isclose(value, v, abs_tol=1e-12) for v in values)


def lowrank_curves(methods: Sequence[str], ratios: Sequence[float], *,
                   method_ratios: Mapping[str, Sequence[float]] | None = None,
                   method_options: Mapping[str, Mapping[str, Any]] | None = None,
                   asvd_options: Mapping[str, Any] | None = None, svd_llm_options: Mapping[str, Any] | None = None,
                   svd_llm_extra_ratios: Sequence[float] = (), sequential_ratios: Sequence[float] = (),
                   extra_eval_ratios: Sequence[float] = ()) -> list[Curve]:
    """Notebook 05's curves from its parameters, in table and legend order: one per method of
    `methods` on `method_ratios[method]` (default `ratios`; SVD-LLM also at `svd_llm_extra_ratios`),
    with `method_options[method]` merged over the ASVD / SVD-LLM options; SVD-LLM with the sequential
    update at `sequential_ratios` as a curve of its own (before the reference one) when given. Every
    recipe is checked here, before any model is loaded (`Curve`)."""
    per_method = {"asvd": dict(asvd_options or {}), "svd_llm": dict(svd_llm_options or {})}
    curves: list[Curve] = []
    for method in methods:
        options = {**per_method.get(method, {}), **(method_options or {}).get(method, {})}
        if method == "svd_llm" and sequential_ratios:
            curves.append(Curve("svd_llm_seq", method, (0.0, *map(float, sequential_ratios)),
                                {**options, "sequential": True}))
        extra = svd_llm_extra_ratios if method == "svd_llm" else ()
        grid = [*(method_ratios or {}).get(method, ratios), *extra]
        curves.append(Curve(method, method, tuple(map(float, grid)), options, tuple(map(float, extra_eval_ratios))))
    return curves


def release_plans(session: Session, curve: Curve, *protocols: Any) -> None:
    """Free `curve`'s plan and kept models on the benches of `protocols` (one method's factors at a
    time: a 7B model's are as large as the model itself)."""
    for protocol in protocols:
        if protocol is not None:
            session.bench(protocol).forget(curve.method, dict(curve.options))


def lowrank_rows(points: Iterable[Mapping[str, Any]] | pd.DataFrame, curves: Sequence[Curve]) -> pd.DataFrame:
    """The tidy rows of the curves' points (`Session.sweep` rows of any protocols; rows of other
    recipes are left out). Each point's rows are repeated for every curve holding its recipe (the
    dense point for every curve at ratio 0), with `curve`, `method`, `label` (display name), `mode`
    and `requested` (the curve's requested ratio); the recipe rows' `ratio` (the whole model's
    nominal compression) is dropped, it stays as the `compression_nominal` rows. Added per point,
    from its low-rank step report (dense: zero reductions), on the point's corpus: the metric rows
    `param_reduction` (measured on the decomposed linears, Table 7's axis), `model_param_reduction`,
    `flops_reduction`, `n_params`, `n_factorized`, and one `layer_reduction` row per decomposed
    linear (`layer`, `rank`, `out_features`, `in_features`; rank 0 = left dense)."""
    from mpt_utils.combined.grid import step_reports

    raw = points if isinstance(points, pd.DataFrame) else pd.DataFrame(list(points))
    if raw.empty:
        return raw
    owners: dict[str, list[tuple[Curve, float]]] = {}
    for curve in curves:
        for ratio in curve.ratios:
            owners.setdefault(curve.recipe(ratio), []).append((curve, ratio))
    raw = raw[raw["recipe"].isin(list(owners))].drop(columns=["ratio"], errors="ignore")
    # a point read more than once (the dense one, by every curve's sweep) counts once
    raw = raw.drop_duplicates(subset=[c for c in ("config_hash", "data", "metric", "step") if c in raw.columns])
    derived = []
    for key, point in raw.groupby("config_hash", sort=False):
        data = point["data"].dropna()
        base = {"config_hash": key, "recipe": point["recipe"].iloc[0], "data": data.iloc[0] if len(data) else None,
                "model": point["model"].iloc[0], "family": point["family"].iloc[0], "seed": point["seed"].iloc[0]}
        reports = [r for r in step_reports(point.to_dict("records")) if r.get("family") == FAMILY]
        if not reports:  # the dense point
            derived += [{**base, "metric": m, "value": 0.0} for m in SIZE_METRICS[:3]]
            continue
        report = reports[0]
        derived += [{**base, "metric": m, "value": float(report[m])} for m in SIZE_METRICS if m in report]
        derived += [{**base, "metric": "layer_reduction", "value": 1.0 - layer["params"] / layer["dense_params"],
                     "layer": layer["layer"], "rank": layer["rank"], "out_features": layer["out_features"],
                     "in_features": layer["in_features"]} for layer in report.get("layers", [])]
    rows = pd.concat([raw, pd.DataFrame(derived)], ignore_index=True)
    parts = []
    for text, holders in owners.items():
        mine = rows[rows["recipe"] == text]
        for curve, ratio in holders:
            parts.append(mine.assign(curve=curve.name, method=curve.method, label=curve.display, mode=curve.mode,
                                     requested=ratio))
    return pd.concat(parts, ignore_index=True) if parts else rows.iloc[0:0]


def lowrank_speed(session: Session, protocol: Any, recipes: Sequence[str | Recipe], *, seqlen: int = 256,
                  batch_size: int = 1, rounds: int = 5, mode: str = "prefill") -> pd.DataFrame:
    """Tokens/s of the dense model and each one-step low-rank recipe's model, side by side in one run
    (`eval.speed.measure_speed`, interleaved rounds), stored as one point on `session`. The timed
    models have the method's ranks from the plan the recipe points use (`LowRankPlan.apply_shapes`,
    from the bench's step cache): speed depends on the layer shapes, not on the values a
    ratio-specific update gives the factors, so that update is not recomputed here. Rows: `point`
    (the recipe, or "dense"), `requested`, `param_reduction`, tokens_per_s, speedup, spread."""
    from mpt_utils.recipe import lowrank_plan, needs_calibration

    parsed = [Recipe.parse(r) for r in recipes]
    for recipe in parsed:
        if len(recipe) != 1 or recipe[0].family != FAMILY:
            raise MPTError(f"cannot time {recipe}: the speed measurement takes one low-rank step",
                           "pass recipes such as svd_llm@0.2[update=closed_form]")
    cfg = {k: v for k, v in protocol.config().items() if k not in ("data", "max_windows", "divergence_k")}
    cfg.update(family=FAMILY, method="lowrank_speed", ratio=None, device=protocol.device,
               points=[str(r) for r in parsed], steps=[r.key()["steps"][0] for r in parsed],
               registry_method=sorted({r[0].method for r in parsed}), speed_seqlen=seqlen, batch_size=batch_size,
               rounds=rounds, mode=mode)

    def compute() -> list[dict[str, Any]]:
        from mpt_utils.eval.speed import measure_speed

        bench = session.bench(protocol)
        dense = bench.loaded.model
        models, reductions, requested = {"dense": dense}, {"dense": 0.0}, {"dense": 0.0}
        for recipe in parsed:
            step = recipe[0]
            calib = step.calibration(bench.calib_ids()) if needs_calibration(step) else None
            plan = lowrank_plan(bench.fresh_model(), step, calib, device=protocol.device,
                                progress=session.progress, cache=bench.step_cache)
            twin = copy.deepcopy(dense)
            report = plan.apply_shapes(twin, step.setting)
            report.originals = {}  # the twin keeps only its factorized layers
            models[str(recipe)] = twin
            reductions[str(recipe)], requested[str(recipe)] = report.param_reduction, float(step.setting)
        results = measure_speed(models, mode=mode, seqlen=seqlen, batch_size=batch_size, rounds=rounds,
                                device=protocol.device, reference="dense")
        return [{"metric": "tokens_per_s", "value": r.tokens_per_s, "point": r.name, "requested": requested[r.name],
                 "speedup": r.speedup, "spread": r.spread, "n_params_point": r.n_params,
                 "param_reduction": reductions[r.name], "speed_mode": r.mode, "speed_device": r.device}
                for r in results]

    return pd.DataFrame(session.require_store().get_or_compute(cfg, compute))


__all__ = ["Curve", "lowrank_curves", "lowrank_rows", "lowrank_speed", "release_plans"]
