"""GPTQ (Frantar et al., 2023): one-shot weight quantization from second-order layer statistics.

For each linear, with H = 2/n XᵀX from the calibration inputs, columns are quantized left to right
and each column's rounding error is spread over the not-yet-quantized columns through the upper
Cholesky factor of H⁻¹ (the OBS update), in lazy batches of `block_size` columns. Dampening adds
`damp`·mean(diag H) to the diagonal; act-order visits columns by decreasing diag(H); groups take
fresh grid parameters every `group_size` columns (in visiting order, so act-order + groups stores
a group index per column, which the size accounting counts).

Blocks run through the shared engine `mpt_utils.calibration.layerwise` with sequential=True: block
i+1 is calibrated on the outputs of the already quantized block i, as in the reference code.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from mpt_utils.calibration import decoder_layers, layerwise
from mpt_utils.errors import MPTError
from mpt_utils.quant.rtn import QuantSpec, check_spec, make_grid, normalize_group_size


@torch.no_grad()
def gptq_weight(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, damp: float = 0.01,
                block_size: int = 128, act_order: bool = False) -> tuple[torch.Tensor, float]:
    """Quantize one [out, in] weight with GPTQ; returns (de-quantized weight, summed OBS error)."""
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    cols = w.shape[1]
    dead = torch.diagonal(h) == 0  # inputs never active: weights there cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diagonal(h)) * torch.eye(cols, device=h.device)
    try:
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        u = torch.linalg.cholesky(hinv, upper=True)
    except torch.linalg.LinAlgError:
        raise MPTError("GPTQ: the layer Hessian is not positive definite even after dampening",
                       "raise damp (e.g. 0.1) or use more calibration windows") from None

    g = spec.group_size
    if g is not None:  # a lazy batch holds whole groups, so a group's grid sees its updated columns
        block_size = max(1, block_size // g) * g
    grid = make_grid(w, spec) if g is None else None
    q_all = torch.zeros_like(w)
    loss = torch.zeros(w.shape[0], device=w.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if g is not None and (i1 + i) % g == 0:
                grid = make_grid(w1[:, i : i + g], spec)
            col = w1[:, i : i + 1]
            q = grid.apply(col)
            q_all[:, i1 + i] = q[:, 0]
            d = u1[i, i]
            e = (col - q) / d
            loss += (e[:, 0] ** 2) / 2
            w1[:, i:] -= e @ u1[i : i + 1, i:]
            err1[:, i] = e[:, 0]
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    if perm is not None:
        q_all = q_all[:, torch.argsort(perm)]
    return q_all.to(weight.dtype), float(loss.sum())


def gptq(model: nn.Module, *, bits: int, group_size: int | None = 128, sym: bool = False,
         calib_ids: torch.Tensor | None = None, device: str | None = None, progress: bool = True,
         damp: float = 0.01, block_size: int = 128, act_order: bool = False, zero: str = "int"):
    """Quantize every decoder-block linear of `model` in place with GPTQ on `calib_ids` [n, seqlen]."""
    from mpt_utils.quant import QuantResult

    if calib_ids is None:
        raise MPTError("gptq needs calibration data", "pass calib_ids=calibration_windows(tokenizer, ...)")
    if not 0 <= damp < 1:
        raise MPTError(f"damp={damp} is outside [0, 1)", "use the paper's 0.01")
    group_size = normalize_group_size(group_size)
    spec = check_spec(QuantSpec(bits, group_size, sym, zero, act_order_index=act_order and group_size is not None),
                      "gptq")
    names = {id(layer): name for name, layer in model.named_modules()
             if any(layer is m for m in decoder_layers(model))}
    layers: dict[str, QuantSpec] = {}
    losses: dict[str, float] = {}
    start = time.perf_counter()

    def on_block(_i: int, block: nn.Module, stats) -> None:
        modules = dict(block.named_modules())
        for name, st in stats.items():
            lin = modules[name]
            lin.weight.data, losses[f"{names[id(block)]}.{name}"] = gptq_weight(
                lin.weight.data, st.hessian, spec, damp, block_size, act_order)
            layers[f"{names[id(block)]}.{name}"] = spec

    layerwise(model, calib_ids, on_block, sequential=True, device=device, progress=progress, desc="gptq")
    return QuantResult("gptq", spec, layers, time.perf_counter() - start,
                       extra={"damp": damp, "act_order": act_order, "block_size": block_size,
                              "obs_loss": sum(losses.values())})
