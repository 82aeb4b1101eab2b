"""Wanda (Sun et al. 2023): prune by |W_ij| · ‖X_j‖₂, compared within each output row, no update."""

from __future__ import annotations

import torch

from mpt_utils.calibration import LayerStats
from mpt_utils.prune import PRUNERS
from mpt_utils.prune.masks import Pattern, apply_mask, select_mask


def wanda_scores(weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """|W| scaled by the L2 norm of each input feature over the calibration tokens."""
    return weight.abs().float() * stats.sq_norm.to(weight.device).sqrt().unsqueeze(0)


@PRUNERS.register("wanda", version=1, display="Wanda", calibration=True)
def wanda(weight: torch.Tensor, stats: LayerStats, sparsity: float, pattern: Pattern | None = None,
          *, scope: str = "row", name: str = "", cache: dict | None = None) -> torch.Tensor:
    """Zero the lowest-scoring `sparsity` fraction of every row (or N of every M inputs)."""
    return apply_mask(weight, select_mask(wanda_scores(weight, stats), sparsity, pattern, scope))
