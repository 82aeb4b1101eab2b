"""Low-rank decomposition: each decoder linear becomes two smaller linears (parameters and FLOPs
really shrink). Methods, by registry name:

- `svd`: plain truncated SVD of the weight (no data).
- `asvd`: activation-aware scaling + sensitivity-based rank allocation (ASVD).
- `svd_llm`: truncation-aware whitening by the Cholesky factor of XᵀX, then the parameter update
  (LoRA on U then V by default, as the reference; `update="none"` is whitening only).
- `modegpt`: modular decomposition of each block (Nyström MLP, CR key-query, SVD value-output) with
  the entropic per-layer sparsity allocation; training-free.
- `lillama`: SVD initialisation, then each compressed block distilled locally onto the dense one.
- `losparse`: U·V plus a row-sparse S, S pruned on a cubic schedule while fine-tuning.

Every method has one entry point with the shared signature
`plan = LOWRANK.get(name)(model, calib_ids=None, *, stats=None, device=None, layer_filter=None,
progress=True, **options)`, which does the ratio-independent work once; then
`plan.apply(model, ratio)` (in place, returns a `LowRankReport`) or `with plan.swapped(model, ratio)`.
`ratio` is the parameter reduction of the decomposed linears (Table 7's axis).
"""

from __future__ import annotations

import torch
from torch import nn

from mpt_utils.errors import MPTError
from mpt_utils.lowrank.factorized import (
    Factorization,
    LowRankLinear,
    LowRankPlan,
    LowRankReport,
    breakeven_rank,
)
from mpt_utils.lowrank.ranks import check_lowrank_ratio, rank_for_ratio
from mpt_utils.registry import Registry

# what callers pass besides a method's options (the sweep fills these in itself)
ENGINE_ARGS = ("model", "calib_ids", "stats", "device", "progress")
# Every module of this package is imported on first lookup; each method module registers itself with
# `@LOWRANK.register(name, version=, display=, calibration=, mode=)`, mode I (weight-dominant) or
# II (activation-centric) as the Perspective groups them.
LOWRANK: Registry = Registry("low-rank method", ENGINE_ARGS, family="lowrank", package=__name__,
                             modes=("I", "II"))


def prepare(model: nn.Module, method: str, calib_ids: torch.Tensor | None = None, **options) -> LowRankPlan:
    """The ratio-independent part of `method` (SVDs, ASVD's sensitivity search), reusable for a sweep."""
    fn = LOWRANK.get(method)
    LOWRANK.check_options(method, {k: v for k, v in options.items() if k not in ENGINE_ARGS})
    if LOWRANK.info(method).calibration and calib_ids is None and options.get("stats") is None:
        raise MPTError(f"{method} needs calibration data",
                       "pass calib_ids=calibration_windows(tokenizer, ...) or stats from collect_stats")
    return fn(model, calib_ids, **options)


def decompose(model: nn.Module, method: str, ratio: float, calib_ids: torch.Tensor | None = None,
              **options) -> LowRankReport:
    """Decompose `model` in place at parameter reduction `ratio` with `method`; returns the measured report."""
    ratio = check_lowrank_ratio(ratio)
    return prepare(model, method, calib_ids, **options).apply(model, ratio)


__all__ = ["LOWRANK", "Factorization", "LowRankLinear", "LowRankPlan", "LowRankReport",
           "breakeven_rank", "check_lowrank_ratio", "decompose", "prepare", "rank_for_ratio"]
