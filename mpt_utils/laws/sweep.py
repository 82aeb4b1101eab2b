"""The stored experiment grid of the compression laws: base models × methods × ratios × RFT budgets.

Every point goes through `ResultsStore.get_or_compute`, so a rerun only reads the store and an
interrupted run resumes. Points (config `kind`):

  ce          test cross-entropy and bits per byte on each evaluation corpus (dense: method "dense")
  downstream  the offline downstream suite (accuracy with chance) through `evaluate_downstream`
  rft         LoRA recovery on D tokens ("recovery": "lora_rft", "tokens": D), then ce + downstream
  speed       prefill tokens/s of the dense model and every pruned one, timed side by side in one run

Methods: `random_prunenet` (calibration-free, this package) and `slicegpt` (calibration-based, the
suite's `mpt_utils.prune.structured`). Each pruned model is built once per (model, method, ratio)
and only when some point of it is missing; RFT trains on a copy, so the pruned model is reused.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn

from mpt_utils.catalogue import method_info
from mpt_utils.data import calibration_windows
from mpt_utils.errors import MPTError, check_ratio
from mpt_utils.laws import prunenet
from mpt_utils.laws.intrinsic import ce_rows
from mpt_utils.laws.rft import DEFAULTS as RFT_DEFAULTS
from mpt_utils.laws.rft import RECOVERY, lora_rft
from mpt_utils.models import LoadedModel
from mpt_utils.store import ResultsStore

FAMILY = "compression_laws"
METHODS = ("random_prunenet", "slicegpt")


@dataclass
class LawSettings:
    """Everything that defines the grid's numbers (it goes into each point's config)."""

    eval_data: list[str]
    calib_data: str
    seqlen: int = 512
    n_calib: int = 16
    max_eval_windows: int | None = 4
    ratios: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7])  # CE + downstream + RFT
    curve_ratios: list[float] = field(default_factory=list)  # CE only: shape and PTP fits need more ratios
    tokens: list[int] = field(default_factory=lambda: [2000, 20000])  # RFT budgets D
    rft_ratios: list[float] | None = None  # None: every ratio of `ratios`
    rft_models: list[str] | None = None  # base models that get RFT points (None: all)
    rft: dict[str, Any] = field(default_factory=dict)  # overrides of mpt_utils.laws.rft.DEFAULTS
    tasks: str | list[str] | None = "mpt_offline"  # None: intrinsic metrics only
    limit: int | None = 40
    backend: str = "mpt"
    speed_ratios: list[float] = field(default_factory=list)
    speed: dict[str, Any] = field(default_factory=lambda: {"seqlen": 256, "rounds": 3})
    seed: int = 0
    device: str | None = None

    def __post_init__(self):
        if isinstance(self.eval_data, str):
            self.eval_data = [self.eval_data]
        for r in [*self.ratios, *self.curve_ratios, *(self.rft_ratios or []), *self.speed_ratios]:
            check_ratio(r)
        unknown = set(self.rft) - set(RFT_DEFAULTS)
        if unknown:
            raise MPTError(f"unknown RFT settings {sorted(unknown)}", f"use keys of {sorted(RFT_DEFAULTS)}")
        self.rft = {**RFT_DEFAULTS, **self.rft}

    @property
    def all_ratios(self) -> list[float]:
        return sorted({float(r) for r in [*self.ratios, *self.curve_ratios, *self.speed_ratios]} - {0.0})

    def base(self, model: str, method: str, ratio: float) -> dict[str, Any]:
        cfg = {"model": model, "method": method, "family": FAMILY, "ratio": float(ratio), "bits": None,
               "seed": self.seed, "device": self.device}
        if method == "slicegpt":
            cfg.update(data=self.calib_data, n_calib=self.n_calib, calib_seqlen=self.seqlen)
        elif method == prunenet.METHOD:  # registered with version_in_config: versioned here
            cfg["method_version"] = prunenet.LAW_METHODS.info(method).version
        return cfg

    def ce_config(self, model: str, method: str, ratio: float) -> dict[str, Any]:
        return {**self.base(model, method, ratio), "kind": "ce", "eval": list(self.eval_data), "seqlen": self.seqlen,
                "max_eval_windows": self.max_eval_windows}

    def downstream_config(self, model: str, method: str, ratio: float) -> dict[str, Any]:
        return {**self.base(model, method, ratio), "kind": "downstream", "tasks": self.tasks, "limit": self.limit,
                "backend": self.backend}

    def rft_config(self, model: str, method: str, ratio: float, tokens: int) -> dict[str, Any]:
        ce, down = self.ce_config(model, method, ratio), self.downstream_config(model, method, ratio)
        return {**ce, **down, "kind": "rft", "recovery": RECOVERY, "tokens": int(tokens),
                "rft": {**self.rft, "data": self.calib_data}}


def unsupported(method: str, model: nn.Module) -> str | None:
    """Why `method` cannot prune `model` (None when it can), found before any work is spent."""
    from mpt_utils.calibration import decoder_layers
    from mpt_utils.prune.structured.surgery import llama_parts

    layers = decoder_layers(model)
    try:
        for block in layers:
            llama_parts(block)
    except MPTError as err:
        return err.message
    if method == "slicegpt" and any(len(list(b.children())) != 4 for b in layers):
        # Gemma 3 normalises the attention and MLP outputs too (four RMSNorms per block, scale 1 + w):
        # a rotation of the residual stream no longer commutes with the block, SliceGPT's premise.
        return (f"SliceGPT needs pre-norm blocks with two RMSNorms; {type(layers[0]).__name__} has "
                f"{len(list(layers[0].children())) - 2} norms")
    return None


def prune_copy(dense: nn.Module, method: str, ratio: float, *, calib_ids: torch.Tensor | None = None,
               seed: int = 0, cache: dict | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A pruned deep copy of `dense` and what was removed (measured on its tensors)."""
    from mpt_utils.prune.structured import structured_prune

    model = copy.deepcopy(dense)
    start = time.perf_counter()
    if method == prunenet.METHOD:
        detail = prunenet.random_prunenet(model, ratio, seed=seed)
    elif method == "slicegpt":
        res = structured_prune(model, "slicegpt", ratio, calib_ids, cache=cache, seed=seed, progress=False)
        detail = {"param_reduction": res.param_reduction, "block_reduction": res.block_reduction,
                  "n_params": res.params_after, **res.detail}
    else:
        raise MPTError(f"unknown compression-law method {method!r}", f"use one of {METHODS}")
    detail["prune_seconds"] = time.perf_counter() - start
    return model, detail


def _size(detail: dict[str, Any]) -> dict[str, Any]:
    return {k: detail.get(k) for k in ("param_reduction", "block_reduction", "n_params")}


def _downstream(model: nn.Module, tokenizer, settings: LawSettings) -> list[dict[str, Any]]:
    from mpt_utils.eval.downstream import evaluate_downstream

    rows = evaluate_downstream(model, tokenizer, tasks=settings.tasks, limit=settings.limit,
                               backend=settings.backend, seed=settings.seed)
    return [r for r in rows if r.get("level", "task") == "task"]


class _ModelGrid:
    """The points of one base model. A pruned model is built only when a point of it is missing (a
    finished grid only reads the store); the calibration set is drawn once per model."""

    def __init__(self, name: str, loaded: LoadedModel, store: ResultsStore, settings: LawSettings,
                 say: Callable[[str], None]):
        self.name, self.dense, self.tok = name, loaded.model, loaded.tokenizer
        self.store, self.settings, self.say = store, settings, say
        self.dense_size = {"param_reduction": 0.0, "block_reduction": 0.0, "n_params": loaded.info.n_params}
        self.calib: torch.Tensor | None = None
        self.cache: dict = {}  # SliceGPT statistics of the dense model, shared across ratios
        self.pruned: tuple[nn.Module, dict] | None = None
        self.rows: list[dict[str, Any]] = []

    def add(self, point: list[dict], **tags: Any) -> None:
        self.rows.extend({**r, **tags} for r in point)

    def ce(self, model: nn.Module) -> list[dict[str, Any]]:
        s = self.settings
        return ce_rows(model, self.tok, s.eval_data, s.seqlen, s.max_eval_windows, s.device)

    def calib_ids(self, method: str) -> torch.Tensor | None:
        if not method_info(method).calibration:
            return None
        if self.calib is None:
            s = self.settings
            self.calib = calibration_windows(self.tok, s.calib_data, s.n_calib, s.seqlen, s.seed, model=self.dense)
        return self.calib

    def get_pruned(self, method: str, ratio: float) -> tuple[nn.Module, dict]:
        if self.pruned is None:
            self.pruned = prune_copy(self.dense, method, ratio, calib_ids=self.calib_ids(method),
                                     seed=self.settings.seed, cache=self.cache)
        return self.pruned

    def dense_points(self) -> None:
        s = self.settings
        self.add(self.store.get_or_compute(s.ce_config(self.name, "dense", 0.0), lambda: [
            {**r, **self.dense_size} for r in self.ce(self.dense)]), kind="ce", tokens=0, recovered=False)
        if s.ratios and s.tasks:
            self.add(self.store.get_or_compute(s.downstream_config(self.name, "dense", 0.0), lambda: [
                {**r, **self.dense_size} for r in _downstream(self.dense, self.tok, s)]),
                kind="downstream", tokens=0, recovered=False)

    def ce_point(self, method: str, ratio: float) -> list[dict[str, Any]]:
        model, detail = self.get_pruned(method, ratio)
        return [{**r, **_size(detail), "prune_seconds": detail["prune_seconds"]} for r in self.ce(model)]

    def downstream_point(self, method: str, ratio: float, size: dict) -> list[dict[str, Any]]:
        return [{**r, **size} for r in _downstream(self.get_pruned(method, ratio)[0], self.tok, self.settings)]

    def rft_point(self, method: str, ratio: float, tokens: int, size: dict) -> list[dict[str, Any]]:
        s = self.settings
        model = copy.deepcopy(self.get_pruned(method, ratio)[0])  # the pruned model stays for other budgets
        info = lora_rft(model, self.tok, int(tokens), s.calib_data, seed=s.seed, device=s.device,
                        **{k: v for k, v in s.rft.items() if k != "epochs"})
        self.say(f"{self.name} {method} r={ratio:g} D={tokens}: train loss {info['train_loss_before']:.3f} -> "
                 f"{info['train_loss_after']:.3f} in {info['rft_seconds']:.0f} s")
        out = [{**r, "kind": "ce"} for r in self.ce(model)]
        out += [{**r, "kind": "downstream"} for r in (_downstream(model, self.tok, s) if s.tasks else [])]
        return [{**r, **size, **info} for r in out]

    def method_points(self, method: str) -> None:
        s = self.settings
        rft_ratios = s.ratios if s.rft_ratios is None else s.rft_ratios
        if s.rft_models is not None and self.name not in s.rft_models:
            rft_ratios = []
        speed_cfg = _speed_config(s, self.name, method)
        need_speed = bool(s.speed_ratios) and not self.store.has(speed_cfg)
        speed_models: dict[float, nn.Module] = {}
        # each closure below runs inside get_or_compute at once, so binding the loop variables late is safe
        for ratio in s.all_ratios:
            self.pruned = None
            point = self.store.get_or_compute(s.ce_config(self.name, method, ratio),
                                              lambda: self.ce_point(method, ratio))  # noqa: B023
            size = _size(point[0])
            self.add(point, kind="ce", tokens=0, recovered=False)
            if ratio in s.ratios and s.tasks:
                self.add(self.store.get_or_compute(s.downstream_config(self.name, method, ratio),
                                                   lambda: self.downstream_point(method, ratio, size)),  # noqa: B023
                         kind="downstream", tokens=0, recovered=False)
            for tokens in (s.tokens if ratio in rft_ratios else []):
                point = self.store.get_or_compute(s.rft_config(self.name, method, ratio, tokens),
                                                  lambda: self.rft_point(method, ratio, tokens, size))  # noqa: B023
                self.rows.extend({**r, "tokens": r.get("tokens", tokens), "recovered": True} for r in point)
            if need_speed and ratio in s.speed_ratios:
                speed_models[ratio] = self.get_pruned(method, ratio)[0]
        self.pruned = None
        if s.speed_ratios:
            self.add(self.store.get_or_compute(speed_cfg, lambda: _speed_rows(self.dense, speed_models, s)),
                     kind="speed", tokens=0, recovered=False)


def law_sweep(models: dict[str, LoadedModel], store: ResultsStore, settings: LawSettings,
              methods: list[str] | tuple[str, ...] = METHODS, log: Callable[[str], None] | None = print
              ) -> pd.DataFrame:
    """Run (or read back) the whole grid; returns every row with `model`, `method`, `ratio`, `tokens`
    (0 = no RFT), `recovered` and `kind`. Methods a model cannot take are logged and skipped."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise MPTError(f"unknown compression-law methods {unknown}", f"use any of {METHODS}")
    say = log or (lambda _msg: None)
    rows: list[dict[str, Any]] = []
    for name, loaded in models.items():
        grid = _ModelGrid(name, loaded, store, settings, say)
        grid.dense_points()
        for method in methods:
            why = unsupported(method, loaded.model)
            if why:
                say(f"{name}: {method} skipped: {why}")
                continue
            grid.method_points(method)
        rows += grid.rows
    return pd.DataFrame(rows)


def _speed_config(settings: LawSettings, model: str, method: str) -> dict[str, Any]:
    return {**settings.base(model, method, 0.0), "ratio": None, "kind": "speed", "ratios": sorted(settings.speed_ratios),
            "speed": dict(settings.speed), "mode": "prefill"}


def _speed_rows(dense: nn.Module, pruned: dict[float, nn.Module], settings: LawSettings) -> list[dict[str, Any]]:
    """Prefill tokens/s of the dense model and every pruned one, interleaved in one measurement."""
    from mpt_utils.eval.speed import measure_speed

    named = {"dense": dense, **{f"r={r:g}": m for r, m in sorted(pruned.items())}}
    results = measure_speed(named, mode="prefill", device=settings.device, seed=settings.seed, **settings.speed)
    ratio_of = {"dense": 0.0, **{f"r={r:g}": r for r in pruned}}
    return [{"metric": "speedup", "value": res.speedup, "ratio": ratio_of[res.name], "tokens_per_s": res.tokens_per_s,
             "spread": res.spread, "n_params": res.n_params, "speed_device": res.device, "speed_seqlen": res.seqlen}
            for res in results]


def settings_dict(settings: LawSettings) -> dict[str, Any]:
    return asdict(settings)
