"""Synthetic damage with a known failure mode, to check the classifier against ground truth.

- distributed noise: every decoder linear gets Gaussian noise of `rel_std` × its weight's std, a
  small error in every block (the picture of Signal Degradation);
- a broken block: one block's MLP weights replaced by noise `scale` × their std, one component that
  no longer computes anything (the picture of Computation Collapse).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mpt_utils.calibration import decoder_layers, linear_layers
from mpt_utils.errors import MPTError


def _noise_like(w: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(w.shape, generator=gen, dtype=torch.float32).to(w.device, w.dtype) * std


@torch.no_grad()
def distributed_noise(model: nn.Module, rel_std: float = 0.05, seed: int = 0) -> nn.Module:
    """A copy of `model` with small relative Gaussian noise on every decoder linear."""
    if rel_std <= 0:
        raise MPTError(f"rel_std={rel_std} must be positive", "use e.g. rel_std=0.05")
    out, gen = copy.deepcopy(model).eval(), torch.Generator().manual_seed(seed)
    for block in decoder_layers(out):
        for lin in linear_layers(block).values():
            w = lin.weight.data
            w.add_(_noise_like(w, rel_std * float(w.float().std()), gen))
    return out


@torch.no_grad()
def broken_block(model: nn.Module, layer: int, scale: float = 10.0, seed: int = 0) -> nn.Module:
    """A copy of `model` whose block `layer` has its MLP weights replaced by noise of `scale` × their std."""
    out, gen = copy.deepcopy(model).eval(), torch.Generator().manual_seed(seed)
    blocks = decoder_layers(out)
    if not 0 <= layer < len(blocks):
        raise MPTError(f"layer {layer} is outside [0, {len(blocks)})", "pick an existing block index")
    mlp = getattr(blocks[layer], "mlp", None)
    if mlp is None:
        raise MPTError(f"{type(blocks[layer]).__name__} has no `mlp` module", "use a Llama-style model")
    for lin in linear_layers(mlp).values():
        w = lin.weight.data
        w.copy_(_noise_like(w, scale * float(w.float().std()), gen))
    return out
