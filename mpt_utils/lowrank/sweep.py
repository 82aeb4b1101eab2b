"""Table 7 sweeps: PPL of each low-rank method over a grid of parameter reductions, resumable.

One point = (method, ratio, corpus), stored as soon as it is finished. The expensive pieces are
computed lazily and at most once per run: the model, the calibration statistics (shared by ASVD and
SVD-LLM), each method's plan (its SVDs), and ASVD's sensitivity table (also stored, so a rerun
skips the search). Ratio 0 is the dense model, one point per corpus shared by every method.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from mpt_utils.catalogue import method_info
from mpt_utils.errors import MPTError
from mpt_utils.eval.divergence import DEFAULT_K as DIVERGENCE_K
from mpt_utils.session import Session
from mpt_utils.store import ResultsStore

FAMILY = "lowrank"


@dataclass
class SweepSpec:
    """One curve: a registered method, its options, the ratios, and the corpora to score."""

    method: str
    ratios: Sequence[float]
    options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None
    datasets: Sequence[str] | None = None  # None: the sweep's eval_data only
    extra_ratios: Sequence[float] = ()  # ratios also scored on the sweep's extra datasets

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        return f"{self.method}_seq" if self.options.get("sequential") else self.method

    @property
    def display(self) -> str:
        """The curve's name in tables and figures: the method's display name, '(seq)' when sequential."""
        if self.label:
            return self.label
        name = method_info(self.method).display
        return f"{name} (seq)" if self.options.get("sequential") else name


class LowRankSweep:
    """Table 7 points for one calibration and evaluation protocol; `run(specs)` returns the tidy rows.
    The model, windows, dense statistics, evaluator and each method's plan come from `session`
    (`mpt_utils.session.Session`, shared with the notebook's other drivers; one is made when none
    is given)."""

    def __init__(self, model: str, store: ResultsStore, *, eval_data: str, calib_data: str, seqlen: int,
                 n_calib: int, max_eval_windows: int | None, seed: int = 0, device: str | None = None,
                 extra_eval_data: Sequence[str] = (), progress: bool = True, loaded=None,
                 session: Session | None = None):
        self.model_name, self.store = model, store
        self.eval_data, self.extra_eval_data = eval_data, [d for d in extra_eval_data if d]
        self.calib_data, self.seqlen, self.n_calib = calib_data, seqlen, n_calib
        self.max_eval_windows, self.seed, self.device, self.progress = max_eval_windows, seed, device, progress
        self.session = session or Session(model, store, device=device, loaded=loaded, progress=progress)

    # -- lazy pieces ------------------------------------------------------------------------------
    @property
    def loaded(self):
        return self.session.loaded

    @property
    def calib(self):
        return self.session.calib_ids(self.calib_data, self.n_calib, self.seqlen, self.seed)

    @property
    def stats(self):
        return self.session.dense_stats(self.calib_data, self.n_calib, self.seqlen, self.seed)

    def _plan_key(self, spec: SweepSpec) -> tuple:
        return ("lowrank_plan", spec.name, self.calib_data, self.n_calib, self.seqlen, self.seed)

    def base_config(self) -> dict[str, Any]:
        return {"model": self.model_name, "family": FAMILY, "bits": None, "seed": self.seed,
                "seqlen": self.seqlen, "n_calib": self.n_calib, "calib_data": self.calib_data,
                "max_windows": self.max_eval_windows, "device": self.device, "divergence_k": DIVERGENCE_K}

    def sensitivity_table(self, spec: SweepSpec) -> dict[str, dict[float, float]]:
        """ASVD's per-group calibration PPLs, from the store when an earlier run measured them."""
        from mpt_utils.lowrank.asvd import plan_asvd

        opts = {k: spec.options[k] for k in ("alpha", "candidates", "min_kept", "granularity", "sens_windows", "sens_seqlen")
                if k in spec.options}
        cfg = {**self.base_config(), "method": "asvd_sensitivity", "ratio": None, "options": opts,
               "registry_method": "asvd"}

        def compute():
            plan = self.session.cached(self._plan_key(spec), lambda: plan_asvd(
                self.loaded.model, self.calib, stats=self.stats, device=self.device, progress=self.progress, **opts))
            base = plan.info["sensitivity_base_ppl"]
            rows = [{"metric": "calib_ppl", "group": g, "reduction": c, "value": ppl}
                    for g, row in plan.info["sensitivity"].items() for c, ppl in row.items()]
            return rows + [{"metric": "calib_ppl_dense", "value": base}]

        rows = self.store.get_or_compute(cfg, compute)
        table: dict[str, dict[float, float]] = {}
        for r in rows:
            if r["metric"] == "calib_ppl":
                table.setdefault(r["group"], {})[float(r["reduction"])] = float(r["value"])
        return table

    def plan(self, spec: SweepSpec):
        """The method's ratio-independent plan (its SVDs, ASVD's sensitivity), built once per session."""
        key = self._plan_key(spec)

        def build():
            from mpt_utils.lowrank import prepare

            opts = dict(spec.options)
            if spec.method == "asvd":
                opts["sensitivity_table"] = self.sensitivity_table(spec)
                if self.session.built(key):  # computing the sensitivity built the whole plan
                    return self.session.cached(key, lambda: None)
            calibrated = method_info(spec.method).calibration
            stats = self.stats if calibrated and not opts.get("sequential") else None
            return prepare(self.loaded.model, spec.method, self.calib, stats=stats, device=self.device,
                           progress=self.progress, **opts)

        return self.session.cached(key, build)

    # -- points -----------------------------------------------------------------------------------
    @property
    def paired(self):
        """Perplexity with the paired divergence from the dense model (`mpt_utils.eval.paired`)."""
        return self.session.paired(self.seqlen, self.max_eval_windows)

    def _ppl_rows(self, data: str) -> list[dict]:
        return self.paired.rows(self.loaded.model, [data], self.progress)

    def dense_point(self, data: str) -> list[dict]:
        cfg = {**self.base_config(), "method": "dense", "ratio": 0.0, "data": data}

        def compute():
            from mpt_utils.lowrank.factorized import count_params

            n = float(count_params(self.loaded.model))
            self.paired.prepare(self.loaded.model, [data], self.progress)
            size = [{"metric": m, "value": v} for m, v in
                    (("param_reduction", 0.0), ("model_param_reduction", 0.0), ("flops_reduction", 0.0),
                     ("n_params", n))]
            return [{**r, "data": data} for r in self._ppl_rows(data) + size]

        return self.store.get_or_compute(cfg, compute)

    def point(self, spec: SweepSpec, ratio: float, data: str) -> list[dict]:
        from mpt_utils.lowrank import LOWRANK, check_lowrank_ratio

        LOWRANK.check_options(spec.method, spec.options)  # fails before any model is loaded
        ratio = check_lowrank_ratio(ratio)
        if ratio == 0:
            return self.dense_point(data)
        cfg = {**self.base_config(), "method": spec.name, "ratio": ratio, "data": data,
               "registry_method": spec.method, "options": dict(spec.options)}

        def compute():
            model = self.loaded.model
            self.paired.prepare(model, [data], self.progress)  # before any layer is swapped out
            with self.plan(spec).swapped(model, ratio) as report:
                rows = self._ppl_rows(data)
                n_params = sum(p.numel() for p in model.parameters())
                if n_params != report.n_params_after:
                    raise MPTError(f"{spec.name}: counted {n_params} parameters, report says "
                                   f"{report.n_params_after}", "report this bug")
            extra = {"mode": LOWRANK.info(spec.method).mode, "requested_ratio": ratio, "data": data}
            summary = [{"metric": k, "value": v} for k, v in report.summary().items()]
            return [{**r, **extra} for r in rows + summary + report.layer_rows()]

        return self.store.get_or_compute(cfg, compute)

    def run(self, specs: Sequence[SweepSpec]) -> pd.DataFrame:
        """Every point of every spec (finished points come from the store). Only the last spec's plan
        stays in memory afterwards (for `speed`)."""
        rows = []
        for k, spec in enumerate(specs):
            if k:  # one method's factors at a time (a 7B model's are as large as the model itself)
                self.session.forget(self._plan_key(specs[k - 1]))
            for ratio in spec.ratios:
                datasets = list(spec.datasets or [self.eval_data])
                if ratio in spec.extra_ratios:
                    datasets += [d for d in self.extra_eval_data if d not in datasets]
                for data in datasets:
                    for r in self.point(spec, ratio, data):
                        rows.append({**r, "curve": spec.name})
        return pd.DataFrame(rows)

    # -- speed --------------------------------------------------------------------------------------
    def speed(self, points: Sequence[tuple[SweepSpec, float]], *, seqlen: int = 256, batch_size: int = 1,
              rounds: int = 5, mode: str = "prefill") -> pd.DataFrame:
        """Tokens/s of the dense model and each (method, ratio) model, side by side in one run
        (`eval.speed.measure_speed`, interleaved rounds), stored as one point. The timed models have
        the method's ranks (`LowRankPlan.apply_shapes`): speed depends on the layer shapes, not on the
        values a ratio-specific update gives the factors, so that update is not recomputed here."""
        labels = [f"{s.name}@{r:g}" for s, r in points]
        cfg = {**self.base_config(), "method": "speed", "ratio": None, "points": labels,
               "speed_seqlen": seqlen, "batch_size": batch_size, "rounds": rounds, "mode": mode,
               "options": {s.name: dict(s.options) for s, _ in points},
               "registry_method": sorted({s.method for s, _ in points})}

        def compute():
            from mpt_utils.eval.speed import measure_speed

            dense = self.loaded.model
            models = {"dense": dense}
            reductions = {"dense": 0.0}
            for (spec, ratio), label in zip(points, labels):
                twin = copy.deepcopy(dense)
                report = self.plan(spec).apply_shapes(twin, ratio)
                report.originals = {}  # the twin keeps only its factorized layers
                models[label] = twin
                reductions[label] = report.param_reduction
            results = measure_speed(models, mode=mode, seqlen=seqlen, batch_size=batch_size, rounds=rounds,
                                    device=self.device, reference="dense")
            return [{"metric": "tokens_per_s", "value": r.tokens_per_s, "point": r.name, "speedup": r.speedup,
                     "spread": r.spread, "n_params_point": r.n_params, "param_reduction": reductions[r.name],
                     "speed_mode": r.mode, "speed_device": r.device} for r in results]

        return pd.DataFrame(self.store.get_or_compute(cfg, compute))
