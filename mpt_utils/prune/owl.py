"""OWL (Yin et al. 2024): outlier-weighted layerwise sparsity, wrapping Wanda or SparseGPT.

Blocks whose Wanda scores |W_ij|·‖X_j‖₂ hold more outliers (scores above M × the block's mean: the
layerwise outlier distribution, LOD) keep more weights. The LODs are mapped linearly onto
[S − λ, S + λ] (fewer outliers, more sparsity) and shifted so the block sparsities average exactly
to the target S; every block is then pruned by the base method at its own sparsity. The LOD comes
from the dense model's statistics, as in the released code. Defaults M = 5, λ = 0.08 (LLaMA).
A per-block ratio cannot keep a uniform N:M pattern, so OWL is unstructured only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mpt_utils.calibration import LayerStats
from mpt_utils.errors import MPTError
from mpt_utils.prune import PRUNERS, get_method
from mpt_utils.prune.masks import Pattern
from mpt_utils.prune.wanda import wanda_scores

BASES = ("wanda", "sparsegpt")


def outlier_ratio(weights: dict[str, torch.Tensor], stats: dict[str, LayerStats], m: float = 5.0) -> float:
    """LOD of one block: the fraction of Wanda scores of all its linears above m × their mean."""
    scores = torch.cat([wanda_scores(w, stats[name]).flatten() for name, w in weights.items()])
    return float((scores > m * scores.mean()).float().mean())


def owl_sparsities(lods: Sequence[float], sparsity: float, lam: float = 0.08) -> list[float]:
    """Per-block sparsities: LODs rescaled to a 2λ range, averaging to `sparsity`. Near 0 or 1 the
    range is narrowed (λ reduced) just enough that every block stays in [0, 1)."""
    lod = torch.tensor(list(lods), dtype=torch.float64)
    spread = float(lod.max() - lod.min())
    unit = (lod - lod.min()) / spread * 2 if spread > 0 else torch.zeros_like(lod)  # in [0, 2]
    c = float(unit.mean())
    limits = [lam]
    if c < 2:
        limits.append(sparsity / (2 - c))
    if c > 0:
        limits.append((1 - sparsity) / c * (1 - 1e-6))
    lam_eff = max(0.0, min(limits))
    ratios = sparsity + lam_eff * (c - unit)  # more outliers, more density, less sparsity
    return [min(max(float(r), 0.0), 1.0 - 1e-9) for r in ratios]


class OWLAllocation:
    """Per-block sparsities for the engine: score each block from dense stats, then allocate."""

    def block_score(self, weights: dict[str, torch.Tensor], stats: dict[str, LayerStats], *,
                    m: float = 5.0, **_) -> float:
        return outlier_ratio(weights, stats, m)

    def ratios(self, scores: Sequence[float], sparsity: float, *, lam: float = 0.08, **_) -> list[float]:
        return owl_sparsities(scores, sparsity, lam)


# the papers name each pairing of OWL's allocation with its base method
@PRUNERS.register("owl", version=1, display="OWL", calibration=True, supports_nm=False, allocate=OWLAllocation(),
                  paper_name={"wanda": "Wanda_owl", "sparsegpt": "SparseGPT_owl"})
def owl(weight: torch.Tensor, stats: LayerStats, sparsity: float, pattern: Pattern | None = None,
        *, base: str = "wanda", **opts) -> torch.Tensor:
    """Prune one layer with the base method at the block's OWL sparsity (given by the engine)."""
    if base not in BASES:
        raise MPTError(f"OWL wraps {BASES}, not {base!r}", "pass base='wanda' or base='sparsegpt'")
    opts = {k: v for k, v in opts.items() if k not in ("m", "lam")}
    return get_method(base).fn(weight, stats, sparsity, pattern, **opts)
