"""Magnitude pruning: drop the smallest |W| of each layer (the classic data-free baseline)."""

from __future__ import annotations

import torch

from mpt_utils.prune import PRUNERS
from mpt_utils.prune.masks import Pattern, apply_mask, select_mask


@PRUNERS.register("magnitude", version=1, display="Magnitude", calibration=False)
def magnitude(weight: torch.Tensor, stats, sparsity: float, pattern: Pattern | None = None,
              *, scope: str = "layer", name: str = "", cache: dict | None = None) -> torch.Tensor:
    """Zero the `sparsity` fraction of smallest-magnitude weights, compared across the whole layer
    (as in the Wanda/SparseGPT baselines), or the N smallest of every M for a pattern."""
    return apply_mask(weight, select_mask(weight.abs().float(), sparsity, pattern, scope))
