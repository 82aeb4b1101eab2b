"""FLAP (An et al., AAAI 2024): fluctuation-based adaptive structured pruning, retraining-free.

Per input channel j of o_proj (attention heads) and down_proj (MLP), the Weighted Input Feature
Variance WIFV_j = Var_t(x_tj) * ||W_:,j||^2 says how much the layer's output would fluctuate if the
channel were replaced by its mean. Scores are standardized per layer and module, so heads and
channels of every layer compete in one global ranking where each unit costs its parameter count
("AL-AM" adaptive structure). Removed channels are replaced by their calibration mean: the constant
W_:,removed @ mean(x_removed) becomes an output bias (baseline compensation).

Under grouped-query attention one unit is a KV group (1 key/value head + its query heads); its
score is the mean standardized score of its o_proj input channels. Every layer keeps at least one
group and one channel (a layer with no heads cannot run in transformers); that floor is reported.
"""

from __future__ import annotations

import torch
from torch import nn

from mpt_utils.calibration import collect_stats, decoder_layers
from mpt_utils.errors import MPTError
from mpt_utils.prune.structured import STRUCTURED, cached
from mpt_utils.prune.structured.surgery import (
    channel_params,
    group_channels,
    group_params,
    keep_kv_groups,
    keep_mlp_channels,
    llama_parts,
    n_kv_groups,
)

METRICS = ("wifv", "ifv", "wifn")
STRUCTURES = ("AL-AM", "UL-UM")


def _standardize(x: torch.Tensor) -> torch.Tensor:
    std = x.std()
    return (x - x.mean()) / std if x.numel() > 1 and std > 0 else torch.zeros_like(x)


def channel_scores(weight: torch.Tensor, stats, metric: str) -> torch.Tensor:
    """Per-input-channel fluctuation score of a linear layer from its calibration statistics."""
    w = weight.detach().float().cpu()
    if metric == "ifv":
        return stats.var.cpu()
    if metric == "wifv":
        return stats.var.cpu() * w.pow(2).sum(0)
    # wifn: |W| scaled by the input RMS, averaged over output rows
    return (w.abs() * (stats.sq_norm.cpu() / max(stats.n, 1)).sqrt()[None, :]).mean(0)


def _layer_stats(model: nn.Module, stats: dict) -> list[tuple]:
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for block in decoder_layers(model):
        prefix = names[id(block)]
        out.append((stats[f"{prefix}.self_attn.o_proj"], stats[f"{prefix}.mlp.down_proj"]))
    return out


@STRUCTURED.register("flap", version=1, display="FLAP", calibration=True, paper_name="FLAP(WIFV)")
def flap(model: nn.Module, ratio: float, calib_ids: torch.Tensor, *, cache: dict | None = None,
         metric: str = "wifv", structure: str = "AL-AM", bias: bool = True, seed: int = 0,
         device: str | torch.device | None = None, progress: bool = True) -> dict:
    """Remove `ratio` of the attention+MLP parameters by fluctuation, with bias compensation."""
    if metric not in METRICS or structure not in STRUCTURES:
        raise MPTError(f"flap metric={metric!r}, structure={structure!r}",
                       f"metric in {METRICS}, structure in {STRUCTURES}")
    layers = decoder_layers(model)
    for block in layers:
        llama_parts(block)
    stats = cached(cache, "flap:stats", calib_ids, lambda: collect_stats(
        model, calib_ids, device=device, progress=progress,
        layer_filter=lambda n: n.endswith(("self_attn.o_proj", "mlp.down_proj"))))
    per_layer = _layer_stats(model, stats)

    group_scores, chan_scores = [], []
    for block, (st_o, st_d) in zip(layers, per_layer):
        attn, mlp = llama_parts(block)
        s_o = channel_scores(attn.o_proj.weight, st_o, metric)
        s_d = channel_scores(mlp.down_proj.weight, st_d, metric)
        if metric == "wifv":
            s_o = s_o.pow(2)  # FLAP squares the attention fluctuation before standardizing
        if structure == "AL-AM":
            s_o, s_d = _standardize(s_o), _standardize(s_d)
        groups = torch.arange(n_kv_groups(attn))
        group_scores.append(torch.stack([s_o[group_channels(attn, g)[0]].mean() for g in groups]))
        chan_scores.append(s_d)

    keep_g, keep_c = _select(layers, group_scores, chan_scores, ratio, structure)
    floored = 0
    for i, block in enumerate(layers):
        if keep_g[i].numel() == 0:
            keep_g[i], floored = group_scores[i].argmax().reshape(1), floored + 1
        if keep_c[i].numel() == 0:
            keep_c[i], floored = chan_scores[i].argmax().reshape(1), floored + 1
        attn, mlp = llama_parts(block)
        st_o, st_d = per_layer[i]
        comp_o = comp_d = None
        if bias:
            q_keep = group_channels(attn, keep_g[i])[0]
            drop_o = torch.ones(attn.o_proj.in_features, dtype=torch.bool)
            drop_o[q_keep] = False
            comp_o = _compensation(attn.o_proj, st_o.mean, drop_o)
            drop_d = torch.ones(mlp.down_proj.in_features, dtype=torch.bool)
            drop_d[keep_c[i]] = False
            comp_d = _compensation(mlp.down_proj, st_d.mean, drop_d)
        keep_kv_groups(block, keep_g[i], comp_o)
        keep_mlp_channels(block, keep_c[i], comp_d)
    return {"kept_groups": [int(k.numel()) for k in keep_g], "kept_channels": [int(k.numel()) for k in keep_c],
            "metric": metric, "structure": structure, "bias_compensation": bias, "floored_units": floored}


def _compensation(lin: nn.Linear, mean: torch.Tensor, drop: torch.Tensor) -> torch.Tensor | None:
    if not drop.any():
        return None
    w = lin.weight.detach().float()
    return w[:, drop.to(w.device)] @ mean.to(w.device, torch.float32)[drop.to(w.device)]


def _select(layers, group_scores, chan_scores, ratio: float, structure: str):
    """Kept KV-group and channel indices per layer."""
    if structure == "UL-UM":  # uniform: each layer drops `ratio` of its groups and of its channels
        keep_g = [s.argsort(descending=True)[: s.numel() - int(round(ratio * s.numel()))] for s in group_scores]
        keep_c = [s.argsort(descending=True)[: s.numel() - int(ratio * s.numel())] for s in chan_scores]
        return keep_g, keep_c
    scores, costs, owner = [], [], []
    for i, block in enumerate(layers):
        g_cost, c_cost = group_params(block), channel_params(block)
        scores += [group_scores[i], chan_scores[i]]
        costs += [torch.full_like(group_scores[i], g_cost, dtype=torch.float64),
                  torch.full_like(chan_scores[i], c_cost, dtype=torch.float64)]
        owner += [torch.stack([torch.full_like(group_scores[i], i, dtype=torch.long),
                               torch.zeros_like(group_scores[i], dtype=torch.long),
                               torch.arange(group_scores[i].numel())], 1),
                  torch.stack([torch.full_like(chan_scores[i], i, dtype=torch.long),
                               torch.ones_like(chan_scores[i], dtype=torch.long),
                               torch.arange(chan_scores[i].numel())], 1)]
    score, cost, own = torch.cat(scores), torch.cat(costs), torch.cat(owner)
    order = torch.argsort(score, descending=True, stable=True)
    kept_cost = torch.cumsum(cost[order], 0)
    # as in FLAP: keep the best units until their parameters are closest to (1 - ratio) of the total
    n_keep = int(torch.argmin((kept_cost - (1 - ratio) * cost.sum()).abs())) + 1
    kept = own[order[:n_keep]]
    keep_g = [kept[(kept[:, 0] == i) & (kept[:, 1] == 0), 2] for i in range(len(layers))]
    keep_c = [kept[(kept[:, 0] == i) & (kept[:, 1] == 1), 2] for i in range(len(layers))]
    return keep_g, keep_c
