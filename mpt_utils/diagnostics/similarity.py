"""How far the compressed model's residual stream has moved from the dense one, block by block.

- linear CKA (Kornblith et al., 2019) of the token × feature matrices: invariant to orthogonal
  transforms and isotropic scaling, 1 for the same representation;
- principal-angle similarity of the top-k right-singular (feature) subspaces: the mean squared
  cosine of the k principal angles, 1 when both span the same k directions;
- relative error ‖h_c − h_d‖ / ‖h_d‖ per token, whose growth from block to block says where the
  damage enters (see `mpt_utils.diagnostics.classify`).
Token statistics use the real positions after the first one (`PromptBatch.token_mask`).
"""

from __future__ import annotations

import math

import pandas as pd
import torch
from torch import nn

from mpt_utils.diagnostics.prompts import PromptBatch
from mpt_utils.diagnostics.runner import Trace, trace
from mpt_utils.errors import MPTError


def _matrix(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2 or x.shape[0] < 2:
        raise MPTError(f"need a [tokens, features] matrix with at least 2 tokens, got {tuple(x.shape)}",
                       "pass more prompts or longer ones")
    return x.double()


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two [n, d] representations of the same n tokens (d may differ)."""
    x, y = _matrix(x), _matrix(y)
    if x.shape[0] != y.shape[0]:
        raise MPTError(f"CKA needs the same tokens on both sides, got {x.shape[0]} and {y.shape[0]} rows",
                       "compare representations of the same prompts")
    x, y = x - x.mean(0), y - y.mean(0)
    hsic = (x.T @ y).pow(2).sum()
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(hsic / norm) if norm > 0 else math.nan


def top_subspace(x: torch.Tensor, k: int) -> torch.Tensor:
    """Orthonormal basis [d, k] of the top-k right-singular directions of the centred x."""
    x = _matrix(x)
    x = x - x.mean(0)
    k = min(k, *x.shape)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    return vh[:k].T


def subspace_similarity(x: torch.Tensor, y: torch.Tensor, k: int = 16) -> float:
    """Mean cos² of the principal angles between the top-k feature subspaces of x and y (1 = same span)."""
    if k < 1:
        raise MPTError(f"k={k} is not a positive subspace dimension", "use e.g. k=16")
    u, v = top_subspace(x, k), top_subspace(y, k)
    cos = torch.linalg.svdvals(u.T @ v).clamp(max=1.0)
    return float(cos.pow(2).mean())


def representation_similarity(dense: nn.Module, compressed: nn.Module, batch: PromptBatch, k: int = 16,
                              traces: tuple[Trace, Trace] | None = None) -> pd.DataFrame:
    """Per block l (residual stream after block l): linear CKA, top-k subspace similarity and mean
    relative error of the compressed hidden states against the dense ones."""
    td, tc = traces or (trace(dense, batch), trace(compressed, batch))
    mask = batch.token_mask()
    rows = []
    for layer, (hd, hc) in enumerate(zip(td.block_outputs, tc.block_outputs)):
        xd, xc = hd[mask].double(), hc[mask].double()
        rel = (xc - xd).norm(dim=-1) / xd.norm(dim=-1).clamp_min(1e-12)
        rows.append({"layer": layer, "cka": linear_cka(xd, xc), "subspace_sim": subspace_similarity(xd, xc, k),
                     "rel_error": float(rel.mean()), "k": min(k, *xd.shape)})
    return pd.DataFrame(rows)
