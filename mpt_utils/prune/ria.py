"""RIA (Zhang et al. 2024, "Plug-and-Play"): relative importance × activation.

score_ij = (|W_ij| / Σ_i |W_ij| + |W_ij| / Σ_j |W_ij|) · ‖X_j‖₂^a, with a = 0.5: a weight counts in
proportion to its share of both its input channel and its output row, so no channel is emptied.
Compared across the whole layer by default (the released code's default; `scope="row"` is Wanda's).
The optional channel permutation for N:M is not part of this reproduction.
"""

from __future__ import annotations

import torch

from mpt_utils.calibration import LayerStats
from mpt_utils.prune import PRUNERS
from mpt_utils.prune.masks import Pattern, apply_mask, select_mask


def ria_scores(weight: torch.Tensor, stats: LayerStats, a: float = 0.5) -> torch.Tensor:
    w = weight.abs().float()
    eps = torch.finfo(w.dtype).tiny  # an all-zero row/column has relative importance 0, not NaN
    relative = w / w.sum(dim=0, keepdim=True).clamp_min(eps) + w / w.sum(dim=1, keepdim=True).clamp_min(eps)
    act = stats.sq_norm.to(weight.device).sqrt().pow(a)
    return relative * act.unsqueeze(0)


@PRUNERS.register("ria", version=1, display="RIA", calibration=True)
def ria(weight: torch.Tensor, stats: LayerStats, sparsity: float, pattern: Pattern | None = None,
        *, a: float = 0.5, scope: str = "layer", name: str = "", cache: dict | None = None
        ) -> torch.Tensor:
    return apply_mask(weight, select_mask(ria_scores(weight, stats, a), sparsity, pattern, scope))
