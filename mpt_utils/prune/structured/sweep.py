"""Notebook 04 as recipe points: structured pruning's recipes, what else is measured on each pruned
model, and the tidy rows its tables and figures read.

Each point is the one-step recipe `method@ratio[options]` (the ratio in the method's own unit, see
`mpt_utils.prune.structured`), scored by `Session.point` on a `combined.grid.GridSetup` protocol and
stored once under the recipe key. SLEB's and SliceGPT's published protocols calibrate on fewer or
shorter windows than the other methods: their steps carry the engine's `n_calib` / `calib_seqlen`
options, which take the first windows / tokens of the protocol's calibration set. Scoring on a second
corpus is the same recipe on a second protocol (that `eval_data`); the benches of both share the
method's scores and the pruned model, so nothing is pruned twice.

The other measurements of a pruned model (its prefill speed against the dense model, downstream
tasks, LoRA recovery and the recovered model's scores) are `Session.measure` points of the same
recipe, each stored under the recipe key plus its own settings, and taken from the model the score
just made. `structured_rows` turns all of them into one meaning per column: `method`, `ratio` (the
knob), `recovered`, `calibration_free`, and the sizes measured on the tensors (`param_reduction`,
the fraction of the dense model's weight bytes removed, the axis of the fits; `block_reduction`,
`n_params`, `n_layers`) beside every row and as metric rows.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mpt_utils.errors import MPTError
from mpt_utils.prune.structured import ENGINE_ARGS, STRUCTURED
from mpt_utils.recipe import CALIB_OPTIONS, Recipe, Step
from mpt_utils.session import Session

FAMILY = "structured"
SIZE_METRICS = ("param_reduction", "block_reduction", "n_params", "n_layers")


def _defaults(method: str) -> dict[str, Any]:
    params = inspect.signature(STRUCTURED.get(method)).parameters
    return {k: p.default for k, p in params.items()
            if k not in ENGINE_ARGS and p.default is not inspect.Parameter.empty}


def structured_step(method: str, ratio: float, options: Mapping[str, Any] | None = None,
                    calibration: Mapping[str, int] | None = None) -> Step:
    """The recipe step of `method` at `ratio`: `options` written only where they differ from the
    method's defaults (LLM-Pruner's 10 x 64-token gradient batch is `llm_pruner@0.2`), and for a
    calibrated method its share of the protocol's windows, `calibration` = {"n_calib": .., "calib_seqlen":
    ..} (either may be left out; a calibration-free method takes none and ignores it)."""
    defaults = _defaults(method)
    opts = {k: v for k, v in (options or {}).items() if k not in defaults or defaults[k] != v}
    if STRUCTURED.info(method).calibration:
        unknown = set(calibration or {}) - set(CALIB_OPTIONS)
        if unknown:
            raise MPTError(f"unknown calibration share {sorted(unknown)} for {method}",
                           f"give {' and/or '.join(CALIB_OPTIONS)}")
        opts.update({k: int(v) for k, v in (calibration or {}).items() if v is not None})
    return Step.of(method, float(ratio), **opts)


def structured_recipes(methods: Iterable[str], ratios: Sequence[float] | Mapping[str, Sequence[float]], *,
                       options: Mapping[str, Mapping[str, Any]] | None = None,
                       calibration: Mapping[str, Mapping[str, int]] | None = None,
                       protocol: Any = None) -> list[str]:
    """Notebook 04's recipes in table order: every method at every ratio (`ratios[method]` when a
    mapping), with `options[method]` and `calibration[method]` (`structured_step`). Given the
    `protocol`, a calibration share is checked against its windows and left out where it is all of
    them (`slicegpt@0.2`, not `slicegpt@0.2[n_calib=16]`, on 16 windows: one computation, one key).
    Every recipe is checked here, before any model is loaded."""
    whole = {} if protocol is None else {"n_calib": protocol.n_calib, "calib_seqlen": protocol.calib_len}
    out = []
    for method in methods:
        share = dict((calibration or {}).get(method) or {})
        for k, v in list(share.items()):
            if k in whole and v is not None and v > whole[k]:
                raise MPTError(f"{method} asks for {k}={v}, the protocol has {whole[k]}",
                               f"lower {method}'s {k}, or raise the protocol's")
            if whole.get(k) == v:
                del share[k]
        for ratio in (ratios[method] if isinstance(ratios, Mapping) else ratios):
            step = structured_step(method, ratio, (options or {}).get(method), share)
            out.append(str(Recipe((step,))))
    return out


def _step(recipe: str | Recipe) -> Step:
    parsed = Recipe.parse(recipe)
    if len(parsed) != 1 or parsed[0].family != FAMILY:
        raise MPTError(f"{parsed} is not one structured-pruning step",
                       "pass recipes such as shortgpt@0.2 (structured_recipes writes them)")
    return parsed[0]


def _among(value: float, values: Iterable[float] | None) -> bool:
    return values is None or any(math.isclose(value, v, abs_tol=1e-12) for v in values)


def _speed(session: Session, protocol: Any, recipe: str, speed: Mapping[str, Any]) -> list[dict[str, Any]]:
    from mpt_utils.eval.speed import measure_speed

    kw = {k: v for k, v in speed.items() if k not in ("ratios", "modes")}
    rows: list[dict[str, Any]] = []
    for mode in speed.get("modes", ["prefill"]):
        def measure(model: torch.nn.Module, bench: Any, mode: str = mode) -> list[dict[str, Any]]:
            dense, pruned = measure_speed({"dense": bench.loaded.model, "pruned": model}, mode=mode,
                                          device=protocol.device, **kw)
            return [{"metric": "speedup", "value": pruned.speedup, "mode": mode, "tokens_per_s": pruned.tokens_per_s,
                     "dense_tokens_per_s": dense.tokens_per_s, "spread": max(pruned.spread, dense.spread),
                     "speed_device": pruned.device}]

        rows += session.measure(recipe, protocol, "speed", {"mode": mode, "speed": kw}, measure)
    return rows


def downstream_point(session: Session, protocol: Any, recipe: str | Recipe,
                     downstream: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Accuracy of the model `recipe` makes ("dense": the dense model) on `downstream["tasks"]`
    (`eval.downstream.evaluate_downstream`, `limit` items per task, `backend`), stored once."""
    from mpt_utils.eval.downstream import evaluate_downstream

    settings = {"tasks": list(downstream["tasks"]), "limit": downstream.get("limit"),
                "backend": downstream.get("backend")}

    def measure(model: torch.nn.Module, bench: Any) -> list[dict[str, Any]]:
        out = evaluate_downstream(model, session.tokenizer, settings["tasks"], limit=settings["limit"],
                                  backend=settings["backend"], seed=protocol.seed)
        return list(out.to_dict("records") if isinstance(out, pd.DataFrame) else out)

    return session.measure(recipe, protocol, "downstream", settings, measure)


def _recovery(session: Session, protocol: Any, recipe: str, recovery: Mapping[str, Any],
              datasets: list[str]) -> list[dict[str, Any]]:
    from mpt_utils.prune.structured.recovery import lora_recover

    kw = {k: v for k, v in recovery.items() if k not in ("methods", "ratios", "windows", "seqlen")}
    windows, seqlen = int(recovery.get("windows", 64)), int(recovery.get("seqlen", protocol.seqlen))
    settings = {"recovery": {**kw, "windows": windows, "seqlen": seqlen}, "eval": datasets}

    def measure(model: torch.nn.Module, bench: Any) -> list[dict[str, Any]]:
        # LoRA trains on other windows of the calibration corpus than the ones the method calibrated on
        train = session.calib_ids(protocol.calib_data, windows, seqlen, protocol.seed + 1)
        info = lora_recover(model, train, seed=protocol.seed, device=protocol.device, progress=session.progress,
                            **kw)
        paired = bench.paired(session.require_store().root)
        paired.prepare(bench.loaded.model, datasets, session.progress)
        tag = {**info, "recovery_data": f"{protocol.calib_data} calibration split"}
        return [{**row, **tag} for row in paired.rows(model, datasets, session.progress)]

    return session.measure(recipe, protocol, "recovery", settings, measure)


def structured_sweep(session: Session, protocol: Any, recipes: Iterable[str | Recipe], *,
                     extra_eval_data: str | None = None, extra_ratios: Sequence[float] | None = None,
                     speed: Mapping[str, Any] | None = None, downstream: Mapping[str, Any] | None = None,
                     recovery: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Every recipe's point on `protocol` (a `GridSetup`), run or read back, and at the ratios each
    setting names the other measurements, as `structured_rows`:
    - `extra_eval_data`: the point scored on that corpus too, at `extra_ratios` (None: every ratio);
    - `speed`: `measure_speed` keywords plus "ratios" and "modes" (default prefill);
    - `downstream`: "tasks", "limit", "backend", "ratios", "methods" (default: all);
    - `recovery`: `lora_recover` keywords plus "methods", "ratios" (default: all), "windows" and
      "seqlen" of the LoRA training set (other windows of the calibration corpus), then scored on the
      point's corpora.
    Unknown methods and bad options fail before any model is loaded."""
    steps = {str(Recipe.parse(r)): _step(r) for r in recipes}
    extra = replace(protocol, eval_data=extra_eval_data) if extra_eval_data else None
    points: list[tuple[list[dict[str, Any]], dict[str, Any]]] = []
    for recipe, step in steps.items():
        ratio, method = float(step.setting), step.method
        scored = session.point(recipe, protocol)
        points.append((scored, {"recovered": False}))
        with_extra = extra is not None and _among(ratio, extra_ratios)
        if with_extra:
            points.append((session.point(recipe, extra), {"recovered": False}))
        if speed and _among(ratio, speed.get("ratios", [])):
            points.append((_speed(session, protocol, recipe, speed), {"recovered": False, "of": scored}))
        if downstream and _among(ratio, downstream.get("ratios")) and method in downstream.get("methods", [method]):
            points.append((downstream_point(session, protocol, recipe, downstream),
                           {"recovered": False, "of": scored}))
        if recovery and method in recovery.get("methods", []) and _among(ratio, recovery.get("ratios")):
            datasets = [protocol.eval_data] + ([extra_eval_data] if with_extra else [])
            points.append((_recovery(session, protocol, recipe, recovery, datasets),
                           {"recovered": True, "of": scored}))
    return structured_rows(points)


def step_sizes(scored: list[dict[str, Any]]) -> dict[str, Any]:
    """The sizes a one-step structured recipe point's step measured on the tensors (its step report):
    param/block reduction, parameters and blocks after, parameters before, the step's seconds and detail."""
    from mpt_utils.combined.grid import step_reports

    report = next(r for r in step_reports(scored) if r.get("family") == FAMILY)
    return {"param_reduction": report["param_reduction"], "block_reduction": report["block_reduction"],
            "n_params": report["params_after"], "n_layers": report["n_layers_after"],
            "dense_params": report["params_before"], "prune_seconds": report["seconds"], "detail": report["detail"]}


def structured_rows(points: Iterable[tuple[list[dict[str, Any]], Mapping[str, Any]]]) -> pd.DataFrame:
    """Tidy rows of (rows, tags) pairs: a recipe point's rows (tags: `recovered`) or another
    measurement's (tags: `recovered`, `of` = the rows of the point it measured, whose step report gives
    the sizes). Every row gets `method`, `ratio` (the method's knob; the whole model's nominal
    compression stays as the `compression_nominal` rows), `recovered`, `calibration_free` and the
    measured sizes; each scored point adds the metric rows `param_reduction`, `block_reduction`,
    `n_params`, `n_layers` and `prune_seconds` (its step's wall time, with `detail`: what it removed)."""
    out: list[dict[str, Any]] = []
    sized: set[str] = set()
    for rows, tags in points:
        if not rows:
            continue
        step = _step(rows[0]["recipe"])
        sizes = step_sizes(tags.get("of", rows))
        tag = {"method": step.method, "ratio": float(step.setting), "recovered": bool(tags.get("recovered")),
               "calibration_free": not STRUCTURED.info(step.method).calibration,
               **{k: sizes[k] for k in (*SIZE_METRICS, "dense_params")}}
        out += [{**row, **tag} for row in rows if row.get("metric") != "step_seconds"]
        if "of" not in tags and rows[0]["recipe"] not in sized:  # once per pruned model
            sized.add(rows[0]["recipe"])
            base = {k: rows[0].get(k) for k in ("recipe", "config_hash", "model", "family", "data", "seed")}
            out += [{**base, **tag, "metric": m, "value": float(sizes[m])} for m in SIZE_METRICS]
            out.append({**base, **tag, "metric": "prune_seconds", "value": float(sizes["prune_seconds"]),
                        "detail": sizes["detail"]})
    return pd.DataFrame(out)


def save_and_reload(session: Session, protocol: Any, recipe: str | Recipe, path: str | Path,
                    n_check: int = 2) -> dict[str, Any]:
    """Prune a copy as `recipe` does on `protocol`, save it with save_pretrained, reload it through
    load_model and compare the logits on `n_check` other calibration windows."""
    from mpt_utils.models import load_model
    from mpt_utils.prune.structured.surgery import save_pruned

    step = _step(recipe)
    model, reports = session.bench(protocol).compressed_model(Recipe((step,)))
    save_pruned(model, path, session.tokenizer, meta=reports[0])
    back = load_model(str(path), device=protocol.device)
    ids = session.calib_ids(protocol.calib_data, n_check, min(protocol.seqlen, 128), protocol.seed + 7)
    ids = ids.to(next(model.parameters()).device)
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - back.model(input_ids=ids).logits).abs().max().item()
    files = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    return {"method": step.method, "ratio": float(step.setting), "recipe": str(Recipe((step,))),
            "params": reports[0]["params_after"], "reloaded_params": back.info.n_params, "max_logit_diff": diff,
            "safetensors_mb": files / 2**20, "arch": back.info.arch}


def recovery_effect(rows: pd.DataFrame, data: str, label: str = "label") -> str:
    """One sentence: how LoRA recovery changed perplexity on `data`, over the (`label`, ratio) points
    measured both without and with it: the median and range of PPL(with) / PPL(without) and the
    point it helped most. Says so instead of raising when no point was recovered."""
    if rows.empty or "recovered" not in rows.columns:
        return "No point was recovered with LoRA: recovery is not assessed."
    ppl = rows[(rows["metric"] == "ppl") & (rows["data"] == data)].assign(rec=lambda d: d["recovered"].astype(bool))
    table = ppl.pivot_table(index=[label, "ratio"], columns="rec", values="value", aggfunc="first")
    if not {True, False} <= set(table.columns):
        return "No point was measured both with and without LoRA recovery: recovery is not assessed."
    finite = np.isfinite(table[True].astype(float)) & np.isfinite(table[False].astype(float))
    change = (table[True] / table[False])[finite]  # a collapse on either side has no meaningful ratio
    if change.empty:
        return "No point was measured both with and without LoRA recovery: recovery is not assessed."
    (best_label, best_ratio), best = change.idxmin(), change.min()
    if len(change) == 1:
        return f"LoRA recovery on 1 point: PPL ×{best:.2f} of the unrecovered model ({best_label} at {best_ratio:g})."
    return (f"LoRA recovery on {len(change)} points: PPL ×{change.median():.2f} of the unrecovered model "
            f"(median; ×{best:.2f} to ×{change.max():.2f}), most for {best_label} at {best_ratio:g}.")
