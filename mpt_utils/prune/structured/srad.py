"""SRAD: similarity-based removal of a contiguous block of decoder layers.

Reference: "The Unreasonable Ineffectiveness of the Deeper Layers", A. Gromov, K. Tirumala,
H. Shapourian, P. Glorioso, D. A. Roberts, arXiv:2403.17887 (ICLR 2025). The paper ships no code;
its algorithm (Sec. 3.2, Fig. 1a) is also implemented in github.com/arcee-ai/PruneMe
(`compute_block_similarity/`), which drops the embedding boundary from the search (not followed here).

To remove n layers: x^(ℓ) is the residual stream entering layer ℓ (x^(L): leaving the last layer, before
the final norm), taken at the last token of each calibration window; the angular distance
d(x^(ℓ), x^(ℓ+n)) = arccos(cos(x^(ℓ), x^(ℓ+n))) / π is averaged over the windows; the block of layers
ℓ*, ..., ℓ*+n-1 with ℓ* = argmin_ℓ d is removed, so layer ℓ*-1 feeds layer ℓ*+n. n = round(ratio · L)
(at most L - 1). The boundary states are gathered once, in one pass over the dense model, and serve
every n of a sweep. The paper then "heals" the pruned model with QLoRA; that finetuning is not part of
this method (the sweep's separate LoRA recovery, `recovery.lora_recover`, is the suite's healing step).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mpt_utils.calibration import decoder_layers
from mpt_utils.progress import progress_bar
from mpt_utils.prune.structured import STRUCTURED, cached, model_device
from mpt_utils.prune.structured.surgery import drop_blocks


@torch.no_grad()
def boundary_states(model: nn.Module, calib_ids: torch.Tensor, device: str | torch.device | None = None,
                    progress: bool = True) -> torch.Tensor:
    """Last-token residual stream at every layer boundary, [L + 1, n_windows, hidden] (float64):
    the input of each decoder layer, then the output of the last one."""
    layers = decoder_layers(model)
    dev = model_device(model, device)
    model.to(dev)
    states: list[list[torch.Tensor]] = [[] for _ in range(len(layers) + 1)]

    def grab_input(i):
        def hook(_m, args, kwargs):  # returns None: observes only
            x = args[0] if args else kwargs["hidden_states"]
            states[i].append(x[:, -1].detach().double().cpu())
        return hook

    def grab_output(_m, _args, out):
        y = out[0] if isinstance(out, (tuple, list)) else out
        states[-1].append(y[:, -1].detach().double().cpu())

    handles = [layer.register_forward_pre_hook(grab_input(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(grab_output))
    was_training = model.training
    model.eval()
    try:
        for window in progress_bar(calib_ids, desc="SRAD distances", disable=not progress, leave=False):
            model(input_ids=window.unsqueeze(0).to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return torch.stack([torch.cat(s) for s in states])


def angular_distances(states: torch.Tensor, n: int) -> torch.Tensor:
    """Mean angular distance d(x^(ℓ), x^(ℓ+n)) over windows, for ℓ = 0 .. L - n ([L - n + 1]; n >= 1)."""
    a, b = states[:-n], states[n:]
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1.0, 1.0)
    return (torch.arccos(cos) / math.pi).mean(dim=1)


@STRUCTURED.register("srad", version=1, display="SRAD", calibration=True)
def srad(model: nn.Module, ratio: float, calib_ids: torch.Tensor, *, cache: dict | None = None, seed: int = 0,
         device: str | torch.device | None = None, progress: bool = True) -> dict:
    """Remove the round(ratio * n_blocks) contiguous blocks whose input and output (last token) are
    closest in mean angular distance on the calibration windows."""
    n_layers = len(decoder_layers(model))
    n = min(int(round(ratio * n_layers)), n_layers - 1)
    if n == 0:
        return {"removed_blocks": [], "start": None, "distance": None}
    states = cached(cache, "srad:states", calib_ids, lambda: boundary_states(model, calib_ids, device, progress))
    dist = angular_distances(states, n)
    start = int(torch.argmin(dist))  # the first minimum on ties
    remove = list(range(start, start + n))
    drop_blocks(model, remove)
    return {"removed_blocks": remove, "start": start, "distance": round(float(dist[start]), 6),
            "angular_distances": [round(float(d), 6) for d in dist]}
