"""Blockwise absmax formats of bitsandbytes: 4-bit codebooks (NF4, FP4), their double quantization,
and the storage spec that counts the constants exactly as the library keeps them.

A tensor is flattened and cut into blocks of `block_size` consecutive values (a partial last block
gets its own absmax, as in bitsandbytes); each value is divided by its block's absmax and rounded to
the nearest codebook level (ties to the lower level: bitsandbytes buckets at the midpoints between
sorted levels), then multiplied back. The absmax constants are fp32; with double quantization they
are centred on their mean (one fp32 offset per tensor) and quantized to 8 bits with bitsandbytes'
signed dynamic map in blocks of 256, each with its own fp32 absmax (QLoRA's 0.127 bits per weight).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from mpt_utils.errors import MPTError
from mpt_utils.quant.rtn import QuantSpec, block_linears

# NF4: quantiles of N(0, 1) with equal mass per bin, 8 positive and 7 negative levels plus an exact
# zero, scaled to [-1, 1] (QLoRA, Appendix E; bitsandbytes `get_4bit_type("nf4")`, float32 values).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
NF4_OFFSET = 0.9677083  # the outermost quantile of the NF4 construction (bitsandbytes' default)


def fp4_levels() -> tuple[float, ...]:
    """bitsandbytes' FP4: sign, 2 exponent bits, 1 mantissa bit; magnitudes {0, 0.0625, 2, 3, 4, 6, 8,
    12} / 12 (the kernels' table, whose subnormal is 0.0625, not the 0.125 of an IEEE-like E2M1).
    15 distinct levels: +0 and -0 are the same value."""
    mags = (0.0, 0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
    return tuple(sorted({s * m / 12.0 for m in mags for s in (1.0, -1.0)}))


@cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (Dettmers 2015, "8-Bit Approximations for Parallelism in
    Deep Learning"), the code of the second-level quantization: for exponent e = 0..6, 2^e fraction
    values (the midpoints of 2^e + 1 points spread evenly over [0.1, 1]) times 10^(e-6), both signs,
    plus 0 and 1; 256 sorted values."""
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        mids = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (e - 6)).tolist()
        values += mids + [-m for m in mids]
    return torch.tensor(sorted(values), dtype=torch.float32)


CODEBOOKS = {"nf4": NF4_LEVELS, "fp4": fp4_levels()}
DQ_BLOCK = 256  # second-level block of the double quantization (bitsandbytes' nested blocksize)
CONST_BITS = 32  # bitsandbytes keeps absmax constants (and the double-quant offset) in fp32


def round_to_levels(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (sorted `levels`), ties to the lower one."""
    return torch.bucketize(x, (levels[:-1] + levels[1:]) / 2)


def _blocks(flat: torch.Tensor, block: int) -> torch.Tensor:
    pad = (-flat.numel()) % block
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, block)  # zero padding: absmax unchanged


def blockwise(x: torch.Tensor, levels: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (level indices, flattened, padded to whole blocks) and fp32 absmax per block of `x`."""
    blocks = _blocks(x.detach().float().reshape(-1), block)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp_min(1e-38)).unsqueeze(1)).clamp(-1, 1)  # as bitsandbytes scales
    return round_to_levels(scaled, levels.to(x.device)), absmax


def double_quantize(absmax: torch.Tensor, block: int = DQ_BLOCK) -> torch.Tensor:
    """The absmax constants as double quantization stores them, de-quantized: centred on their mean,
    8-bit dynamic-map codes in blocks of `block` with an fp32 absmax each, then the mean added back."""
    offset = absmax.mean()
    code = dynamic_map().to(absmax.device)
    idx, amax2 = blockwise(absmax - offset, code, block)
    return (code[idx] * amax2.unsqueeze(1)).reshape(-1)[: absmax.numel()] + offset


def dequantize_blockwise(w: torch.Tensor, codebook: str, block: int, double_quant: bool) -> torch.Tensor:
    """Quantize–dequantize `w` in the 4-bit `codebook` format (float32 math, `w`'s dtype out)."""
    levels = torch.tensor(CODEBOOKS[codebook], dtype=torch.float32, device=w.device)
    idx, absmax = blockwise(w, levels, block)
    scale = double_quantize(absmax) if double_quant else absmax
    out = (levels[idx] * scale.unsqueeze(1)).reshape(-1)[: w.numel()]
    return out.view(w.shape).to(w.dtype)


@dataclass(frozen=True)
class AbsmaxSpec(QuantSpec):
    """A bitsandbytes absmax format: `bits` per code, one fp32 absmax per block of `group_size`
    consecutive values of the flattened weight (None: per output row), optionally double quantized;
    `fp16_copy`: an fp16 copy of the weight is kept beside the codes (LLM.int8() with fp16 weights)."""

    codebook: str = "nf4"  # "nf4", "fp4" or "int8" (a linear absmax grid)
    double_quant: bool = False
    fp16_copy: bool = False

    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Bits of one [out, in] weight: codes + constants (+ the fp16 copy). Codebook tables are
        constants of the format, shared by every tensor, and not counted."""
        n = out_features * in_features
        blocks = math.ceil(n / (self.group_size or in_features))
        if self.double_quant:
            consts = blocks * 8 + math.ceil(blocks / DQ_BLOCK) * CONST_BITS + CONST_BITS
        else:
            consts = blocks * CONST_BITS
        return n * self.bits + consts + (16 * n if self.fp16_copy else 0)

    def as_dict(self) -> dict:
        return {**super().as_dict(), "codebook": self.codebook, "double_quant": self.double_quant,
                "fp16_copy": self.fp16_copy}


def check_fixed(method: str, bits: int, want_bits: int, sym: bool) -> None:
    """A fixed-width absmax format takes only its own bit width and is symmetric by construction."""
    if bits != want_bits or isinstance(bits, bool):
        raise MPTError(f"{method} is a {want_bits}-bit format, got bits={bits!r}", f"call it with bits={want_bits}")
    if not sym:
        raise MPTError(f"{method} scales by the absolute maximum: it is symmetric", "leave sym=True (the default)")


@torch.no_grad()
def quantize_codebook(model: nn.Module, method: str, codebook: str, *, bits: int, group_size: int | None,
                      sym: bool, double_quant: bool):
    """Quantize every decoder-block linear of `model` in place in a 4-bit codebook format."""
    from mpt_utils.quant import QuantResult

    check_fixed(method, bits, 4, sym)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise MPTError(f"{method} needs a block size, got group_size={group_size!r}",
                       "use group_size=64 (bitsandbytes' default) or another positive integer")
    spec = AbsmaxSpec(4, group_size, True, codebook=codebook, double_quant=bool(double_quant))
    start = time.perf_counter()
    layers = {}
    for name, lin in block_linears(model).items():
        lin.weight.data = dequantize_blockwise(lin.weight.data, codebook, group_size, spec.double_quant)
        layers[name] = spec
    return QuantResult(method, spec, layers, time.perf_counter() - start, extra={"double_quant": spec.double_quant})
