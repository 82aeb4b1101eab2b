"""One measured compression axis for every family: the fraction of the dense model's weight bytes removed.

Bytes are counted from the tensors the model holds, never from the requested ratio:

- a decoder-block linear weight (every `nn.Linear` inside a decoder block, as the quantizers see them:
  q/k/v/o, gate/up/down, a low-rank layer's two factors `up` and `down`, SliceGPT's shortcuts) costs
  `dense_dtype_bytes` per non-zero weight: zeros are pruned weights and cost nothing (the paper's
  accounting, no sparse-index overhead);
- a quantized block linear (recorded with `mark_quantized`) costs its nominal storage from
  `mpt_utils.quant.size.linear_bits` (b-bit codes + fp16 scale + zero point per group, + the act-order
  index), less `bits` for each weight that was already zero (pruned) before it was quantized: weights
  that rounding sends to zero are still paid for;
- every other parameter (embeddings, lm_head, norms, all biases) costs `dense_dtype_bytes` per element,
  zeros included. Tied parameters count once. Buffers count nothing.

`dense_dtype_bytes` is the storage of an unquantized weight (2 = fp16/bf16, the papers' reference),
whatever dtype the tensors are held in here. Structured pruning and low rank need no special case:
their smaller tensors are simply what the model holds.

The quantizers simulate (weights stay float tensors), so the specs of a quantized model live in the
`QuantResult` that `quantize` returns, not on the model; `mark_quantized` attaches them (the recipe layer
does it for its quantization step), or pass `quantized=` to `weight_bytes` / `compression`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from mpt_utils.errors import MPTError
from mpt_utils.quant.rtn import QuantSpec, block_linears
from mpt_utils.quant.size import linear_bits

QUANT_ATTR = "_mpt_quantized"  # model attribute: full linear name -> QuantizedLinear


@dataclass(frozen=True)
class QuantizedLinear:
    """How one block linear is stored: its spec, and how many of its weights were zero (pruned) before
    quantization, which the storage does not pay for."""

    spec: QuantSpec
    pruned: int = 0


@dataclass(frozen=True)
class WeightBytes:
    block_linear: float  # bytes of the decoder-block linear weight matrices
    total: float  # bytes of every parameter: block linears + embeddings, head, norms, biases
    n_params: int  # parameters the model holds (zeros included), for reference

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Compression:
    """Fraction of the dense model's weight bytes removed, over the decoder-block linears and over all."""

    block_linear: float
    total: float
    dense: WeightBytes
    compressed: WeightBytes

    def as_dict(self) -> dict[str, float]:
        return {"compression_block_linear": self.block_linear, "compression_total": self.total,
                "dense_bytes": self.dense.total, "compressed_bytes": self.compressed.total}


@torch.no_grad()
def zero_counts(model: nn.Module) -> dict[str, int]:
    """Zeros of every decoder-block linear weight, by full module name (taken before quantizing)."""
    return {name: int((lin.weight == 0).sum()) for name, lin in block_linears(model).items()}


def mark_quantized(model: nn.Module, layers: Mapping[str, QuantSpec], pruned: Mapping[str, int] | None = None
                   ) -> None:
    """Record on `model` that the linears in `layers` (a `QuantResult.layers`) are stored in their specs;
    `pruned`: zeros per linear before quantization (`zero_counts`), free in the storage."""
    pruned = pruned or {}
    record = dict(getattr(model, QUANT_ATTR, {}))
    record.update({name: QuantizedLinear(spec, int(pruned.get(name, 0))) for name, spec in layers.items()})
    # a plain attribute (not a buffer): deepcopy keeps it, state_dict and save_pretrained ignore it
    setattr(model, QUANT_ATTR, record)


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return dict(getattr(model, QUANT_ATTR, {}))


def _as_record(quantized: Mapping[str, QuantSpec | QuantizedLinear]) -> dict[str, QuantizedLinear]:
    return {n: q if isinstance(q, QuantizedLinear) else QuantizedLinear(q) for n, q in quantized.items()}


@torch.no_grad()
def weight_bytes(model: nn.Module, dense_dtype_bytes: float = 2,
                 quantized: Mapping[str, QuantSpec | QuantizedLinear] | None = None) -> WeightBytes:
    """Bytes `model`'s weights take under the accounting of the module docstring. `quantized` overrides
    the specs recorded on the model by `mark_quantized`."""
    record = _as_record(quantized) if quantized is not None else quantized_layers(model)
    linears = block_linears(model)
    stale = sorted(set(record) - set(linears))
    if stale:
        raise MPTError(f"quantization specs name {len(stale)} linears the model does not hold, e.g. {stale[0]!r}",
                       "pass the specs of this model's own quantization (QuantResult.layers)")
    weight_of = {id(lin.weight): name for name, lin in linears.items()}
    dense_bits = 8 * dense_dtype_bytes
    block_bits = other_bits = 0.0
    n_params = 0
    for p in model.parameters():  # deduplicated: a tied embedding counts once
        n_params += p.numel()
        name = weight_of.get(id(p))
        if name is None:
            other_bits += p.numel() * dense_bits
        elif name in record:
            q = record[name]
            block_bits += linear_bits(p.shape[0], p.shape[1], q.spec) - q.pruned * q.spec.bits
        else:
            block_bits += int(torch.count_nonzero(p)) * dense_bits
    return WeightBytes(block_bits / 8, (block_bits + other_bits) / 8, n_params)


def compression(dense: nn.Module | WeightBytes, compressed: nn.Module, dense_dtype_bytes: float = 2,
                quantized: Mapping[str, QuantSpec | QuantizedLinear] | None = None) -> Compression:
    """Fraction of the dense model's weight bytes that `compressed` no longer takes, both ways.
    `dense`: the dense model or its `weight_bytes` (computed once for a sweep)."""
    base = dense if isinstance(dense, WeightBytes) else weight_bytes(dense, dense_dtype_bytes)
    now = weight_bytes(compressed, dense_dtype_bytes, quantized)
    if base.block_linear <= 0 or base.total <= 0:
        raise MPTError("the dense model holds no decoder-block linear weights", "pass the dense model of this one")
    return Compression(1.0 - now.block_linear / base.block_linear, 1.0 - now.total / base.total, base, now)


__all__ = ["Compression", "QuantizedLinear", "WeightBytes", "compression", "mark_quantized",
           "quantized_layers", "weight_bytes", "zero_counts"]
