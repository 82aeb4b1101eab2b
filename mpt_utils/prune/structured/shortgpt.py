"""ShortGPT (Men et al., 2024): delete the decoder blocks that change the residual stream least.

Block Influence BI_i = 1 - E_t[cos(x_i,t, x_{i+1},t)], the mean over calibration tokens of one minus
the cosine between a block's input and output hidden states, measured once on the dense model. The
round(ratio * L) blocks with the lowest BI are removed in one shot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mpt_utils.calibration import decoder_layers
from mpt_utils.progress import progress_bar
from mpt_utils.prune.structured import STRUCTURED, cached, model_device
from mpt_utils.prune.structured.surgery import drop_blocks


@torch.no_grad()
def block_influence(model: nn.Module, calib_ids: torch.Tensor, device: str | torch.device | None = None,
                    progress: bool = True) -> torch.Tensor:
    """BI of every decoder block [L] (float64), from hooks on the blocks' inputs and outputs."""
    layers = decoder_layers(model)
    dev = model_device(model, device)
    model.to(dev)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    counts = torch.zeros(len(layers), dtype=torch.float64)
    seen: dict[int, torch.Tensor] = {}

    def pre(i):
        def hook(_m, args, kwargs):
            seen[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def post(i):
        def hook(_m, _args, _kwargs, out):
            y = out[0] if isinstance(out, (tuple, list)) else out
            x = seen.pop(i)
            cos = F.cosine_similarity(x.reshape(-1, x.shape[-1]).float(), y.reshape(-1, y.shape[-1]).float(), dim=-1)
            sums[i] += cos.double().sum().cpu()
            counts[i] += cos.numel()
        return hook

    handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(post(i), with_kwargs=True) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for window in progress_bar(calib_ids, desc="block influence", disable=not progress, leave=False):
            model(input_ids=window.unsqueeze(0).to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return 1.0 - sums / counts.clamp_min(1)


@STRUCTURED.register("shortgpt", version=1, display="ShortGPT", calibration=True)
def shortgpt(model: nn.Module, ratio: float, calib_ids: torch.Tensor, *, cache: dict | None = None, seed: int = 0,
             device: str | torch.device | None = None, progress: bool = True) -> dict:
    """Remove round(ratio * n_blocks) blocks with the lowest Block Influence."""
    n_layers = len(decoder_layers(model))
    bi = cached(cache, "shortgpt:bi", calib_ids, lambda: block_influence(model, calib_ids, device, progress))
    n_remove = min(int(round(ratio * n_layers)), n_layers - 1)
    remove = sorted(torch.argsort(bi, stable=True)[:n_remove].tolist())
    drop_blocks(model, remove)
    return {"removed_blocks": remove, "block_influence": [round(float(b), 6) for b in bi]}
