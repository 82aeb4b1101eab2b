"""An importance matrix for llama.cpp's IQ2/IQ1 types, computed from our own calibration windows.

llama.cpp's imatrix is, per weight tensor, the mean of x_j² over calibration tokens for every
input column j (llama-imatrix's in_sum2 / count). The shared engine's Gram diagonal divided by the
token count is exactly that, so the IQ types use the same calibration data as GPTQ/AWQ.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mpt_utils.calibration import LayerStats, collect_stats
from mpt_utils.quant.gguf.names import module_names


def imatrix_from_model(model: nn.Module, calib_ids: torch.Tensor | None = None, device: str | None = None,
                       progress: bool = False, stats: dict[str, LayerStats] | None = None) -> dict[str, np.ndarray]:
    """GGUF tensor name -> mean squared input activation per column, for every block linear.
    `stats`: already collected dense statistics (collect_stats) to reuse instead of a new pass."""
    names = module_names(model)
    if stats is None:
        stats = collect_stats(model, calib_ids, device=device, progress=progress)
    out = {}
    for module, st in stats.items():
        base = names.get(module)
        if base is not None:
            out[f"{base}.weight"] = (st.sq_norm / max(st.n, 1)).cpu().numpy().astype(np.float32)
    return out
