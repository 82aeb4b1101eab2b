"""Notebook 02's sparsity sweeps as recipe points, and the dense-statistics shortcut beside them.

Every point of the sweep is a one-step recipe (`wanda@0.5`, `owl@0.5[base=wanda]`, `sparsegpt@2:4`,
`besa@0.5[d0=0.001,epochs=3]`) measured by `Session.point/sweep` on a protocol (`GridSetup`), i.e.
by the one engine (`combined.grid.grid_point` -> `recipe.apply_recipe` -> `prune_model`): sequential,
layer by layer on the calibration windows, so block i is pruned from the outputs of the already
pruned blocks 0..i-1 (the published protocol of Wanda, SparseGPT, ADMM, RIA, OWL, DSnoT and BESA).
`prune_recipes` writes the recipe list from the notebook's parameters and `point_rows` turns the
stored recipe rows into the rows its tables and figures read (method label, pattern, target and
measured sparsity, pruning seconds, the paired PPL/KL rows).

The dense-statistics shortcut is not a recipe: `dense_shortcut_point` prunes every block from the
dense model's per-layer statistics (`collect_stats`, one pass for every point), so later blocks are
pruned for inputs they no longer receive; it is stored under its own key (`mode: "dense"`), and
`compare_modes` measures how far it drifts from the recipe points.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pandas as pd

from mpt_utils.errors import MPTError
from mpt_utils.eval.divergence import DEFAULT_K as DIVERGENCE_K
from mpt_utils.prune.masks import parse_pattern, pattern_name, resolve_sparsity
from mpt_utils.recipe import Recipe, Step
from mpt_utils.session import Session

if TYPE_CHECKING:
    from mpt_utils.combined.grid import GridSetup

FAMILY = "unstructured"


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


def prune_recipe(label: str, sparsity: float | None = None, pattern: str | None = None, **opts: Any) -> Recipe:
    """The one-step recipe of method `label` ('owl:wanda' -> owl with base=wanda) at `sparsity` or
    N:M `pattern`, with the method's `opts`."""
    name, base = parse_method(label)
    nm = parse_pattern(pattern)
    setting = pattern_name(nm) if nm is not None else resolve_sparsity(sparsity, None)
    return Recipe((Step.of(name, setting, **{**base, **opts}),))


def prune_recipes(methods: Iterable[str], sparsities: Iterable[float] = (), patterns: Iterable[str] = (), *,
                  method_opts: Mapping[str, Mapping[str, Any]] | None = None,
                  method_sparsities: Mapping[str, Iterable[float | str]] | None = None) -> list[Recipe]:
    """Every method label at every sparsity, then at each N:M pattern the method supports (registry
    trait `supports_nm`), with its options from `method_opts`; a label in `method_sparsities` runs
    only the points of the sweep it lists, sparsities and "N:M" patterns (BESA, the costliest
    method, at the paper's points: [0.5, 0.7])."""
    from mpt_utils.prune import get_method

    sparsities, patterns = list(sparsities), list(patterns)
    recipes: list[Recipe] = []
    for label in methods:
        opts = dict((method_opts or {}).get(label, {}))
        keep = (method_sparsities or {}).get(label)
        points, nm = sparsities, patterns
        if keep is not None:
            numbers = [k for k in keep if not isinstance(k, str)]
            points = [s for s in sparsities if any(math.isclose(s, k) for k in numbers)]
            nm = [p for p in patterns if parse_pattern(p) in {parse_pattern(k) for k in keep if isinstance(k, str)}]
        recipes += [prune_recipe(label, s, **opts) for s in points]
        if get_method(parse_method(label)[0]).supports_nm:
            recipes += [prune_recipe(label, pattern=p, **opts) for p in nm]
    return recipes


def point_rows(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Notebook 02's rows from one-step pruning recipe points (`Session.point/sweep` rows): per point
    its paired rows (ppl, kl_mean, ... with their `stderr`), a `sparsity` row (measured on the
    tensors) and a `prune_seconds` row, each carrying `method` (the label, e.g. 'owl:wanda'),
    `recipe`, `pattern` ('unstructured' or 'N:M'), `ratio` (the target sparsity, N/M for a pattern),
    `sparsity` (measured zeros / prunable weights), `sparsity_all_params`, `nm_ok`, `prune_mode`,
    `prune_seconds` and `block_targets`, read from the pruning step's report (its `step_seconds` row)."""
    from mpt_utils.combined.build import recipe_settings
    from mpt_utils.combined.grid import step_reports

    points: dict[Any, list[Mapping[str, Any]]] = {}
    for row in rows:
        points.setdefault(row.get("config_hash", row.get("recipe")), []).append(row)
    out: list[dict[str, Any]] = []
    for point in points.values():
        recipe = Recipe.parse(point[0]["recipe"])
        if len(recipe) != 1 or recipe[0].family != "prune":
            raise MPTError(f"recipe {recipe} is not one pruning step",
                           "pass the rows of one-step pruning recipes (prune_recipes)")
        step = recipe[0]
        done = [r for r in step_reports(point) if r["step"] == str(step)]
        if len(done) != 1:
            raise MPTError(f"the rows of {recipe} hold {len(done)} reports of its pruning step",
                           "pass every row of the point, as Session.point returns them")
        report = done[0]
        settings = recipe_settings(recipe)
        common = {"method": method_label(step.method, step.opts), "family": FAMILY, "recipe": str(recipe),
                  "pattern": settings["pattern"], "ratio": settings["prune"], "sparsity": report["achieved"],
                  "sparsity_all_params": report["sparsity_all_params"], "nm_ok": report["nm_ok"],
                  "prune_mode": report["mode"], "prune_seconds": report["seconds"],
                  "block_targets": report["block_targets"]}
        out += [{**r, **common} for r in point if r.get("data") is not None]  # the evaluator's rows
        out.append({**_base(point[0]), "metric": "sparsity", "value": report["achieved"], "data": None, **common})
        out.append({**_base(point[0]), "metric": "prune_seconds", "value": common["prune_seconds"], "data": None,
                    **common})
    return pd.DataFrame(out)


def _base(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("model", "seed", "config_hash") if k in row}


# -- the dense-statistics shortcut ------------------------------------------------------------------
def shortcut_config(protocol: GridSetup, label: str, sparsity: float, opts: Mapping[str, Any]) -> dict[str, Any]:
    """The store key of the dense-statistics shortcut of `label` at `sparsity` on `protocol` (the
    key the sweeps have always given it, so stored shortcut points are found again)."""
    from mpt_utils.prune import check_method_options, get_method

    name, base = parse_method(label)
    opts = {**base, **opts}
    check_method_options(name, opts)  # a misspelled option fails before any model is loaded
    spec = get_method(name)
    if not spec.calibration or spec.block_level:
        raise MPTError(f"{label} has no dense-statistics shortcut",
                       "a data-free method prunes the same either way, and a block-level one (BESA) trains on "
                       "block outputs that dense statistics do not hold: use its recipe point")
    return {"model": protocol.model, "method": method_label(name, opts), "family": FAMILY,
            "ratio": resolve_sparsity(sparsity, None), "bits": None, "pattern": "unstructured", "seed": protocol.seed,
            "calib_data": protocol.calib_data, "n_calib": protocol.n_calib, "calib_seqlen": protocol.calib_len,
            "mode": "dense", "opts": opts, "eval_data": [protocol.eval_data], "seqlen": protocol.seqlen,
            "max_eval_windows": protocol.max_windows, "device": protocol.device, "divergence_k": DIVERGENCE_K}


def _stats_key(protocol: GridSetup) -> tuple:
    return ("stats", protocol.calib_data, protocol.n_calib, protocol.calib_len, protocol.seed)


def dense_shortcut_point(session: Session, protocol: GridSetup, label: str, sparsity: float,
                         **opts: Any) -> list[dict[str, Any]]:
    """A labelled shortcut, not the published protocol: `label` at `sparsity` pruned on a copy of
    the dense model from the dense model's per-layer statistics on `protocol`'s calibration windows
    (gathered once per session), each layer's ratio-independent factors (inverse Hessians) kept
    across the method's points; scored like a recipe point (paired PPL/KL rows, plus `sparsity` and
    `prune_seconds` rows, `prune_mode` "dense-stats"). Stored under `shortcut_config`."""
    from mpt_utils.prune import prune_model

    cfg = shortcut_config(protocol, label, sparsity, opts)
    name, _ = parse_method(label)

    def compute() -> list[dict[str, Any]]:
        s = protocol
        paired = session.paired(s.seqlen, s.max_windows)
        paired.prepare(session.dense, [s.eval_data], session.progress)  # the session's model stays dense
        stats = session.dense_stats(s.calib_data, s.n_calib, s.calib_len, s.seed)
        factors = session.cached(("dense_shortcut", *_stats_key(s)[1:], cfg["method"], repr(sorted(cfg["opts"].items()))),
                                 dict)
        model = session.fresh_model()
        report = prune_model(model, name, cfg["ratio"], stats=stats, cache=factors, calib_seqlen=s.calib_len,
                             progress=session.progress, **cfg["opts"])
        scored = paired.rows(model, [s.eval_data], session.progress)
        del model
        common = {"pattern": cfg["pattern"], "calib_data": s.calib_data, "mode": "dense",
                  "sparsity": report.achieved, "sparsity_all_params": report.sparsity_all_params,
                  "nm_ok": report.nm_ok, "prune_mode": report.mode, "prune_seconds": report.seconds,
                  "stats_seconds": session.seconds(_stats_key(s)), "block_targets": report.block_targets}
        return [*({**r, **common} for r in scored),
                {"metric": "sparsity", "value": report.achieved, "data": None, **common},
                {"metric": "prune_seconds", "value": report.seconds, "data": None, **common}]

    return session.require_store().get_or_compute(cfg, compute)


def compare_modes(session: Session, protocol: GridSetup, methods: Iterable[str], sparsities: Iterable[float],
                  method_opts: Mapping[str, Mapping[str, Any]] | None = None) -> pd.DataFrame:
    """How far the dense-statistics shortcut drifts from the recipe points (sequential pruning): one
    row per (calibrated method, sparsity) with the PPL on `protocol`'s evaluation corpus both ways,
    their ratio (dense / sequential) and each one's pruning seconds. Stored points (the notebook's
    sweep) are reused; data-free methods (the same point both ways) and block-level ones (BESA trains
    on block outputs, which dense statistics do not hold) are skipped. The dense statistics and the
    shortcut's factors are freed afterwards."""
    from mpt_utils.prune import get_method

    rows: list[dict[str, Any]] = []
    try:
        for method in methods:
            spec = get_method(parse_method(method)[0])
            if not spec.calibration or spec.block_level:
                continue
            opts = dict((method_opts or {}).get(method, {}))
            for s in sparsities:
                seq = point_rows(session.point(prune_recipe(method, s, **opts), protocol))
                seq = seq[(seq.metric == "ppl") & (seq.data == protocol.eval_data)].iloc[0]
                dense = next(r for r in dense_shortcut_point(session, protocol, method, s, **opts)
                             if r["metric"] == "ppl" and r["data"] == protocol.eval_data)
                rows.append({"method": method, "sparsity": float(s), "ppl_sequential": float(seq["value"]),
                             "ppl_dense": float(dense["value"]), "ratio": dense["value"] / seq["value"],
                             "prune_seconds_sequential": float(seq["prune_seconds"]),
                             "prune_seconds_dense": float(dense["prune_seconds"])})
    finally:
        session.forget(_stats_key(protocol), where=lambda k: isinstance(k, tuple) and k[:1] == ("dense_shortcut",))
    return pd.DataFrame(rows, columns=["method", "sparsity", "ppl_sequential", "ppl_dense", "ratio",
                                       "prune_seconds_sequential", "prune_seconds_dense"])


def unstructured_findings(table: pd.DataFrame, drift: pd.DataFrame, patterns: Iterable[str] = ()) -> list[str]:
    """Sentences for notebook 02's conclusion, computed from its Table 2 analogue (`table`: PPL, one row
    per method label, one column per sparsity as "0.5" plus the N:M `patterns`) and the dense-shortcut
    drift (`compare_modes`): the jump across the paper's transition (PPL at 0.7 over 0.5),
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
