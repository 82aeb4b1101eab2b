"""ADMM weight update after mask selection (Boža 2024, "Fast and Effective Weight Update for Pruned
Large Language Models").

Solve min ‖XW − XŴ‖² s.t. Ŵ has the mask, by ADMM on the split Ŵ = Z (Z carries the sparsity):
    W ← (XᵀX + ρI)⁻¹ (XᵀX W₀ + ρ(Z − U)),   Z ← mask ⊙ (W + U),   U ← U + W − Z.
Inputs are normalised so diag(XᵀX) = 1 (then |W+U| is a Wanda-like score), XᵀX is dampened by 10%
of its mean diagonal, and the mask is grown gradually over the first 15 of 20 iterations along the
cubic schedule s_t = s(1 − (1 − t/T)³), chosen from |W + U| across the layer. N:M keeps the M−N
largest of every group and prunes the gradually growing rest, ending exactly on the pattern.
"""

from __future__ import annotations

import torch

from mpt_utils.calibration import LayerStats
from mpt_utils.prune import PRUNERS
from mpt_utils.prune.masks import Pattern, check_nm_shape, layer_mask, nm_mask, row_mask


def _normalised_system(stats: LayerStats, percdamp: float, rho: float, device: torch.device,
                       cache: dict | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(norm, XX, inverse of XX + ρI) in the normalised input space; ratio-independent, cached."""
    key = ("admm_system", float(percdamp), float(rho))
    if cache is not None and key in cache:
        return cache[key]
    XX = stats.gram.to(device, torch.float32, copy=True)
    norm = torch.diagonal(XX).sqrt() + 1e-8
    XX = XX / norm.unsqueeze(0) / norm.unsqueeze(1)
    XX.diagonal().add_(percdamp * torch.diagonal(XX).mean())
    inv = torch.linalg.inv(XX + rho * torch.eye(XX.shape[0], device=device))
    out = (norm, XX, inv)
    if cache is not None:
        cache[key] = out
    return out


def _keep_mask(score: torch.Tensor, sparsity: float, pattern: Pattern | None, scope: str) -> torch.Tensor:
    """True where kept, at the current (schedule) sparsity; `score` is [out, in]."""
    if pattern is None:
        return ~(layer_mask(score, sparsity) if scope == "layer" else row_mask(score, sparsity))
    n, m = pattern
    candidates = nm_mask(score, pattern)  # the N smallest of each group may go, the rest always stay
    final = n / m
    if sparsity >= final - 1e-12:
        return ~candidates
    ranked = score.masked_fill(~candidates, float("inf"))
    return ~layer_mask(ranked, sparsity)  # prunes only candidates: every kept weight scores inf


@PRUNERS.register("admm", version=1, display="ADMM", calibration=True, updates_weights=True)
@torch.no_grad()
def admm(weight: torch.Tensor, stats: LayerStats, sparsity: float, pattern: Pattern | None = None,
         *, iters: int = 20, gradual_iters: int = 15, rho: float = 1.0, percdamp: float = 0.1,
         scope: str = "layer", name: str = "", cache: dict | None = None) -> torch.Tensor:
    """Prune `weight` [out, in] with gradual ADMM mask selection and ADMM reconstruction."""
    if pattern is not None:
        check_nm_shape(weight.shape[1], pattern)
        sparsity = pattern[0] / pattern[1]
    norm, XX, inv = _normalised_system(stats, percdamp, rho, weight.device, cache)
    gradual_iters = min(gradual_iters, iters)
    W = weight.float() * norm.unsqueeze(0)  # normalised weights, [out, in]
    XY = W @ XX  # rows of (XᵀX W₀ᵀ)ᵀ: XX is symmetric
    U = torch.zeros_like(W)
    keep = _keep_mask(W.abs(), sparsity, pattern, scope)
    for t in range(iters):
        if t < gradual_iters:
            current = sparsity * (1 - (1 - (t + 1) / gradual_iters) ** 3)
            keep = _keep_mask((W + U).abs(), current, pattern, scope)
        Z = (W + U) * keep
        U = U + W - Z
        W = (XY + rho * (Z - U)) @ inv  # inv is symmetric, so this is the row-wise solve
    Z = (W + U) * keep
    return (Z / norm.unsqueeze(0)).to(weight.dtype)
