"""Pruning family: unstructured and semi-structured (N:M) methods behind one registry.

Every method is one module exposing one layer-level function, registered by name:

    fn(weight: Tensor[out, in], stats: LayerStats | None, sparsity: float, pattern: (N, M) | None,
       *, name: str = "", cache: dict | None = None, **opts) -> Tensor  (new weight, zeros where pruned)

`stats` are the layer's calibration input statistics (mpt_utils.calibration.LayerStats); `cache`
is a per-layer dict that lives across a sparsity sweep, where a method keeps what does not depend on
the ratio (SparseGPT's inverse-Hessian factor, ADMM's regularised inverse). The driver
(`prune_model`) applies a method to every linear layer of every decoder block.

This module stays import-light (no method is imported until one is asked for), so the structured
pruning subpackage `mpt_utils.prune.structured` can live next to it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mpt_utils.registry import Registry

METHOD_MODULES = ("magnitude", "wanda", "sparsegpt", "ria", "admm", "owl", "dsnot")


@dataclass(frozen=True)
class PruneMethod:
    """A registered method. `allocate` (OWL) turns dense block statistics into per-block sparsities."""

    name: str
    fn: Callable[..., Any]
    needs_stats: bool = True  # magnitude needs no calibration data
    updates_weights: bool = False  # SparseGPT/ADMM reconstruct the kept weights, the others only mask
    supports_nm: bool = True
    allocate: Any = None  # mpt_utils.prune.owl.Allocation-like object, or None for uniform sparsity

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


PRUNERS: Registry = Registry("pruning method")


def register(name: str, **traits: Any) -> Callable[[Callable], Callable]:
    """Decorator: register a layer-level pruning function under `name` with its traits."""

    def deco(fn: Callable) -> Callable:
        PRUNERS.register(name)(PruneMethod(name, fn, **traits))
        return fn

    return deco


def load_methods() -> None:
    for module in METHOD_MODULES:
        importlib.import_module(f"mpt_utils.prune.{module}")


def get_method(name: str) -> PruneMethod:
    """The registered method `name` (an MPTError lists the available ones)."""
    load_methods()
    return PRUNERS.get(name)


def method_names() -> list[str]:
    load_methods()
    return PRUNERS.names()


def prune_model(model, method: str, sparsity: float | None = None, calib_ids=None, stats=None,
                pattern=None, **kwargs):
    """Prune every decoder linear of `model` in place; see mpt_utils.prune.engine.prune_model."""
    from mpt_utils.prune.engine import prune_model as _prune_model

    return _prune_model(model, method, sparsity, calib_ids=calib_ids, stats=stats, pattern=pattern, **kwargs)


def __getattr__(attr: str):  # lazy access to the sweep runner without importing it up front
    if attr in ("PruneSession", "sweep_points"):
        from mpt_utils.prune import sweep

        return getattr(sweep, attr)
    raise AttributeError(attr)
