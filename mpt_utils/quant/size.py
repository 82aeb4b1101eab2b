"""True storage of a quantized model: b-bit codes + fp16 scales + zero points (+ act-order index),
everything that is not quantized (embeddings, norms, lm_head) at `other_bits` (fp16 by default).

Compression ratio is against the same model stored entirely at `baseline_bits` (FP16), the papers'
reference, so 4-bit weights with g128 fp16 scales read ~0.74, not 0.75.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from torch import nn

from mpt_utils.quant.rtn import QuantSpec

SCALE_BITS = 16  # fp16 scale per group
INDEX_BITS = 32  # GPTQ g_idx: one int32 group index per input column


def linear_bits(out_features: int, in_features: int, spec: QuantSpec) -> int:
    """Bits one [out, in] weight takes in `spec`'s format."""
    own = getattr(spec, "storage_bits", None)  # formats with their own constants (bitsandbytes' absmax)
    if own is not None:
        return own(out_features, in_features)
    g = in_features if spec.group_size is None else min(spec.group_size, in_features)
    groups = out_features * math.ceil(in_features / g)
    zero_bits = 0 if spec.sym else (spec.bits if spec.zero == "int" else SCALE_BITS)
    bits = out_features * in_features * spec.bits + groups * (SCALE_BITS + zero_bits)
    if spec.act_order_index and spec.group_size is not None:
        bits += in_features * INDEX_BITS
    return bits


@dataclass
class StorageReport:
    total_bytes: int
    quant_bytes: int  # the quantized linears, codes + metadata
    other_bytes: int  # everything kept in high precision
    n_quant_weights: int
    n_params: int
    bits_per_weight: float  # over the quantized linears, metadata included
    bits_per_param: float  # over the whole model
    size_gb: float
    ratio: float  # fraction of the baseline (FP16) bytes removed

    def as_dict(self) -> dict:
        return asdict(self)


def storage(model: nn.Module, layers: dict[str, QuantSpec], other_bits: int = 16,
            baseline_bits: int = 16) -> StorageReport:
    """Storage of `model` when the linears in `layers` (full module names) use their specs.
    Tied parameters count once (model.parameters() deduplicates them)."""
    modules = dict(model.named_modules())
    quant_bits = 0
    quant_params = set()
    n_quant = 0
    for name, spec in layers.items():
        lin = modules[name]
        out_f, in_f = lin.weight.shape
        quant_bits += linear_bits(out_f, in_f, spec)
        quant_params.add(id(lin.weight))
        n_quant += out_f * in_f
    n_params = 0
    other_bits_total = 0
    for p in model.parameters():
        n_params += p.numel()
        if id(p) not in quant_params:
            other_bits_total += p.numel() * other_bits
    quant_bytes = math.ceil(quant_bits / 8)
    other_bytes = math.ceil(other_bits_total / 8)
    total = quant_bytes + other_bytes
    return StorageReport(
        total_bytes=total, quant_bytes=quant_bytes, other_bytes=other_bytes, n_quant_weights=n_quant,
        n_params=n_params, bits_per_weight=quant_bits / n_quant if n_quant else math.nan,
        bits_per_param=8 * total / n_params, size_gb=total / 1e9,
        ratio=1.0 - total / (n_params * baseline_bits / 8))
