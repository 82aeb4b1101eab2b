"""Two signs of components that stop computing: flat attention and flipped MLP gates.

Normalised attention entropy: for a causal query at position q, H(row) / log(q + 1), the entropy
of its attention over the q + 1 positions it may attend to, divided by the most it could be, so
0 = attends to one token and 1 = uniform (the first row, with a single choice, is left out).
Gate flip rate: the share of SwiGLU gate pre-activations (gate_proj outputs) whose sign differs
from the dense model's on the same prompt and position: a flipped gate opens a closed MLP neuron
or shuts an open one.
"""

from __future__ import annotations

import math

import pandas as pd
import torch
from torch import nn

from mpt_utils.diagnostics.prompts import PromptBatch
from mpt_utils.diagnostics.runner import Trace, trace
from mpt_utils.errors import MPTError


def normalized_entropy(weights: torch.Tensor) -> torch.Tensor:
    """[..., Q, K] causal attention probabilities -> [..., Q] entropy / log(q + 1); NaN for q = 0."""
    p = weights.double()
    h = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    n = torch.arange(1, p.shape[-2] + 1, dtype=torch.double, device=p.device)
    out = h / torch.log(n)
    out[..., 0] = math.nan
    return out.float()


def _row_entropy(weights: torch.Tensor, batch: PromptBatch) -> float:
    ent = normalized_entropy(weights)  # [B, H, Q]
    mask = batch.token_mask()[:, : ent.shape[-1]].unsqueeze(1).expand_as(ent)
    return float(ent[mask].mean())


def attention_entropy(dense: nn.Module, compressed: nn.Module, batch: PromptBatch,
                      traces: tuple[Trace, Trace] | None = None) -> pd.DataFrame:
    """Per block: mean normalised attention entropy (over heads, prompts, real query rows) of the
    dense and the compressed model, and their difference."""
    td, tc = traces or (trace(dense, batch), trace(compressed, batch))
    if any(w is None for w in td.attention + tc.attention):
        raise MPTError("the attention probabilities were not recorded",
                       "trace with attention=True (eager attention) on a model whose attention returns them")
    rows = []
    for layer, (wd, wc) in enumerate(zip(td.attention, tc.attention)):
        hd, hc = _row_entropy(wd, batch), _row_entropy(wc, batch)
        rows.append({"layer": layer, "entropy_dense": hd, "entropy_compressed": hc, "entropy_shift": hc - hd})
    return pd.DataFrame(rows)


def flip_rate(gate_dense: torch.Tensor, gate_comp: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Share of gate pre-activations whose sign differs; `mask` [B, T] picks the positions."""
    flips = torch.sign(gate_dense) != torch.sign(gate_comp)
    return float(flips[mask].float().mean() if mask is not None else flips.float().mean())


def gate_flip_rate(dense: nn.Module, compressed: nn.Module, batch: PromptBatch,
                   traces: tuple[Trace, Trace] | None = None) -> pd.DataFrame:
    """Per block: share of SwiGLU gate pre-activations whose sign flips against the dense model."""
    td, tc = traces or (trace(dense, batch), trace(compressed, batch))
    if any(g is None for g in td.gates + tc.gates):
        raise MPTError("this model has no gated MLP (gate_proj)", "gate flips exist only for SwiGLU/GeGLU MLPs")
    mask = batch.token_mask()
    return pd.DataFrame([{"layer": layer, "flip_rate": flip_rate(gd, gc, mask)}
                         for layer, (gd, gc) in enumerate(zip(td.gates, tc.gates))])


def has_gates(tr: Trace) -> bool:
    return all(g is not None for g in tr.gates)


def has_attention(tr: Trace) -> bool:
    return all(w is not None for w in tr.attention)
