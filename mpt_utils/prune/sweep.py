"""Sparsity sweeps: many (method, sparsity) points on one model, each point stored as it finishes.

Mode "sequential" (the default) is the published protocol of Wanda, SparseGPT, ADMM, RIA, OWL,
DSnoT and BESA (which has no dense mode): every point runs the layer-by-layer engine, so block i is
pruned from the outputs of the already pruned blocks 0..i-1. Those inputs change with the method and the ratio, so each point
recomputes every block's statistics, even for mask-only methods; what a session reuses is what does
not depend on the point: the tokenized calibration windows and OWL's dense block scores.
Mode "dense" is a labelled fast shortcut: the dense model's per-layer statistics (`collect_stats`)
are collected once and every point prunes from them, with each layer's inverse-Hessian factors kept
in the per-layer `cache`; later blocks are then pruned for inputs they no longer receive (notebook
02 measures how far that drifts).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch

from mpt_utils.errors import MPTError
from mpt_utils.eval.divergence import DEFAULT_K as DIVERGENCE_K
from mpt_utils.prune.masks import parse_pattern, pattern_name, resolve_sparsity
from mpt_utils.session import Session
from mpt_utils.store import ResultsStore

FAMILY = "unstructured"
MODES = ("dense", "sequential")


def parse_method(label: str) -> tuple[str, dict[str, Any]]:
    """'owl:sparsegpt' -> ('owl', {'base': 'sparsegpt'}); 'wanda' -> ('wanda', {})."""
    name, _, base = label.partition(":")
    return name, ({"base": base} if base else {})


def paper_name(label: str) -> str | None:
    """The name the paper's Tables 2/3 (data/published/table2_unstructured.csv) give method `label`
    ('owl:wanda' -> 'Wanda_owl'); None when the label names no registered method."""
    from mpt_utils.catalogue import load_all

    name, opts = parse_method(label)
    info = load_all().get(name)
    return info.paper(opts.get("base")) if info is not None else None


def method_label(name: str, opts: dict[str, Any]) -> str:
    if name in ("owl", "dsnot"):
        return f"{name}:{opts.get('base', 'wanda')}"
    return name


def sweep_points(sparsities: Iterable[float] = (), patterns: Iterable[str] = ()) -> list[tuple[float, str | None]]:
    """(sparsity, pattern) pairs: the unstructured ratios, then each N:M pattern at N/M."""
    points: list[tuple[float, str | None]] = [(resolve_sparsity(s, None), None) for s in sparsities]
    for p in patterns:
        nm = parse_pattern(p)
        points.append((resolve_sparsity(None, nm), pattern_name(nm)))
    return points


class PruneSession:
    """One model, one calibration set, one evaluation protocol; points are computed on demand and
    resumed from the store. The model, windows, dense statistics and evaluator come from `session`
    (`mpt_utils.session.Session`, shared with the notebook's other drivers; one is made when none is
    given), loaded only when a point is missing from the store. Points prune the session's model in
    place and put its dense weights back (`Session.restore`)."""

    def __init__(self, model: str, store: ResultsStore, *, calib_data: str, n_calib: int, seqlen: int,
                 eval_data: Sequence[str], max_eval_windows: int | None = None, seed: int = 0,
                 device: str | None = None, mode: str = "sequential", calib_seqlen: int | None = None,
                 loaded=None, progress: bool = False, session: Session | None = None):
        if mode not in MODES:
            raise MPTError(f"unknown sweep mode {mode!r}", f"use one of {MODES}")
        self.model, self.store, self.calib_data, self.n_calib = model, store, calib_data, int(n_calib)
        self.seqlen, self.calib_seqlen = int(seqlen), int(calib_seqlen or seqlen)
        self.eval_data, self.max_eval_windows, self.seed = list(eval_data), max_eval_windows, int(seed)
        self.device, self.mode, self.progress = device, mode, progress
        self.session = session or Session(model, store, device=device, loaded=loaded, progress=progress)
        self._cache: dict[str, dict] = {}
        self.stats_seconds = math.nan

    # -- lazily built, ratio-independent state -------------------------------------------------
    def derive(self, **changes: Any) -> PruneSession:
        """A session with other settings (e.g. calib_data, mode) on the same loaded model."""
        keys = ("calib_data", "n_calib", "seqlen", "eval_data", "max_eval_windows", "seed", "device", "mode",
                "calib_seqlen", "progress")
        store = changes.pop("store", self.store)
        args = {k: getattr(self, k) for k in keys} | changes
        return PruneSession(self.model, store, session=self.session, **args)

    @property
    def loaded(self):
        return self.session.loaded

    def restore(self) -> None:
        """Put the dense weights back into the model."""
        self.session.restore()

    @property
    def calib_ids(self) -> torch.Tensor:
        return self.session.calib_ids(self.calib_data, self.n_calib, self.calib_seqlen, self.seed)

    @property
    def stats(self):
        stats = self.session.dense_stats(self.calib_data, self.n_calib, self.calib_seqlen, self.seed)
        self.stats_seconds = self.session.seconds(("stats", self.calib_data, self.n_calib, self.calib_seqlen,
                                                   self.seed))
        return stats

    @property
    def paired(self):
        """Perplexity with the paired divergence from the dense model (`mpt_utils.eval.paired`)."""
        return self.session.paired(self.seqlen, self.max_eval_windows)

    def block_scores(self, name: str, opts: dict[str, Any]) -> list[float] | None:
        """The dense block scores of an allocating method (OWL), computed once per session: every
        point and every ratio of a sweep allocates from the same dense model."""
        from mpt_utils.prune.engine import allocation_scores

        def build() -> list[float] | None:
            self.restore()
            data = {"stats": self.stats} if self.mode == "dense" else {"calib_ids": self.calib_ids}
            return allocation_scores(self.loaded.model, name, device=self.device, progress=self.progress,
                                     **data, **opts)

        key = ("block_scores", name, self.mode, self.calib_data, self.n_calib, self.calib_seqlen, self.seed,
               repr(sorted(opts.items())))
        return self.session.cached(key, build)

    def close(self) -> None:
        """Free this protocol's statistics and caches (the model stays loaded, restored to dense)."""
        self.restore()
        stats_key = ("stats", self.calib_data, self.n_calib, self.calib_seqlen, self.seed)
        self.session.forget(stats_key, where=lambda k: isinstance(k, tuple) and k[:1] == ("block_scores",))
        self._cache = {}

    # -- points --------------------------------------------------------------------------------
    def config(self, method: str, sparsity: float, pattern: str | None, opts: dict[str, Any]) -> dict[str, Any]:
        from mpt_utils.prune import check_method_options, get_method

        name, base_opts = parse_method(method)
        opts = {**base_opts, **opts}
        check_method_options(name, opts)  # a misspelled option fails before any model is loaded
        data_free = not get_method(name).calibration
        return {"model": self.model, "method": method_label(name, opts), "family": FAMILY,
                "ratio": float(sparsity), "bits": None, "pattern": pattern or "unstructured", "seed": self.seed,
                "calib_data": None if data_free else self.calib_data,
                "n_calib": None if data_free else self.n_calib,
                "calib_seqlen": None if data_free else self.calib_seqlen,
                "mode": "data-free" if data_free else self.mode, "opts": opts,
                "eval_data": self.eval_data, "seqlen": self.seqlen, "max_eval_windows": self.max_eval_windows,
                "device": self.device, "divergence_k": DIVERGENCE_K}

    def point(self, method: str, sparsity: float | None = None, pattern: str | None = None,
              **opts: Any) -> list[dict[str, Any]]:
        """Rows of one point (PPL per eval set, achieved sparsity, timings), computed if not stored."""
        nm = parse_pattern(pattern)
        target = resolve_sparsity(sparsity, nm)
        pattern = None if nm is None else pattern_name(nm)
        cfg = self.config(method, target, pattern, opts)
        return self.store.get_or_compute(cfg, lambda: self._compute(cfg))

    def _compute(self, cfg: dict[str, Any]) -> list[dict[str, Any]]:
        from mpt_utils.prune import get_method, prune_model

        name, _ = parse_method(cfg["method"])
        spec = get_method(name)
        self.session.snapshot()
        self.restore()
        self.paired.prepare(self.loaded.model, self.eval_data, self.progress)  # the model is dense here
        kwargs: dict[str, Any] = dict(cfg["opts"])
        if spec.calibration and self.mode == "dense":
            kwargs.update(stats=self.stats, cache=self._cache, calib_seqlen=self.calib_seqlen)
        elif spec.calibration:
            kwargs.update(calib_ids=self.calib_ids, sequential=True, device=self.device)
        if spec.allocate is not None:
            kwargs["block_scores"] = self.block_scores(name, cfg["opts"])
        pattern = None if cfg["pattern"] == "unstructured" else cfg["pattern"]
        try:
            report = prune_model(self.loaded.model, name, None if pattern else cfg["ratio"], pattern=pattern,
                                 progress=self.progress, **kwargs)
            if pattern is not None and not report.nm_ok:
                raise MPTError(f"{cfg['method']} broke the {pattern} pattern", "this is a bug: please report it")
            ppl = self.paired.rows(self.loaded.model, self.eval_data, self.progress)
        finally:
            self.restore()
        common = {"pattern": cfg["pattern"], "calib_data": cfg["calib_data"], "mode": cfg["mode"],
                  "sparsity": report.achieved, "sparsity_all_params": report.sparsity_all_params,
                  "nm_ok": report.nm_ok, "prune_mode": report.mode, "prune_seconds": report.seconds,
                  "stats_seconds": self.stats_seconds if report.mode == "dense-stats" else None,
                  "block_targets": report.block_targets}
        rows = [{**r, **common} for r in ppl]
        rows.append({"metric": "sparsity", "value": report.achieved, "data": None, **common})
        rows.append({"metric": "prune_seconds", "value": report.seconds, "data": None, **common})
        return rows

    def sweep(self, methods: Iterable[str], sparsities: Iterable[float] = (), patterns: Iterable[str] = (),
              skip_unsupported: bool = True, **opts: Any) -> pd.DataFrame:
        """Every method at every point; N:M points of methods without N:M support are skipped."""
        from mpt_utils.prune import get_method

        points = sweep_points(sparsities, patterns)
        rows: list[dict[str, Any]] = []
        for method in methods:
            supports_nm = get_method(parse_method(method)[0]).supports_nm
            for s, p in points:
                if p is not None and not supports_nm and skip_unsupported:
                    continue
                rows.extend(self.point(method, s if p is None else None, p, **opts))
            self._cache = {}  # a method's factors are reused across its points, then freed
        return pd.DataFrame(rows)

    def compare_modes(self, methods: Iterable[str], sparsities: Iterable[float],
                      method_opts: Mapping[str, dict[str, Any]] | None = None) -> pd.DataFrame:
        """How far the dense-statistics shortcut drifts from sequential pruning: one row per
        (calibrated method, sparsity) with the PPL on the first eval set in both modes, their ratio
        (dense / sequential) and each mode's pruning seconds. Stored points (e.g. this session's
        sweep) are reused; data-free methods are skipped (the same point in both modes), and so are
        block-level ones (BESA trains on block outputs, which dense statistics do not hold)."""
        from mpt_utils.prune import get_method

        sessions = {m: self if m == self.mode else self.derive(mode=m) for m in MODES}
        rows: list[dict[str, Any]] = []
        try:
            for method in methods:
                spec = get_method(parse_method(method)[0])
                if not spec.calibration or spec.block_level:
                    continue
                opts = dict((method_opts or {}).get(method, {}))
                for s in sparsities:
                    row: dict[str, Any] = {"method": method, "sparsity": float(s)}
                    for mode, session in sessions.items():
                        ppl = next(r for r in session.point(method, s, **opts)
                                   if r["metric"] == "ppl" and r["data"] == self.eval_data[0])
                        row[f"ppl_{mode}"] = ppl["value"]
                        row[f"prune_seconds_{mode}"] = ppl["prune_seconds"]
                    row["ratio"] = row["ppl_dense"] / row["ppl_sequential"]
                    rows.append(row)
                for session in sessions.values():
                    session._cache = {}
        finally:
            for session in sessions.values():
                if session is not self:
                    session.close()
        return pd.DataFrame(rows, columns=["method", "sparsity", "ppl_sequential", "ppl_dense", "ratio",
                                           "prune_seconds_sequential", "prune_seconds_dense"])


def unstructured_findings(table: pd.DataFrame, drift: pd.DataFrame, patterns: Iterable[str] = ()) -> list[str]:
    """Sentences for notebook 02's conclusion, computed from its Table 2 analogue (`table`: PPL, one row
    per method label, one column per sparsity as "0.5" plus the N:M `patterns`) and the dense-shortcut
    drift (`PruneSession.compare_modes`): the jump across the paper's transition (PPL at 0.7 over 0.5),
    the ranking at high sparsity (methods that update the kept weights against mask-only ones, where
    magnitude ranks) and how far the dense-statistics shortcut moves PPL from sequential pruning."""
    from mpt_utils.prune import get_method  # the registry imports each method on demand

    out = []
    cols = [c for c in table.columns if c not in set(patterns)]
    if {"0.5", "0.7"} <= set(cols):
        jump = (table["0.7"] / table["0.5"]).dropna()
        out.append("PPL(0.7)/PPL(0.5) per method, the jump across the paper's transition: "
                   + ", ".join(f"{m} ×{v:.1f}" for m, v in jump.items()) + ".")
    # a method run at fewer sparsities (BESA) leaves gaps: rank the methods measured at that sparsity
    full = [c for c in cols if 0.6 <= float(c) <= 0.8 and table[c].notna().sum() > 1]
    if full:
        s = "0.7" if "0.7" in full else max(full, key=lambda c: (table[c].notna().sum(), float(c)))
        ranked = table[s].dropna().sort_values()
        updating = [m for m in ranked.index if get_method(parse_method(m)[0]).updates_weights]
        masking = [m for m in ranked.index if m not in updating]
        out.append(f"At sparsity {s} (best first): " + ", ".join(f"{m} {v:.1f}" for m, v in ranked.items()) + ".")
        if updating and masking:
            lead = ranked[updating].min() < ranked[masking].min()
            out.append(f"The methods that update the kept weights ({', '.join(updating)}) "
                       f"{'lead' if lead else 'do not lead'} the mask-only ones, as in the paper's ranking"
                       f"{'' if lead else ' (a disagreement)'}.")
        if "magnitude" in ranked.index:
            place = list(ranked.index).index("magnitude") + 1
            out.append(f"Magnitude ranks {place} of {len(ranked)}"
                       f"{' (last, as in the paper)' if place == len(ranked) else ' (the paper has it last)'}.")
    if len(drift):
        worst = drift.loc[(drift.ratio - 1).abs().idxmax()]
        out.append(f"The dense-statistics shortcut changes PPL by ×{drift.ratio.min():.2f} to "
                   f"×{drift.ratio.max():.2f} against sequential pruning (median ×{drift.ratio.median():.2f}; "
                   f"furthest: {worst.method} at {worst.sparsity:g}).")
    return out
