"""Pruning family: unstructured and semi-structured (N:M) methods behind one registry.

Every method is one module of this package exposing one layer-level function, registered by name:

    fn(weight: Tensor[out, in], stats: LayerStats | None, sparsity: float, pattern: (N, M) | None,
       *, name: str = "", cache: dict | None = None, <options>) -> Tensor  (new weight, zeros where pruned)

`stats` are the layer's calibration input statistics (mpt_utils.calibration.LayerStats); `cache`
is a per-layer dict that lives across a sparsity sweep, where a method keeps what does not depend on
the ratio (SparseGPT's inverse-Hessian factor, ADMM's regularised inverse). The driver
(`prune_model`) applies a method to every linear layer of every decoder block.

This module stays import-light (no method is imported until one is asked for), so the structured
pruning subpackage `mpt_utils.prune.structured` can live next to it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mpt_utils.catalogue import MethodInfo
from mpt_utils.registry import Registry, check_options


@dataclass(frozen=True)
class PruneMethod:
    """A registered method. `allocate` (OWL) turns dense block statistics into per-block sparsities."""

    name: str
    fn: Callable[..., Any]
    calibration: bool = True  # magnitude needs no calibration data
    updates_weights: bool = False  # SparseGPT/ADMM reconstruct the kept weights, the others only mask
    supports_nm: bool = True
    allocate: Any = None  # mpt_utils.prune.owl.Allocation-like object, or None for uniform sparsity
    block_level: bool = False  # BESA: fn prunes a whole block from its inputs and outputs (ENGINE_ARGS)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def _method(info: MethodInfo, fn: Callable) -> PruneMethod:
    return PruneMethod(info.name, fn, info.calibration, **info.traits)


# what the engine passes to every layer-level function itself (never user options); a block-level
# method (trait block_level=True) is called fn(block, stats, sparsity, pattern, *, io, name, cache, ...)
# with the block's linears' stats and its calibration inputs/outputs (mpt_utils.calibration.BlockIO)
ENGINE_ARGS = ("weight", "stats", "sparsity", "pattern", "name", "cache", "block", "io")
# Every module of this package is imported on first lookup; each method module registers itself with
# `@PRUNERS.register(name, version=, display=, calibration=, <traits below>)`.
PRUNERS: Registry[PruneMethod] = Registry(
    "pruning method", ENGINE_ARGS, family="prune", package=__name__, wrap=_method,
    traits={"updates_weights": False, "supports_nm": True, "allocate": None, "block_level": False})


def get_method(name: str) -> PruneMethod:
    """The registered method `name` (an MPTError lists the available ones)."""
    return PRUNERS.get(name)


def _keyword_params(fn: Callable, kinds=(inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                         inspect.Parameter.KEYWORD_ONLY)) -> set[str]:
    return {p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds} - set(ENGINE_ARGS)


def method_options(name: str, base: str | None = None) -> set[str]:
    """The options method `name` accepts: its own keyword parameters, those of its per-block
    allocation (OWL's m, lam) and, for a method wrapping a `base` method (OWL), the base's."""
    spec = get_method(name)
    valid = _keyword_params(spec.fn)
    if spec.allocate is not None:
        for hook in (spec.allocate.block_score, spec.allocate.ratios):
            valid |= _keyword_params(hook, (inspect.Parameter.KEYWORD_ONLY,))
    params = inspect.signature(spec.fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()) and "base" in params:
        valid |= method_options(base or params["base"].default)  # the rest goes to the base method
    return valid


def check_method_options(name: str, opts: Mapping[str, Any]) -> None:
    """MPTError naming the closest valid option when `opts` holds one method `name` does not take."""
    base = opts.get("base")
    known_base = base if isinstance(base, str) and base in method_names() else None
    label = f"{name}:{base}" if base else name
    check_options(f"pruning method {label!r}", opts, method_options(name, known_base))


def method_names() -> list[str]:
    return PRUNERS.names()


def prune_model(model, method: str, sparsity: float | None = None, calib_ids=None, stats=None,
                pattern=None, **kwargs):
    """Prune every decoder linear of `model` in place; see mpt_utils.prune.engine.prune_model."""
    from mpt_utils.prune.engine import prune_model as _prune_model

    return _prune_model(model, method, sparsity, calib_ids=calib_ids, stats=stats, pattern=pattern, **kwargs)


def __getattr__(attr: str):  # lazy access to the sweep helpers without importing them up front
    if attr in ("prune_recipes", "point_rows", "dense_shortcut_point", "compare_modes"):
        from mpt_utils.prune import sweep

        return getattr(sweep, attr)
    raise AttributeError(attr)
