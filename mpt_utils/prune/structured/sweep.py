"""A resumable ratio sweep of structured pruning methods: prune a copy of the dense model, evaluate
perplexity, measure speed side by side with the dense model, optionally run downstream tasks and
LoRA recovery. Every (method, ratio, kind) is its own point in the results store, so an interrupted
sweep resumes and a finished one only reads the store.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mpt_utils.data import calibration_windows
from mpt_utils.eval.divergence import DEFAULT_K as DIVERGENCE_K
from mpt_utils.eval.paired import PairedEvaluator
from mpt_utils.models import LoadedModel
from mpt_utils.prune.structured import STRUCTURED, structured_prune
from mpt_utils.session import Session
from mpt_utils.store import ResultsStore

FAMILY = "structured"


@dataclass
class SweepSettings:
    """Everything that defines the sweep's numbers (it goes into each point's config)."""

    model: str
    eval_data: str
    calib_data: str
    seqlen: int
    n_calib: int
    max_eval_windows: int | None
    extra_eval_data: str | None = None
    extra_ratios: list[float] | None = None  # score extra_eval_data only at these ratios (None: all)
    seed: int = 0
    device: str | None = None
    options: dict[str, dict] = field(default_factory=dict)  # per-method options
    calib_slices: dict[str, dict] = field(default_factory=dict)  # per-method {"n": .., "seqlen": ..}
    recovery: dict[str, Any] | None = None  # lora_recover kwargs + "windows", "seqlen", "methods"
    speed: dict[str, Any] | None = None  # measure_speed kwargs + "ratios", "modes"
    downstream: dict[str, Any] | None = None  # {"tasks": [...], "limit": n, "ratios": [...], "methods": [...]}

    def datasets(self, ratio: float | None = None) -> list[str]:
        extra = self.extra_eval_data and (self.extra_ratios is None or ratio is None or ratio in self.extra_ratios)
        return [self.eval_data] + ([self.extra_eval_data] if extra else [])

    def base_config(self, method: str, ratio: float) -> dict[str, Any]:
        cal = self.calib_slices.get(method, {})
        free = not STRUCTURED.info(method).calibration
        return {"model": self.model, "method": method, "family": FAMILY, "ratio": float(ratio), "bits": None,
                "seed": self.seed, "data": None if free else self.calib_data,
                "seqlen": self.seqlen, "n_calib": None if free else self.n_calib,
                "calib_slice": cal or None, "options": self.options.get(method, {}), "device": self.device,
                "max_eval_windows": self.max_eval_windows, "divergence_k": DIVERGENCE_K}


class _Lazy:
    """The pruned model, built only if some point of this (method, ratio) still has to be computed."""

    def __init__(self, build: Callable[[], tuple[torch.nn.Module, Any]]):
        self._build, self._value = build, None

    def get(self):
        if self._value is None:
            self._value = self._build()
        return self._value


def _calib(settings: SweepSettings, session: Session, method: str) -> torch.Tensor | None:
    if not STRUCTURED.info(method).calibration:
        return None
    windows = session.calib_ids(settings.calib_data, settings.n_calib, settings.seqlen, settings.seed)
    cal = settings.calib_slices.get(method, {})
    return windows[: cal.get("n"), : cal.get("seqlen")]


def _ppl_rows(model, dense, paired: PairedEvaluator, settings: SweepSettings, ratio: float,
              progress: bool) -> list[dict]:
    """Perplexity and the paired divergence from `dense` (whose reference is read or made once)."""
    datasets = settings.datasets(ratio)
    paired.prepare(dense, datasets, progress)
    return paired.rows(model, datasets, progress)


def structured_sweep(source: Session | LoadedModel, store: ResultsStore, settings: SweepSettings,
                     methods: list[str], ratios: list[float] | dict[str, list[float]],
                     progress: bool = False, log: Callable[[str], None] | None = print) -> pd.DataFrame:
    """Run (or read back) every method at every ratio; returns all rows of these points. `source`: the
    notebook's `Session` (model, windows and evaluator shared with its other drivers), or a loaded
    model (a session is made around it)."""
    from mpt_utils.eval.speed import measure_speed
    from mpt_utils.prune.structured.recovery import lora_recover

    for m in methods:  # unknown methods and misspelled options fail before any work
        STRUCTURED.check_options(m, settings.options.get(m, {}))
    session = source if isinstance(source, Session) else Session(settings.model, store, device=settings.device,
                                                                 loaded=source)
    dense, tok = session.dense, session.tokenizer
    paired = session.paired(settings.seqlen, settings.max_eval_windows)
    cache: dict = {}
    rows: list[dict] = []
    rec = settings.recovery or {}
    spd = settings.speed or {}
    dst = settings.downstream or {}
    for method in methods:
        for ratio in (ratios[method] if isinstance(ratios, dict) else ratios):
            base = settings.base_config(method, ratio)
            free = not STRUCTURED.info(method).calibration

            def build(method=method, ratio=ratio):
                model = copy.deepcopy(dense)
                res = structured_prune(model, method, ratio, _calib(settings, session, method), cache=cache,
                                       seed=settings.seed, progress=progress, **settings.options.get(method, {}))
                if log:
                    log(f"{method} ratio={ratio}: removed {res.param_reduction:.1%} of all parameters "
                        f"({res.block_reduction:.1%} of block parameters) in {res.seconds:.1f} s")
                return model, res

            pruned = _Lazy(build)
            extra = {"recovered": False, "calibration_free": free}

            def main_rows(pruned=pruned, extra=extra, ratio=ratio):
                model, res = pruned.get()
                size = {"param_reduction": res.param_reduction, "block_reduction": res.block_reduction,
                        "n_params": res.params_after, "n_layers": res.n_layers_after}
                out = [{**r, **extra, **size} for r in _ppl_rows(model, dense, paired, settings, ratio, progress)]
                out += [{"metric": k, "value": v, **extra, **size} for k, v in size.items()]
                out.append({"metric": "prune_seconds", "value": res.seconds, **extra, **size,
                            "detail": res.detail})
                return out

            point = store.get_or_compute({**base, "kind": "ppl", "eval": settings.datasets(ratio)}, main_rows)
            rows += point
            size = {k: point[0].get(k) for k in ("param_reduction", "block_reduction", "n_params", "n_layers")}

            if spd and ratio in spd.get("ratios", []):
                for mode in spd.get("modes", ["prefill"]):
                    kw = {k: v for k, v in spd.items() if k not in ("ratios", "modes")}

                    def speed_rows(pruned=pruned, mode=mode, kw=kw, size=size, extra=extra):
                        model, _ = pruned.get()
                        dense_r, pruned_r = measure_speed({"dense": dense, "pruned": model}, mode=mode,
                                                          device=settings.device, **kw)
                        return [{"metric": "speedup", "value": pruned_r.speedup, "mode": mode, **extra, **size,
                                 "tokens_per_s": pruned_r.tokens_per_s, "dense_tokens_per_s": dense_r.tokens_per_s,
                                 "spread": max(pruned_r.spread, dense_r.spread), "speed_device": pruned_r.device}]

                    rows += store.get_or_compute({**base, "kind": "speed", "mode": mode, "speed": kw}, speed_rows)

            if dst and ratio in dst.get("ratios", []) and method in dst.get("methods", methods):
                def down_rows(pruned=pruned, size=size, extra=extra):
                    from mpt_utils.eval.downstream import evaluate_downstream

                    model, _ = pruned.get()
                    out = evaluate_downstream(model, tok, dst["tasks"], limit=dst.get("limit"),
                                              backend=dst.get("backend"), seed=settings.seed)
                    frame = out if isinstance(out, pd.DataFrame) else pd.DataFrame(out)
                    return [{**r, **extra, **size} for r in frame.to_dict("records")]

                rows += store.get_or_compute({**base, "kind": "downstream", "tasks": list(dst["tasks"]),
                                              "limit": dst.get("limit"), "backend": dst.get("backend")}, down_rows)

            if rec and method in rec.get("methods", []) and ratio in rec.get("ratios", [ratio]):
                kw = {k: v for k, v in rec.items() if k not in ("methods", "windows", "seqlen", "ratios")}

                def rec_rows(pruned=pruned, kw=kw, size=size, ratio=ratio, free=free):
                    model, _ = pruned.get()
                    train = session.calib_ids(settings.calib_data, rec.get("windows", 64),
                                              rec.get("seqlen", settings.seqlen), settings.seed + 1)
                    info = lora_recover(model, train, seed=settings.seed, device=settings.device,
                                        progress=progress, **kw)
                    pruned._value = None  # weights changed: later points must not reuse this model
                    tag = {"recovered": True, "calibration_free": free, **size, **info,
                           "recovery_data": f"{settings.calib_data} calibration split"}
                    return [{**r, **tag} for r in _ppl_rows(model, dense, paired, settings, ratio, progress)]

                rows += store.get_or_compute({**base, "kind": "ppl", "eval": settings.datasets(ratio), "recovery": {
                    **kw, "windows": rec.get("windows", 64), "seqlen": rec.get("seqlen", settings.seqlen)}}, rec_rows)
    return pd.DataFrame(rows)


def save_and_reload(source: Session | LoadedModel, method: str, ratio: float, settings: SweepSettings,
                    path: str | Path, n_check: int = 2) -> dict[str, Any]:
    """Prune one copy, save it with save_pretrained, reload it through load_model, compare logits.
    `source`: the notebook's `Session` or a loaded model."""
    from mpt_utils.models import load_model
    from mpt_utils.prune.structured.surgery import save_pruned

    session = source if isinstance(source, Session) else Session(settings.model, device=settings.device,
                                                                 loaded=source)
    loaded = session.loaded
    model = session.fresh_model()
    cal = _calib(settings, session, method)
    res = structured_prune(model, method, ratio, cal, seed=settings.seed, progress=False,
                           **settings.options.get(method, {}))
    save_pruned(model, path, loaded.tokenizer, meta=res.as_dict())
    back = load_model(str(path), device=settings.device)
    ids = calibration_windows(loaded.tokenizer, settings.calib_data, n_check, min(settings.seqlen, 128),
                              settings.seed + 7).to(next(model.parameters()).device)
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - back.model(input_ids=ids).logits).abs().max().item()
    files = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    return {"method": method, "ratio": ratio, "params": res.params_after, "reloaded_params": back.info.n_params,
            "max_logit_diff": diff, "safetensors_mb": files / 2**20, "arch": back.info.arch}


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
