"""Round-to-nearest (RTN) weight quantization and the integer grid every torch method shares.

A grid maps x to q = clamp(round(x/scale + zero), lo, hi) and back to (q - zero)·scale, per group of
`group_size` consecutive input columns of a weight row (or the whole row: per-channel). Variants:
- symmetric: zero = 0, q in [-(2^(b-1)-1), 2^(b-1)-1], scale = absmax/qmax (SmoothQuant, LLM.int8 style);
- asymmetric, integer zero point (GPTQ/AWQ checkpoints): range widened to include 0, zero = round(-min/scale);
- asymmetric, float offset (GGUF Q4_1/Q5_1 style): q·scale + min, the offset kept in fp16.
Simulated: weights stay float tensors holding the de-quantized values.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from mpt_utils.errors import MPTError
from mpt_utils.quant import QUANTIZERS

ZERO_KINDS = ("int", "float")


@dataclass(frozen=True)
class QuantSpec:
    """How one weight matrix is stored: `bits` per weight, groups of `group_size` input columns
    (None = one group per output row), symmetric or asymmetric with an int / float offset."""

    bits: int
    group_size: int | None = 128
    sym: bool = False
    zero: str = "int"
    act_order_index: bool = False  # GPTQ act-order with groups stores a group index per column

    def as_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym, "zero": self.zero}


def check_bits(bits: int, lo: int = 2, hi: int = 8, method: str = "quantizer") -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not lo <= bits <= hi:
        raise MPTError(f"{method} does not support bits={bits!r}", f"use an integer bit width in [{lo}, {hi}]")
    return bits


def check_spec(spec: QuantSpec, method: str = "quantizer") -> QuantSpec:
    check_bits(spec.bits, method=method)
    if spec.group_size is not None and (not isinstance(spec.group_size, int) or spec.group_size < 1):
        raise MPTError(f"group_size={spec.group_size!r} is invalid", "use a positive integer (e.g. 128) or None "
                       "for per-channel")
    if spec.zero not in ZERO_KINDS:
        raise MPTError(f"unknown zero-point kind {spec.zero!r}", f"use one of {ZERO_KINDS}")
    return spec


def normalize_group_size(group_size: int | None) -> int | None:
    """None, 0 and -1 all mean per-channel (one group per row)."""
    return None if group_size in (None, 0, -1) else int(group_size)


@dataclass
class Grid:
    scale: torch.Tensor
    zero: torch.Tensor
    lo: int
    hi: int

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(x / self.scale + self.zero), self.lo, self.hi)
        return (q - self.zero) * self.scale

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(x / self.scale + self.zero), self.lo, self.hi)


def make_grid(x: torch.Tensor, spec: QuantSpec, xmin: torch.Tensor | None = None,
              xmax: torch.Tensor | None = None) -> Grid:
    """Grid parameters over the last dim of `x` (shape [..., g] -> params [..., 1]).
    `xmin`/`xmax` override the range (AWQ's clipping search passes shrunken ranges)."""
    xmin = x.amin(dim=-1, keepdim=True) if xmin is None else xmin
    xmax = x.amax(dim=-1, keepdim=True) if xmax is None else xmax
    if spec.sym:
        qmax = 2 ** (spec.bits - 1) - 1
        scale = torch.maximum(xmin.abs(), xmax.abs()) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return Grid(scale, torch.zeros_like(scale), -qmax, qmax)
    maxq = 2**spec.bits - 1
    if spec.zero == "int":  # the range must contain 0 so that 0 is exact (padding, pruned weights)
        xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
    span = xmax - xmin
    scale = torch.where(span > 0, span / maxq, torch.ones_like(span))
    zero = -xmin / scale
    if spec.zero == "int":
        zero = torch.round(zero)
    return Grid(scale, zero, 0, maxq)


def to_groups(w: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, int]:
    """[out, in] -> [out, n_groups, g]; a partial last group is padded by repeating its last column,
    which leaves its min/max (and so its grid) unchanged."""
    out_f, in_f = w.shape
    g = in_f if group_size is None else min(group_size, in_f)
    pad = (-in_f) % g
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out_f, pad)], dim=1)
    return w.reshape(out_f, -1, g), in_f


def from_groups(wg: torch.Tensor, in_f: int) -> torch.Tensor:
    return wg.reshape(wg.shape[0], -1)[:, :in_f]


def quantize_weight(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """RTN quantize–dequantize of a [out, in] weight under `spec` (float32 math, original dtype out)."""
    wg, in_f = to_groups(w.float(), spec.group_size)
    deq = make_grid(wg, spec).apply(wg)
    return from_groups(deq, in_f).to(w.dtype)


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear inside the decoder blocks, by full module name. Embeddings and lm_head stay in
    high precision, as in the GPTQ/AWQ papers and their checkpoints."""
    from mpt_utils.calibration import decoder_layers

    layers = decoder_layers(model)
    ids = {id(layer) for layer in layers}
    out = {}
    for name, module in model.named_modules():
        if id(module) in ids:
            for sub, lin in module.named_modules():
                if isinstance(lin, nn.Linear):
                    out[f"{name}.{sub}"] = lin
    return out


@QUANTIZERS.register("rtn", version=1, display="RTN", calibration=False)
@torch.no_grad()
def rtn(model: nn.Module, *, bits: int, group_size: int | None = 128, sym: bool = False, zero: str = "int",
        calib_ids: torch.Tensor | None = None, device: str | None = None, progress: bool = True):
    """Quantize every decoder-block linear of `model` in place with RTN (data-free: `calib_ids`,
    `device` and `progress` are accepted for the shared signature and ignored)."""
    from mpt_utils.quant import QuantResult

    spec = check_spec(QuantSpec(bits, normalize_group_size(group_size), sym, zero), "rtn")
    start = time.perf_counter()
    layers = {}
    for name, lin in block_linears(model).items():
        lin.weight.data = quantize_weight(lin.weight.data, spec)
        layers[name] = spec
    return QuantResult("rtn", spec, layers, time.perf_counter() - start)
