"""SparseGPT (Frantar & Alistarh 2023): one-shot OBS pruning with the layer's inverse Hessian.

For the layer objective ‖WX − ŴX‖², H = 2XᵀX/n. Columns are visited left to right in lazy blocks
of 128; inside a block the mask is chosen adaptively from the OBS saliency w²/[H⁻¹]ᵢᵢ² (per block
for unstructured sparsity, per group of M for N:M), each pruned column's error is spread over the
not-yet-visited columns through the upper Cholesky factor of H⁻¹, and the block's accumulated error
updates the rest of the matrix at once. Dampening λ = 1% of mean(diag H) keeps H invertible.
"""

from __future__ import annotations

import torch

from mpt_utils.calibration import LayerStats
from mpt_utils.errors import MPTError
from mpt_utils.prune import PRUNERS
from mpt_utils.prune.masks import Pattern, check_nm_shape, layer_mask, nm_mask


def inverse_hessian_factor(stats: LayerStats, percdamp: float = 0.01, device: torch.device | None = None,
                           cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U is the upper Cholesky factor of (H + λI)⁻¹; dead marks never-active inputs.
    It depends only on the calibration statistics, so a sparsity sweep computes it once per layer."""
    key = ("sparsegpt_hinv", float(percdamp))
    if cache is not None and key in cache:
        return cache[key]
    H = stats.hessian.to(device or stats.device, torch.float32, copy=True)
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    damp = percdamp * torch.diagonal(H).mean()
    for attempt in range(5):  # a rank-deficient H (few tokens) may need more dampening
        L, info = torch.linalg.cholesky_ex(H + torch.eye(H.shape[0], device=H.device) * damp * 10**attempt)
        if int(info) == 0:
            break
    else:
        raise MPTError("the layer Hessian is not positive definite even with 10000x dampening",
                       "use more calibration windows or a larger percdamp")
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    if cache is not None:
        cache[key] = (U, dead)
    return U, dead


def obs_saliency(weight: torch.Tensor, stats: LayerStats, percdamp: float = 0.01,
                 cache: dict | None = None) -> torch.Tensor:
    """SparseGPT's pruning score w²/[U]ⱼⱼ² without the weight update (used by DSnoT's s. variant)."""
    U, dead = inverse_hessian_factor(stats, percdamp, weight.device, cache)
    w = weight.float().masked_fill(dead.unsqueeze(0), 0)
    return w.pow(2) / torch.diagonal(U).pow(2).unsqueeze(0)


@PRUNERS.register("sparsegpt", version=1, display="SparseGPT", calibration=True, updates_weights=True)
@torch.no_grad()
def sparsegpt(weight: torch.Tensor, stats: LayerStats, sparsity: float, pattern: Pattern | None = None,
              *, blocksize: int = 128, percdamp: float = 0.01, name: str = "", cache: dict | None = None
              ) -> torch.Tensor:
    """Prune `weight` [out, in] to `sparsity` (or N:M) and reconstruct the kept weights by OBS updates."""
    U, dead = inverse_hessian_factor(stats, percdamp, weight.device, cache)
    cols = weight.shape[1]
    if pattern is not None:
        n, m = pattern
        check_nm_shape(cols, pattern)
        blocksize = max(m, blocksize - blocksize % m)  # N:M groups must not straddle two blocks
    # work on Wᵀ [in, out]: a column of W is a contiguous row, so each rank-1 update is one addr_
    WT = weight.float().t().contiguous()
    WT[dead] = 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = WT[i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d2 = torch.diagonal(U1).pow(2)
        Err1 = torch.zeros_like(W1)
        if pattern is None:  # adaptive mask selection: one mask per block, from the OBS saliency
            mask1 = layer_mask(W1.pow(2) / d2.unsqueeze(1), sparsity)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if pattern is not None and i % m == 0:  # each group's mask, on the weights updated so far
                mask1[i : i + m] = nm_mask((W1[i : i + m].pow(2) / d2[i : i + m].unsqueeze(1)).t(), pattern).t()
            err = W1[i] * mask1[i] / U1[i, i]  # pruned: w/[U]ᵢᵢ, kept: 0
            W1[i:].addr_(U1[i, i:], err, alpha=-1)  # spread the error over the later columns
            W1[i].masked_fill_(mask1[i], 0)  # exact zeros (the update leaves rounding noise)
            Err1[i] = err
        WT[i1:i2] = W1
        WT[i2:] -= U[i1:i2, i2:].t() @ Err1  # the block's accumulated error, applied to the rest at once
    return WT.t().contiguous().to(weight.dtype)
