"""Quantization sweeps into the results store: one resumable point per (method, bits, options).

The dense model is loaded at most once, and only when some point is not yet stored; every point
quantizes a fresh copy of it, measures perplexity with the torch evaluator on the protocol's
windows and the storage its format would take. Rows are tidy (metric, value) with the config's
model / method / family="quant" / bits / seed, and `ratio` = compression against FP16.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import pandas as pd
import torch

from mpt_utils.eval.divergence import DEFAULT_K as DIVERGENCE_K
from mpt_utils.session import Session
from mpt_utils.store import ResultsStore

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
        return self.session.calib_ids(s.calib_data, s.n_calib, s.seqlen, s.seed)

    def dense_stats(self):
        """Every block linear's input statistics on the dense model, gathered once by the shared
        engine (AWQ's scale search and llama.cpp's importance matrix both read dense inputs)."""
        s = self.setup
        return self.session.dense_stats(s.calib_data, s.n_calib, s.seqlen, s.seed)

    def paired(self, store_root=None):
        """The evaluator of every point: perplexity and KL to the dense model on the same windows
        (`mpt_utils.eval.paired`); the dense reference is cached under `store_root` when given."""
        paired = self.session.paired(self.setup.seqlen, self.setup.max_windows)
        if store_root is not None and paired.store_root is None:
            paired.store_root = store_root
        return paired

    def fresh_model(self) -> torch.nn.Module:
        return self.session.fresh_model()


def _ppl_rows(model: torch.nn.Module, bench: Workbench, store: ResultsStore, progress: bool) -> list[dict]:
    """Perplexity (with its standard error) and the paired divergence from the dense model."""
    paired = bench.paired(store.root)
    paired.prepare(bench.loaded.model, [bench.setup.eval_data], progress)
    return paired.rows(model, [bench.setup.eval_data], progress)


def dense_point(store: ResultsStore, bench: Workbench, progress: bool = True) -> list[dict]:
    """The 16-bit reference of every quantization curve: dense PPL and the FP16 size."""
    cfg = {**bench.setup.config(), "method": "dense", "bits": 16}

    def compute():
        model = bench.loaded.model
        n_params = sum(p.numel() for p in model.parameters())
        ppl = _ppl_rows(model, bench, store, progress)
        extra = {"scheme": "FP16 (dense)", "ratio": 0.0}
        return [*({**r, **extra} for r in ppl), {"metric": "size_gb", "value": n_params * 2 / 1e9, **extra},
                {"metric": "bits_per_weight", "value": 16.0, **extra}]

    return store.get_or_compute(cfg, compute)


def scheme_label(method: str, bits: int, group_size: int | None, sym: bool) -> str:
    from mpt_utils.catalogue import method_info

    if method == "smoothquant":
        return "SmoothQuant W8A8"
    info = method_info(method)
    if info.traits.get("fixed_bits") is not None:  # a named format: its name says it all
        return info.display if group_size is None else f"{info.display} g{group_size}"
    g = "ch" if group_size is None else f"g{group_size}"
    return f"{method.upper()} w{bits} {g} {'sym' if sym else 'asym'}"


def quant_point(store: ResultsStore, bench: Workbench, method: str, bits: int, *, group_size: int | None = 128,
                sym: bool = False, options: dict | None = None, progress: bool = True) -> list[dict]:
    """Quantize a copy of the dense model with `method`, evaluate, store and return the rows."""
    from mpt_utils.quant import QUANTIZERS, quantize
    from mpt_utils.quant.size import storage

    options = dict(options or {})
    QUANTIZERS.check_options(method, options)  # a misspelled option fails before any model is loaded
    cfg = {**bench.setup.config(), "method": method, "bits": bits, "group_size": group_size, "sym": sym,
           "options": options}

    def compute():
        model = bench.fresh_model()
        calib = bench.calib_ids() if QUANTIZERS.info(method).calibration else None
        # only AWQ's per-linear objective can reuse dense statistics; its default re-runs the blocks
        shared = {"stats": bench.dense_stats()} if method == "awq" and options.get("objective") == "linear" else {}
        result = quantize(model, method, bits=bits, group_size=group_size, sym=sym, calib_ids=calib,
                          device=bench.setup.device, progress=progress, **options, **shared)
        size = storage(model, result.layers)
        ppl = _ppl_rows(model, bench, store, progress)
        del model
        extra = {"scheme": scheme_label(method, bits, group_size, sym), "ratio": size.ratio,
                 "group_size": group_size, "act_bits": result.act_bits}
        rows = [{**r, **extra} for r in ppl]
        for metric in ("size_gb", "bits_per_weight", "bits_per_param"):
            rows.append({"metric": metric, "value": getattr(size, metric), **extra})
        rows.append({"metric": "quant_seconds", "value": result.seconds, **extra})
        if "obs_loss" in result.extra:
            rows.append({"metric": "gptq_obs_loss", "value": result.extra["obs_loss"], **extra})
        if "mean_ratio" in result.extra:
            rows.append({"metric": "awq_mean_ratio", "value": result.extra["mean_ratio"], **extra})
        return rows

    return store.get_or_compute(cfg, compute)


def fixed_width_point(store: ResultsStore, bench: Workbench, method: str, *, options: dict | None = None,
                      progress: bool = True) -> list[dict]:
    """One point of a fixed-format method (NF4, FP4, LLM.int8()) at its own bit width, block size and
    symmetry (the defaults of its signature), whatever the sweep's integer-grid settings are."""
    from mpt_utils.catalogue import method_info
    from mpt_utils.errors import MPTError
    from mpt_utils.quant import QUANTIZERS

    bits = method_info(method).traits.get("fixed_bits")
    if method not in QUANTIZERS or bits is None:
        fixed = sorted(n for n in QUANTIZERS.names() if QUANTIZERS.info(n).traits.get("fixed_bits") is not None)
        raise MPTError(f"{method!r} is not a fixed-width quantizer", f"choose among {', '.join(fixed)}, or list "
                       "it with the bit-width methods")
    params = inspect.signature(QUANTIZERS.get(method)).parameters
    return quant_point(store, bench, method, bits, group_size=params["group_size"].default,
                       sym=params["sym"].default, options=options, progress=progress)


def sweep(store: ResultsStore, bench: Workbench, methods: Iterable[str], bits_list: Iterable[int], *,
          group_size: int | None = 128, sym: bool = False, options: dict[str, dict] | None = None,
          smoothquant_alpha: float | None = 0.85, fixed_width: Iterable[str] = (),
          progress: bool = True) -> pd.DataFrame:
    """Dense reference + every method at every bit width (+ SmoothQuant W8A8 if alpha is given; 0.85
    is the SmoothQuant reference's Llama-2 setting, its quantizer's default) + each `fixed_width`
    method once, in its own format (`fixed_width_point`)."""
    rows = list(dense_point(store, bench, progress))
    for method in methods:
        for bits in bits_list:
            rows += quant_point(store, bench, method, bits, group_size=group_size, sym=sym,
                                options=(options or {}).get(method), progress=progress)
    if smoothquant_alpha is not None:
        rows += quant_point(store, bench, "smoothquant", 8, group_size=None, sym=True,
                            options={"alpha": smoothquant_alpha}, progress=progress)
    for method in fixed_width:
        rows += fixed_width_point(store, bench, method, options=(options or {}).get(method), progress=progress)
    return pd.DataFrame(rows)


def wide(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per point: method, bits, scheme and one column per metric."""
    keys = [c for c in ("model", "method", "scheme", "bits") if c in rows.columns]
    return rows.pivot_table(index=keys, columns="metric", values="value", aggfunc="first").reset_index()


def setup_dict(setup: Setup) -> dict:
    return asdict(setup)
