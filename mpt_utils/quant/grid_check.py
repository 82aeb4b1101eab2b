"""How far a model's weights are from an RTN grid: the check that the embedded model sits on Q4_1.

Q4_1 stores blocks of 32 as q·d + m with an fp16 scale d and fp16 min m. Re-quantizing such a
block with RTN (4 bits, groups of 32, float offset) recovers d and m from the block's min and max,
so the weights come back unchanged up to float rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from mpt_utils.quant.rtn import QuantSpec, block_linears, quantize_weight

SCHEMES = {
    "RTN w4 g32 float-offset (Q4_1 format)": QuantSpec(4, 32, zero="float"),
    "RTN w4 g32 int zero point": QuantSpec(4, 32),
    "RTN w4 g128 int zero point": QuantSpec(4, 128),
}


@torch.no_grad()
def grid_distance(model: nn.Module, schemes: dict[str, QuantSpec] | None = None) -> list[dict]:
    """Per scheme: max |ΔW|, ‖ΔW‖/‖W‖ and the share of weights left (numerically) unchanged."""
    rows = []
    for label, spec in (schemes or SCHEMES).items():
        max_abs, sq_diff, sq_norm, exact, total = 0.0, 0.0, 0.0, 0, 0
        for lin in block_linears(model).values():
            w = lin.weight.float()
            d = (quantize_weight(w, spec) - w).abs()
            max_abs = max(max_abs, float(d.max()))
            sq_diff += float((d**2).sum())
            sq_norm += float((w**2).sum())
            exact += int((d <= 1e-6 * w.abs().amax(dim=1, keepdim=True)).sum())
            total += w.numel()
        rel = (sq_diff / sq_norm) ** 0.5
        rows.append({"metric": "grid_rel_rms_diff", "value": rel, "scheme": label, "max_abs_diff": max_abs,
                     "rel_rms_diff": rel, "exact_share": exact / total})
    return rows
