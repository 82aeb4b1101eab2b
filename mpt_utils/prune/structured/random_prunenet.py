"""RandomPruneNet: calibration-free random structured pruning as defined by "Compression Laws for
Large Language Models" (Sengupta, Chaudhary, Chakraborty; arXiv:2504.04342).

It is PruneNet ("You Only Prune Once: Designing Calibration-Free Model Compression With Policy
Learning", Sengupta, Chaudhary, Chakraborty; arXiv:2501.15296) with a uniform random policy instead
of the learned one. PruneNet slices each FFN: a compression ratio r keeps int((1 − r)·d_ff) of the
d_ff intermediate channels of *every* block (gate/up rows and the matching down columns). So r is the
fraction of FFN channels removed and reaches 0.9, unlike the suite's `random` method, whose ratio is
the fraction of all decoder-block parameters (capped by the FFN share, about 0.75 on SmolLM2-135M).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mpt_utils.calibration import decoder_layers
from mpt_utils.errors import check_ratio
from mpt_utils.prune.structured import STRUCTURED
from mpt_utils.prune.structured.surgery import (
    block_params,
    count_params,
    finalize,
    keep_mlp_channels,
    llama_parts,
)


def kept_channels(d_ff: int, ratio: float) -> int:
    """PruneNet's row budget: int((1 − r)·d_ff), at least one channel."""
    return max(1, int((1.0 - ratio) * d_ff))


@STRUCTURED.register("random_prunenet", version=1, display="RandomPruneNet", calibration=False)
@torch.no_grad()
def random_prunenet(model: nn.Module, ratio: float, calib_ids: torch.Tensor | None = None, *,
                    cache: dict | None = None, seed: int = 0, device: str | torch.device | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Remove `ratio` of every block's FFN channels, chosen uniformly at random from `seed`, in place
    (no data: `calib_ids`, `cache`, `device` and `progress` are not read).

    Returns what was removed, measured on the tensors: the FFN-channel share (the method's ratio), the
    share of the FFN parameters, of the decoder-block parameters and of all parameters (embeddings
    included), and the channels each block keeps."""
    ratio = check_ratio(ratio)
    layers = decoder_layers(model)
    before, block_before = count_params(model), block_params(model)
    ffn_before = sum(count_params(llama_parts(b)[1]) for b in layers)
    gen = torch.Generator().manual_seed(seed)  # one stream over the blocks: reproducible from the seed
    channels_before = channels_after = 0
    kept = []
    for block in layers:
        d_ff = llama_parts(block)[1].gate_proj.out_features
        keep = kept_channels(d_ff, ratio)
        keep_mlp_channels(block, torch.randperm(d_ff, generator=gen)[:keep])
        channels_before, channels_after = channels_before + d_ff, channels_after + keep
        kept.append(keep)
    finalize(model)  # a direct call leaves a model whose config describes its tensors too
    ffn_after = sum(count_params(llama_parts(b)[1]) for b in layers)
    return {"seed": seed, "kept_channels": kept,
            "ffn_channel_reduction": 1.0 - channels_after / channels_before,
            "ffn_reduction": 1.0 - ffn_after / ffn_before,
            "block_reduction": 1.0 - block_params(model) / block_before,
            "param_reduction": 1.0 - count_params(model) / before,
            "n_params": count_params(model), "calibration_free": True}
