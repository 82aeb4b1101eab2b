"""What pruning achieved, measured on the tensors: sparsity per block and overall, N:M validity,
and the layer reconstruction error ‖XWᵀ − XŴᵀ‖ used to compare methods."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mpt_utils.calibration import decoder_layers, linear_layers
from mpt_utils.prune.masks import Pattern, pattern_name


def block_linears(model: nn.Module) -> list[dict[str, nn.Linear]]:
    """The prunable linears of every decoder block (attention and MLP projections), in order."""
    return [linear_layers(block) for block in decoder_layers(model)]


def nm_satisfied(weight: torch.Tensor, pattern: Pattern) -> bool:
    """True when every group of M consecutive inputs of every row holds at least N zeros."""
    n, m = pattern
    rows, cols = weight.shape
    if cols % m:
        return False
    zeros = (weight.reshape(rows, cols // m, m) == 0).sum(dim=2)
    return bool((zeros >= n).all())


@torch.no_grad()
def sparsity_report(model: nn.Module, pattern: Pattern | None = None) -> dict[str, Any]:
    """Zeros in the decoder blocks' linear weights (what pruning targets), per block and overall,
    plus the share of all model parameters that are zero and, for N:M, whether every layer obeys it."""
    per_block, zeros, total, nm_ok = [], 0, 0, True
    for linears in block_linears(model):
        bz = sum(int((lin.weight == 0).sum()) for lin in linears.values())
        bt = sum(lin.weight.numel() for lin in linears.values())
        per_block.append(bz / bt if bt else 0.0)
        zeros, total = zeros + bz, total + bt
        if pattern is not None:
            nm_ok = nm_ok and all(nm_satisfied(lin.weight, pattern) for lin in linears.values())
    all_params = sum(p.numel() for p in model.parameters())
    all_zeros = sum(int((p == 0).sum()) for p in model.parameters())
    return {"sparsity": zeros / total if total else 0.0, "n_zero": zeros, "n_prunable": total,
            "sparsity_all_params": all_zeros / all_params if all_params else 0.0,
            "block_sparsity": per_block, "pattern": pattern_name(pattern),
            "nm_ok": nm_ok if pattern is not None else None}


def reconstruction_error(weight: torch.Tensor, new_weight: torch.Tensor, x: torch.Tensor) -> float:
    """‖X Wᵀ − X Ŵᵀ‖_F on input rows `x` [tokens, in]."""
    x = x.float()
    return float(torch.linalg.norm(x @ weight.float().t() - x @ new_weight.float().t()))
