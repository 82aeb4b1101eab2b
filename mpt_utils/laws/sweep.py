"""The stored experiment grid of the compression laws: base models × methods × ratios × RFT budgets,
on the recipe engine.

Each (base model, method, ratio) is the one-step recipe `random_prunenet@r` / `slicegpt@r` on the
protocol `LawSettings.protocol(model)` (a `combined.grid.GridSetup`: the first evaluation corpus,
the calibration corpus, seqlen, n_calib, max_eval_windows, seed) of one `Session` per base model.
The recipe's point (`Session.point`: perplexity and KL on the first corpus, the sizes, the step
report) is stored once under the recipe key; the laws read other measurements of the same pruned
model, each a `Session.measure` point (`kind`, with the settings it depends on):

  ce          test cross-entropy and bits per byte on each evaluation corpus ("eval": the corpora)
  downstream  the offline downstream suite (accuracy with chance), `prune.structured.sweep.downstream_point`
  rft         LoRA recovery on D tokens ("tokens", "rft" settings), then ce + downstream of the recovered model

The dense model's are the same measurements of the recipe "dense". One more stored point per (model,
method) times prefill tokens/s of the dense model and every pruned one side by side ("speed").

Methods: `random_prunenet` (calibration-free) and `slicegpt` (calibration-based), both structured
methods of `mpt_utils.prune.structured`. The session prunes each model once and only when a point of it
is missing (a finished grid loads and prunes nothing); RFT trains on a private copy, so the pruned
model serves every budget. The methods draw no random numbers from the protocol's `seed`, which sets
the calibration windows and the RFT and downstream draws (RandomPruneNet's channels come from its own
seed, 0).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from torch import nn

from mpt_utils.combined.grid import GridSetup, point_config
from mpt_utils.errors import MPTError, check_ratio
from mpt_utils.laws.intrinsic import ce_rows
from mpt_utils.laws.rft import DEFAULTS as RFT_DEFAULTS
from mpt_utils.laws.rft import lora_rft
from mpt_utils.models import LoadedModel
from mpt_utils.prune.structured.surgery import count_params
from mpt_utils.prune.structured.sweep import downstream_point, step_sizes
from mpt_utils.recipe import Recipe, Step
from mpt_utils.session import Session
from mpt_utils.store import ResultsStore

FAMILY = "compression_laws"
METHODS = ("random_prunenet", "slicegpt")
SIZES = ("param_reduction", "block_reduction", "n_params")


@dataclass
class LawSettings:
    """Everything that defines the grid's numbers (the protocol and each measurement's settings)."""

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
        if not self.eval_data:
            raise MPTError("no evaluation corpus given", "pass eval_data=['embedded-wiki']")
        for r in [*self.ratios, *self.curve_ratios, *(self.rft_ratios or []), *self.speed_ratios]:
            check_ratio(r)
        unknown = set(self.rft) - set(RFT_DEFAULTS)
        if unknown:
            raise MPTError(f"unknown RFT settings {sorted(unknown)}", f"use keys of {sorted(RFT_DEFAULTS)}")
        self.rft = {**RFT_DEFAULTS, **self.rft}

    @property
    def all_ratios(self) -> list[float]:
        return sorted({float(r) for r in [*self.ratios, *self.curve_ratios, *self.speed_ratios]} - {0.0})

    def protocol(self, model: str) -> GridSetup:
        """The recipe protocol of base model `model`: scored on the first evaluation corpus, calibrated
        on `n_calib` windows of `seqlen` tokens of `calib_data`."""
        return GridSetup(model=model, eval_data=self.eval_data[0], calib_data=self.calib_data, seqlen=self.seqlen,
                         n_calib=self.n_calib, max_windows=self.max_eval_windows, seed=self.seed, device=self.device)

    def ce_settings(self) -> dict[str, Any]:
        return {"eval": list(self.eval_data)}

    def downstream_settings(self) -> dict[str, Any]:
        tasks = [self.tasks] if isinstance(self.tasks, str) else list(self.tasks or [])
        return {"tasks": tasks, "limit": self.limit, "backend": self.backend}

    def rft_settings(self, tokens: int) -> dict[str, Any]:
        down = self.downstream_settings() if self.tasks else {"tasks": None}
        return {**self.ce_settings(), **down, "tokens": int(tokens), "rft": {**self.rft, "data": self.calib_data}}


def recipe_of(method: str, ratio: float) -> str:
    """The one-step recipe of a law point (`random_prunenet@0.3`)."""
    return str(Recipe((Step.of(method, float(ratio)),)))


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


def _downstream(model: nn.Module, tokenizer, settings: LawSettings) -> list[dict[str, Any]]:
    from mpt_utils.eval.downstream import evaluate_downstream

    rows = evaluate_downstream(model, tokenizer, tasks=settings.tasks, limit=settings.limit,
                               backend=settings.backend, seed=settings.seed)
    return [r for r in rows if r.get("level", "task") == "task"]


class _ModelGrid:
    """The law points of one base model on its session; rows tagged as the laws read them."""

    def __init__(self, name: str, session: Session, settings: LawSettings, say: Callable[[str], None]):
        self.name, self.session, self.settings, self.say = name, session, settings, say
        self.protocol = settings.protocol(name)
        self.rows: list[dict[str, Any]] = []

    def add(self, point: list[dict[str, Any]], method: str, ratio: float, **tags: Any) -> None:
        self.rows.extend({"tokens": 0, "recovered": False, **r, "model": self.name, "family": FAMILY, "bits": None,
                          "method": method, "ratio": float(ratio), **tags} for r in point)

    def ce(self, recipe: str) -> list[dict[str, Any]]:
        s, session = self.settings, self.session

        def measure(model: nn.Module, bench: Any) -> list[dict[str, Any]]:
            rows = ce_rows(model, session.tokenizer, s.eval_data, s.seqlen, s.max_eval_windows, s.device)
            if Recipe.parse(recipe):  # a pruned model's sizes are its recipe point's step report
                return rows
            # the dense model has no step report: its size is counted here
            return [{**r, "param_reduction": 0.0, "block_reduction": 0.0, "n_params": count_params(model)} for r in rows]

        return session.measure(recipe, self.protocol, "ce", s.ce_settings(), measure)

    def downstream(self, recipe: str) -> list[dict[str, Any]]:
        rows = downstream_point(self.session, self.protocol, recipe, self.settings.downstream_settings())
        return [r for r in rows if r.get("level", "task") == "task"]

    def rft(self, recipe: str, tokens: int) -> list[dict[str, Any]]:
        s, session = self.settings, self.session

        def measure(model: nn.Module, bench: Any) -> list[dict[str, Any]]:
            info = lora_rft(model, session.tokenizer, int(tokens), s.calib_data, seed=s.seed, device=s.device,
                            **{k: v for k, v in s.rft.items() if k != "epochs"})
            self.say(f"{self.name} {recipe} D={tokens}: train loss {info['train_loss_before']:.3f} -> "
                     f"{info['train_loss_after']:.3f} in {info['rft_seconds']:.0f} s")
            # every stored row's kind is "rft": what each one scores is kept as `measured`
            out = [{**r, "measured": "ce"} for r in ce_rows(model, session.tokenizer, s.eval_data, s.seqlen,
                                                          s.max_eval_windows, s.device)]
            out += [{**r, "measured": "downstream"} for r in (_downstream(model, session.tokenizer, s) if s.tasks
                                                              else [])]
            return [{**r, **info} for r in out]

        return session.measure(recipe, self.protocol, "rft", s.rft_settings(tokens), measure)

    def dense_points(self) -> dict[str, Any]:
        point = self.ce("dense")
        size = {k: point[0][k] for k in SIZES}
        self.add(point, "dense", 0.0)
        if self.settings.ratios and self.settings.tasks:
            self.add([{**r, **size} for r in self.downstream("dense")], "dense", 0.0)
        return size

    def supported(self, method: str) -> bool:
        """Checks the architecture when the model is loaded, or is about to be: a method whose first
        recipe point is stored was supported when it was computed, so a finished grid loads nothing."""
        first = recipe_of(method, self.settings.all_ratios[0]) if self.settings.all_ratios else None
        stored = first is not None and self.session.require_store().has(point_config(self.protocol, first))
        why = None if stored and not self.session.is_loaded else unsupported(method, self.session.dense)
        if why:
            self.say(f"{self.name}: {method} skipped: {why}")
        return why is None

    def method_points(self, method: str) -> None:
        s = self.settings
        rft_ratios = s.ratios if s.rft_ratios is None else s.rft_ratios
        if s.rft_models is not None and self.name not in s.rft_models:
            rft_ratios = []
        for ratio in s.all_ratios:
            recipe = recipe_of(method, ratio)
            measured = step_sizes(self.session.point(recipe, self.protocol))
            size = {k: measured[k] for k in (*SIZES, "prune_seconds")}
            self.add([{**r, **size} for r in self.ce(recipe)], method, ratio)
            size.pop("prune_seconds")
            if ratio in s.ratios and s.tasks:
                self.add([{**r, **size} for r in self.downstream(recipe)], method, ratio)
            for tokens in (s.tokens if ratio in rft_ratios else []):
                # each row carries the tokens actually trained on (its windows' tokens) as D
                self.add([{**r, **size, "kind": r["measured"]} for r in self.rft(recipe, tokens)], method, ratio,
                         recovered=True)
        if s.speed_ratios:
            self.rows.extend({**r, "model": self.name, "family": FAMILY, "bits": None, "method": method, "kind": "speed",
                              "tokens": 0, "recovered": False} for r in self.speed(method))

    def speed(self, method: str) -> list[dict[str, Any]]:
        """Prefill tokens/s of the dense model and the method's model at every speed ratio, interleaved
        in one measurement, stored as one point (its key: the protocol, each recipe's steps, the timing)."""
        s, session = self.settings, self.session
        recipes = {float(r): recipe_of(method, r) for r in sorted(s.speed_ratios)}
        cfg = {k: v for k, v in self.protocol.config().items() if k not in ("data", "max_windows", "divergence_k")}
        cfg.update(family=FAMILY, method="law_speed", kind="speed", ratio=None, device=s.device,
                   points=list(recipes.values()), steps=[Recipe.parse(r).key()["steps"][0] for r in recipes.values()],
                   registry_method=[method], speed=dict(s.speed), mode="prefill")

        def compute() -> list[dict[str, Any]]:
            from mpt_utils.eval.speed import measure_speed

            bench = session.bench(self.protocol)
            named = {"dense": bench.loaded.model,
                     **{f"r={r:g}": bench.compressed_model(Recipe.parse(text))[0] for r, text in recipes.items()}}
            results = measure_speed(named, mode="prefill", device=s.device, seed=s.seed, **s.speed)
            ratio_of = {"dense": 0.0, **{f"r={r:g}": r for r in recipes}}
            return [{"metric": "speedup", "value": res.speedup, "ratio": ratio_of[res.name],
                     "tokens_per_s": res.tokens_per_s, "spread": res.spread, "n_params": res.n_params,
                     "speed_device": res.device, "speed_seqlen": res.seqlen} for res in results]

        return session.require_store().get_or_compute(cfg, compute)


ModelSource = LoadedModel | Session | Callable[[], Any]


def _session(name: str, source: ModelSource, store: ResultsStore, settings: LawSettings) -> Session:
    if isinstance(source, Session):
        return source
    if callable(source):
        return Session(name, store, device=settings.device, loader=source)
    return Session(name, store, device=settings.device, loaded=source)


def law_sweep(models: Mapping[str, ModelSource], store: ResultsStore, settings: LawSettings,
              methods: list[str] | tuple[str, ...] = METHODS, log: Callable[[str], None] | None = print
              ) -> pd.DataFrame:
    """Run (or read back) the whole grid; returns every row with `model`, `method`, `ratio`, `tokens`
    (0 = no RFT), `recovered`, `kind` and the sizes (`param_reduction`, `block_reduction`, `n_params`).
    `models`: name -> a loaded model (`load_models`), a loader returning one (called only when a point
    is missing) or a `Session`. Methods a model cannot take are logged and skipped."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise MPTError(f"unknown compression-law methods {unknown}", f"use any of {METHODS}")
    for method in methods:  # every recipe reads before any model is loaded
        for ratio in settings.all_ratios:
            recipe_of(method, ratio)
    say = log or (lambda _msg: None)
    rows: list[dict[str, Any]] = []
    for name, source in models.items():
        grid = _ModelGrid(name, _session(name, source, store, settings), settings, say)
        grid.dense_points()
        for method in methods:
            if grid.supported(method):
                grid.method_points(method)
        rows += grid.rows
    return pd.DataFrame(rows)


__all__ = ["FAMILY", "METHODS", "LawSettings", "law_sweep", "recipe_of", "unsupported"]
