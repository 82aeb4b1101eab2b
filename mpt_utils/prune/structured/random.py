"""Calibration-free random structured pruning: the RandomPruneNet baseline of "Compression Laws"
(Sengupta et al., 2025), i.e. PruneNet's FFN row slicing with a uniform random policy instead of a
learned one. No data is used: per block, a seeded random subset of MLP intermediate channels (gate
and up rows, down columns) is removed.

`ratio` is the fraction of decoder-block parameters removed, so the x-axis matches the other width
methods; with `scope="ffn"` (PruneNet) that is ratio / ffn_share of each MLP's channels. `scope="all"`
also drops random KV groups (round(ratio * groups) per block) and sizes the MLP cut to the budget.
`random_prunenet` is the same slicing at the paper's own ratio (the fraction of each MLP's channels).
"""

from __future__ import annotations

import torch
from torch import nn

from mpt_utils.calibration import decoder_layers
from mpt_utils.errors import MPTError
from mpt_utils.prune.structured import STRUCTURED
from mpt_utils.prune.structured.surgery import (
    channel_params,
    count_params,
    group_params,
    keep_kv_groups,
    keep_mlp_channels,
    llama_parts,
    n_kv_groups,
)

SCOPES = ("ffn", "all")


@STRUCTURED.register("random", version=1, display="Random", calibration=False)
def random_prune(model: nn.Module, ratio: float, calib_ids: torch.Tensor | None = None, *, scope: str = "ffn",
                 cache: dict | None = None, seed: int = 0, device: str | torch.device | None = None,
                 progress: bool = True) -> dict:
    """Remove `ratio` of the decoder-block parameters by random MLP channels (and KV groups)."""
    if scope not in SCOPES:
        raise MPTError(f"unknown random scope {scope!r}", f"use one of {SCOPES}")
    layers = decoder_layers(model)
    gen = torch.Generator().manual_seed(seed)
    total = sum(count_params(b) for b in layers)
    ffn = sum(count_params(llama_parts(b)[1]) for b in layers)
    share = ffn / total
    if scope == "ffn" and ratio >= share:
        raise MPTError(f"random (RandomPruneNet) prunes only MLP channels, which hold {share:.0%} of the block "
                       f"parameters: ratio={ratio} is out of reach", f"use ratio < {share:.2f}, or scope='all'")
    kept_g, kept_c = [], []
    for block in layers:
        attn, mlp = llama_parts(block)
        n_g, n_c = n_kv_groups(attn), mlp.gate_proj.out_features
        budget = ratio * count_params(block)
        if scope == "all":
            drop_g = min(int(round(ratio * n_g)), n_g - 1)
            if drop_g:
                keep_kv_groups(block, torch.randperm(n_g, generator=gen)[: n_g - drop_g])
            budget -= drop_g * group_params(block)
        drop_c = min(max(int(round(budget / channel_params(block))), 0), n_c - 1)
        keep_mlp_channels(block, torch.randperm(n_c, generator=gen)[: n_c - drop_c])
        kept_g.append(n_kv_groups(llama_parts(block)[0]))
        kept_c.append(llama_parts(block)[1].gate_proj.out_features)
    return {"scope": scope, "ffn_share": share, "kept_groups": kept_g, "kept_channels": kept_c,
            "calibration_free": True}
