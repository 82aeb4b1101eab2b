"""Notebook 03's torch quantization points as recipes, and their rows as the notebook's tables read them.

Every point is a recipe (`mpt_utils.recipe`, e.g. `rtn:4bit`, `gptq:3bit/g64`, `rtn:4bit[sym=true]`,
`smoothquant:8bit`, `nf4:4bit`) measured by `Session.point/sweep` on a `combined.grid.GridSetup`
protocol: one engine, one store key (canonical recipe, protocol, each step's algorithm version).
`quant_recipes` writes the notebook's list, `quant_rows` turns the recipe points' rows into one
`method` / `bits` / `scheme` point each, with the quantization metrics its tables read.

`Setup` (the protocol's fields, family "quant" keys) and `Workbench` (a protocol on a `Session`)
remain as the bases of `GridSetup` / `GridBench` and the GGUF ladder's bench.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from mpt_utils.eval.divergence import DEFAULT_K as DIVERGENCE_K
from mpt_utils.session import Session

FAMILY = "quant"


@dataclass(frozen=True)
class Setup:
    """The protocol shared by every point of a sweep (part of each point's config)."""

    model: str
    eval_data: str
    calib_data: str
    seqlen: int = 512
    n_calib: int = 16
    max_windows: int | None = None
    seed: int = 0
    device: str | None = None

    @property
    def calib_len(self) -> int:
        """The calibration windows' length in tokens (`GridSetup` may calibrate on shorter ones)."""
        return self.seqlen

    def config(self) -> dict:
        return {"model": self.model, "family": FAMILY, "data": self.eval_data, "calib_data": self.calib_data,
                "seqlen": self.seqlen, "n_calib": self.n_calib, "max_windows": self.max_windows,
                "seed": self.seed, "divergence_k": DIVERGENCE_K}


class Workbench:
    """A quantization protocol (`Setup`) on a `Session` (`mpt_utils.session`): the session's lazily
    loaded dense model, its evaluation ids, calibration windows, dense statistics and paired evaluator
    for this protocol. `loader`: how the session loads the model when none is given."""

    def __init__(self, setup: Setup, loader: Callable | None = None, *, session: Session | None = None):
        self.setup = setup
        self.session = session or Session(setup.model, device=setup.device, loader=loader)

    @property
    def loaded(self):
        return self.session.loaded

    def eval_ids(self) -> torch.Tensor:
        return self.session.eval_ids(self.setup.eval_data)

    def calib_ids(self) -> torch.Tensor:
        s = self.setup
        return self.session.calib_ids(s.calib_data, s.n_calib, s.calib_len, s.seed)

    def dense_stats(self):
        """Every block linear's input statistics on the dense model, gathered once by the shared
        engine (AWQ's scale search and llama.cpp's importance matrix both read dense inputs)."""
        s = self.setup
        return self.session.dense_stats(s.calib_data, s.n_calib, s.calib_len, s.seed)

    def paired(self, store_root=None):
        """The evaluator of every point: perplexity and KL to the dense model on the same windows
        (`mpt_utils.eval.paired`); the dense reference is cached under `store_root` when given."""
        paired = self.session.paired(self.setup.seqlen, self.setup.max_windows)
        if store_root is not None and paired.store_root is None:
            paired.store_root = store_root
        return paired

    def fresh_model(self) -> torch.nn.Module:
        return self.session.fresh_model()


def scheme_label(method: str, bits: int, group_size: int | None, sym: bool) -> str:
    from mpt_utils.catalogue import method_info

    if method == "smoothquant":
        return "SmoothQuant W8A8"
    info = method_info(method)
    if info.traits.get("fixed_bits") is not None:  # a named format: its name says it all
        return info.display if group_size is None else f"{info.display} g{group_size}"
    g = "ch" if group_size is None else f"g{group_size}"
    return f"{method.upper()} w{bits} {g} {'sym' if sym else 'asym'}"


# -- notebook 03's points as recipes -------------------------------------------------------------------
DENSE_BITS = 16  # the FP16 reference every compression is counted against
# the point's compression-axis rows that the notebook's tables read, under their old names
SIZE_METRIC = "nominal_bytes"
COMPRESSION_METRIC = "compression_nominal"


def _defaults(method: str) -> dict[str, Any]:
    from mpt_utils.quant import QUANTIZERS

    params = inspect.signature(QUANTIZERS.get(method)).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def quant_step(method: str, bits: int | None = None, *, group_size: int | None = 128, sym: bool = False,
               options: Mapping[str, Any] | None = None) -> Any:
    """The recipe step (`recipe.Step`) of one torch quantizer point. `bits=None`: a fixed format (NF4,
    FP4, LLM.int8()) at its own width, block size and symmetry (`group_size` and `sym` are then not
    read). The group size (None or 0: per output row), `sym` and options are written only where they
    differ from the method's defaults, so the step is the one the planner and the grid notebooks write
    (`gptq:4bit` is GPTQ's g128 asymmetric point) and all of them find the same stored point."""
    from mpt_utils.catalogue import method_info
    from mpt_utils.errors import MPTError
    from mpt_utils.quant.rtn import normalize_group_size
    from mpt_utils.recipe import Bits, Step

    defaults = _defaults(method)
    if bits is None:
        bits = method_info(method).traits.get("fixed_bits")
        if bits is None:
            raise MPTError(f"{method!r} is not a fixed-width quantizer",
                           "give it a bit width, or list it with the bit-width methods")
        group_size, sym = defaults.get("group_size"), defaults.get("sym", sym)
    group, default_group = normalize_group_size(group_size), normalize_group_size(defaults.get("group_size"))
    setting = Bits(int(bits), None if group == default_group else (group or 0))
    opts = {k: v for k, v in (options or {}).items() if k not in defaults or defaults[k] != v}
    if sym != defaults.get("sym"):
        opts["sym"] = bool(sym)
    return Step.of(method, setting, **opts)


def quant_recipes(methods: Iterable[str], bits_list: Iterable[int], *, group_size: int | None = 128,
                  sym: bool = False, extra_bits: Mapping[str, Iterable[int]] | None = None,
                  smoothquant_alpha: float | None = 0.85, fixed_width: Iterable[str] = (),
                  options: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """Notebook 03's recipes, in table order: every method at every width of `bits_list` and then of
    `extra_bits[method]` (RTN's extra widths for eq. 5), at `group_size` / `sym`; SmoothQuant W8A8 at
    `smoothquant_alpha` (None: left out; 0.85 is the SmoothQuant reference's Llama-2 setting, its
    quantizer's default); each `fixed_width` format once at its own width. `options`: per method."""
    from mpt_utils.recipe import Recipe

    options = options or {}
    steps = []
    for method in methods:
        widths = dict.fromkeys([*bits_list, *(extra_bits or {}).get(method, ())])
        steps += [quant_step(method, b, group_size=group_size, sym=sym, options=options.get(method)) for b in widths]
    if smoothquant_alpha is not None:
        sq = {**options.get("smoothquant", {}), "alpha": smoothquant_alpha}
        steps.append(quant_step("smoothquant", 8, group_size=None, sym=True, options=sq))
    steps += [quant_step(method, options=options.get(method)) for method in fixed_width]
    return list(dict.fromkeys(str(Recipe((step,))) for step in steps))


def quant_rows(rows: pd.DataFrame | Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The rows of dense and single torch-quantizer recipe points (`Session.point/sweep`) as notebook
    03's tables and figures read them: per point its scored rows (PPL ± SE, KL ± SE, same-top-1 ...)
    and `bits_per_weight` (the quantized linears' storage, scales and zero points included: the step's
    `quant.size.storage`; dense: 16), `size_gb` (the point's nominal bytes, `combined.sizes`),
    `compression` (its nominal compression against FP16), `quant_seconds` (the step's wall time) and,
    where the method reports them, `gptq_obs_loss` and `awq_mean_ratio`. Every row carries `method`
    ("dense" or the quantizer), `bits` (nominal; dense 16), `scheme` (`scheme_label`), `ratio` (the
    compression), `group_size`, `sym`, `act_bits` and the point's `recipe` and `config_hash`."""
    from mpt_utils.combined.grid import step_reports
    from mpt_utils.errors import MPTError
    from mpt_utils.recipe import Recipe

    df = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if df.empty:
        return df
    key = "config_hash" if "config_hash" in df.columns else "recipe"
    out: list[dict[str, Any]] = []
    for _, point in df.groupby(key, sort=False):
        recipe = Recipe.parse(point["recipe"].iloc[0])
        if len(recipe) > 1 or any(step.family != "quant" for step in recipe):
            raise MPTError(f"{recipe} is not a dense or single torch quantization point",
                           "pass the rows of session.dense_point(...) and session.sweep(quant_recipes(...), ...)")
        metric = point.drop_duplicates("metric").set_index("metric")["value"]
        tag: dict[str, Any] = {"recipe": str(recipe), "ratio": float(metric[COMPRESSION_METRIC])}
        derived = {"size_gb": float(metric[SIZE_METRIC]) / 1e9, "compression": tag["ratio"]}
        if len(recipe) == 0:
            tag.update(method="dense", bits=DENSE_BITS, scheme="FP16 (dense)", group_size=None, sym=None,
                       act_bits=None)
            derived["bits_per_weight"] = float(DENSE_BITS)
        else:
            report = step_reports(point.to_dict("records"))[0]
            seconds = report["seconds"]
            method, group, sym = recipe[0].method, report["group_size"], bool(report["sym"])
            tag.update(method=method, bits=int(report["bits"]), group_size=group, sym=sym,
                       scheme=scheme_label(method, int(report["bits"]), group, sym), act_bits=report.get("act_bits"))
            derived.update(bits_per_weight=float(report["bits_per_weight"]), quant_seconds=seconds)
            extra = report.get("extra") or {}
            for name, field in (("gptq_obs_loss", "obs_loss"), ("awq_mean_ratio", "mean_ratio")):
                if field in extra:
                    derived[name] = float(extra[field])
        base = {c: point[c].iloc[0] for c in ("model", "family", "seed", "config_hash") if c in point.columns}
        scored = point[point["data"].notna()] if "data" in point.columns else point.iloc[0:0]
        out += [{**r, **tag} for r in scored.to_dict("records")]
        out += [{**base, "metric": name, "value": value, **tag} for name, value in derived.items()
                if value is not None and not (isinstance(value, float) and math.isnan(value))]
    return pd.DataFrame(out)


__all__ = ["Setup", "Workbench", "quant_recipes", "quant_rows", "quant_step", "scheme_label"]
