"""Three sizes of one compressed model, side by side: the paper's count, the real file, a sparse format.

They disagree, and the disagreement is a finding, not noise: the paper's compression axis counts
pruned zeros as free and quantized weights at their nominal bits, while a file written today stores
the zeros (and a low-rank model, exported to llama.cpp, stores its dense product).

- `nominal_bytes`: `mpt_utils.compression_axis.weight_bytes` (pruned zeros free, quantized block
  linears at their nominal storage, every other parameter at `dense_dtype_bytes`). For a model that
  ends in a GGUF scheme (`gguf_scheme`), each decoder-block linear instead costs the scheme's nominal
  bits (`quantize.SCHEMES`, e.g. Q4_K_M = 4) per non-zero weight, no block scales: the Perspective's
  bit axis. The rest is counted as compression_axis counts it.
- `artifact_bytes`: what is really written. For a GGUF, the file's size on disk (`read_gguf`: tensors,
  metadata, tokenizer and alignment). For a torch model, the bytes of its state-dict tensors in a dense
  safetensors-like layout: every stored tensor once (tied ones once), all elements including zeros,
  floating tensors at `dtype_bytes` each (default 2: an fp16/bf16 checkpoint; None: the dtype held),
  others at their own element size. The safetensors JSON header (a few kB) is not counted. Low-rank
  factors count as the two factors they are; simulated quantization stores floats, at `dtype_bytes`.
- `sparse_bytes`: a sparse encoding a runtime could load (SPARSE_ENCODING). Each decoder-block linear
  [out, in] is stored in the smaller of two forms:
    dense form:  every weight at its bit width b (the linear's nominal storage with its zeros paid:
                 out·in·b bits, or `quant.size.linear_bits` for a torch-quantized linear, scales
                 included), ceil(bits / 8) bytes;
    masked form: a 1-bit-per-weight presence bitmask, ceil(out·in / 8) bytes, plus the non-zero values
                 at width b (and a quantized linear's scales), ceil(nominal bits / 8) bytes.
  Everything else is dense, exactly as in `nominal_bytes`. So sparse − nominal is the price of
  indexing the zeros: per linear min(mask, zeros·b) (rounded up per buffer), at most 1 bit per weight.
  b is the same as in `nominal_bytes`: `dense_dtype_bytes`·8, the torch quantizer's bits, or the GGUF
  scheme's nominal bits.

Nominal and sparse bytes describe the model as the torch steps left it (a low-rank model's two
factors); the artifact is what the written file holds (for a GGUF, the dense product of the factors,
see `mpt_utils.combined.export`). Where they part is the honest-size finding.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from mpt_utils.compression_axis import QuantizedLinear, quantized_layers, weight_bytes
from mpt_utils.errors import MPTError

SPARSE_ENCODING = ("per decoder-block linear, the smaller of: dense (all weights at b bits) or a 1-bit "
                   "presence bitmask + the non-zero values at b bits; everything else dense")
SIZE_METRICS = ("nominal_bytes", "artifact_bytes", "sparse_bytes")


@dataclass(frozen=True)
class LinearCount:
    """What one decoder-block linear holds, for the nominal and sparse counts."""

    name: str
    numel: int
    zeros: int  # weights stored as zero (pruned); for a torch-quantized linear, zeros before quantizing
    bits: float  # b: the width each stored value takes
    dense_bits: float  # every weight at b (a quantized linear: its full nominal storage, scales included)

    @property
    def nominal_bits(self) -> float:
        """The paper's count: the dense form less the zeros, which are free."""
        return self.dense_bits - self.zeros * self.bits

    @property
    def mask_bytes(self) -> int:
        return math.ceil(self.numel / 8)

    @property
    def sparse_bytes(self) -> int:
        """Bytes in the sparse encoding: the smaller of the dense and the masked form."""
        return min(math.ceil(self.dense_bits / 8), self.mask_bytes + math.ceil(self.nominal_bits / 8))


@dataclass(frozen=True)
class Sizes:
    """The three sizes of one model (bytes) and what they were counted from."""

    nominal_bytes: float
    artifact_bytes: int
    sparse_bytes: float
    other_bytes: float  # every parameter outside the decoder-block linears, dense (part of nominal/sparse)
    artifact: str  # "gguf" (a file's size on disk) or "torch" (dense state-dict tensors)
    gguf_scheme: str | None = None
    dense_dtype_bytes: float = 2

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rows(self, dense: Sizes | None = None, **extra: Any) -> list[dict[str, Any]]:
        """Tidy rows, one per size (metric, value), plus with `dense` (the dense model's `Sizes`) the
        fraction of the dense bytes each one removes ("compression_nominal", ...). The artifact ratio
        is only given against a dense artifact of the same kind (a GGUF against a GGUF)."""
        tag = {"artifact": self.artifact, "gguf_scheme": self.gguf_scheme, "sparse_encoding": SPARSE_ENCODING,
               **extra}
        rows = [{"metric": m, "value": float(getattr(self, m)), **tag} for m in SIZE_METRICS]
        if dense is not None:
            for m in SIZE_METRICS:
                if m == "artifact_bytes" and dense.artifact != self.artifact:
                    continue
                ref = float(getattr(dense, m))
                rows.append({"metric": f"compression_{m.removesuffix('_bytes')}",
                             "value": 1.0 - float(getattr(self, m)) / ref if ref > 0 else math.nan, **tag})
        return rows


def gguf_bits(scheme: str) -> float:
    """A GGUF scheme's nominal bits per weight (the paper's bit axis), e.g. Q4_K_M -> 4."""
    from mpt_utils.quant.gguf.quantize import SCHEMES, check_scheme

    return float(SCHEMES[check_scheme(scheme)][1])


@torch.no_grad()
def linear_counts(model: nn.Module, *, gguf_scheme: str | None = None, dense_dtype_bytes: float = 2,
                  quantized: Mapping[str, QuantizedLinear] | None = None) -> list[LinearCount]:
    """Every decoder-block linear with its zeros and bit width, as `nominal_bytes` counts them.
    `quantized`: the torch-quantized specs (default: those `mark_quantized` recorded on the model)."""
    from mpt_utils.quant.rtn import block_linears
    from mpt_utils.quant.size import linear_bits

    record = quantized_layers(model) if quantized is None else dict(quantized)
    if gguf_scheme is not None and record:
        raise MPTError(f"the model is already quantized in torch ({len(record)} linears) and also ends in "
                       f"GGUF scheme {gguf_scheme}", "count a model with one quantization step (a recipe allows one)")
    scheme_bits = gguf_bits(gguf_scheme) if gguf_scheme is not None else None
    out = []
    for name, lin in block_linears(model).items():
        w = lin.weight
        numel = w.numel()
        q = record.get(name)
        if q is not None:
            out.append(LinearCount(name, numel, q.pruned, float(q.spec.bits),
                                   float(linear_bits(w.shape[0], w.shape[1], q.spec))))
            continue
        bits = scheme_bits if scheme_bits is not None else 8.0 * dense_dtype_bytes
        out.append(LinearCount(name, numel, numel - int(torch.count_nonzero(w)), bits, numel * bits))
    return out


def nominal_bytes(model: nn.Module, *, gguf_scheme: str | None = None, dense_dtype_bytes: float = 2) -> float:
    """The paper's accounting (module docstring): `compression_axis.weight_bytes`, with the block
    linears at the GGUF scheme's nominal bits when the model ends in one."""
    wb = weight_bytes(model, dense_dtype_bytes)
    if gguf_scheme is None:
        return wb.total
    counts = linear_counts(model, gguf_scheme=gguf_scheme, dense_dtype_bytes=dense_dtype_bytes)
    return wb.total - wb.block_linear + sum(c.nominal_bits for c in counts) / 8


def sparse_bytes(model: nn.Module, *, gguf_scheme: str | None = None, dense_dtype_bytes: float = 2) -> float:
    """Bytes of the sparse encoding of the module docstring (SPARSE_ENCODING)."""
    wb = weight_bytes(model, dense_dtype_bytes)
    counts = linear_counts(model, gguf_scheme=gguf_scheme, dense_dtype_bytes=dense_dtype_bytes)
    return wb.total - wb.block_linear + sum(c.sparse_bytes for c in counts)


def torch_artifact_bytes(model: nn.Module, dtype_bytes: float | None = 2) -> int:
    """Bytes of the model's state-dict tensors written densely (module docstring): each stored tensor
    once, zeros included, floating tensors at `dtype_bytes` (None: as held)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    total = 0.0
    for tensor in model.state_dict(keep_vars=True).values():
        t = tensor.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:  # tied (e.g. embeddings shared with the head): written once
            continue
        seen.add(key)
        size = dtype_bytes if t.is_floating_point() and dtype_bytes is not None else t.element_size()
        total += t.numel() * size
    return math.ceil(total)


def gguf_file_bytes(path: str | os.PathLike) -> int:
    """A GGUF's real size on disk (validated by `read_gguf`, so a truncated file is an error)."""
    from mpt_utils.quant.gguf.fileinfo import read_gguf

    return read_gguf(path).file_bytes


def scheme_of_file(path: str | os.PathLike) -> str | None:
    """The scheme a GGUF's `general.file_type` names (None when absent or not in SCHEMES)."""
    from mpt_utils.quant.gguf.fileinfo import read_gguf
    from mpt_utils.quant.gguf.quantize import SCHEMES

    ftype = read_gguf(path).file_type
    return next((name for name, (code, _) in SCHEMES.items() if code == ftype), None)


def model_sizes(model: nn.Module, *, gguf_path: str | os.PathLike | None = None, gguf_scheme: str | None = None,
                dense_dtype_bytes: float = 2, artifact_dtype_bytes: float | None = 2) -> Sizes:
    """The three sizes of `model` as compressed. With `gguf_path` (the file the model was exported and
    quantized to), the artifact is that file and the nominal/sparse widths are its scheme's nominal
    bits (`gguf_scheme`, read from the file's type when not given); else the artifact is the torch
    model's dense tensors at `artifact_dtype_bytes`."""
    if gguf_path is not None and gguf_scheme is None:
        gguf_scheme = scheme_of_file(gguf_path)
        if gguf_scheme is None:
            raise MPTError(f"cannot tell the GGUF scheme of {gguf_path} from its file type",
                           "pass gguf_scheme= (the scheme it was quantized to)")
    if gguf_scheme is not None and gguf_path is None:
        raise MPTError(f"a GGUF scheme ({gguf_scheme}) without its file: the artifact size is the file's",
                       "pass gguf_path= (the quantized file), or count the torch model without gguf_scheme")
    wb = weight_bytes(model, dense_dtype_bytes)
    counts = linear_counts(model, gguf_scheme=gguf_scheme, dense_dtype_bytes=dense_dtype_bytes)
    other = wb.total - wb.block_linear
    nominal = wb.total if gguf_scheme is None else other + sum(c.nominal_bits for c in counts) / 8
    artifact = gguf_file_bytes(gguf_path) if gguf_path is not None else torch_artifact_bytes(model, artifact_dtype_bytes)
    return Sizes(nominal_bytes=float(nominal), artifact_bytes=int(artifact),
                 sparse_bytes=float(other + sum(c.sparse_bytes for c in counts)), other_bytes=float(other),
                 artifact="gguf" if gguf_path is not None else "torch", gguf_scheme=gguf_scheme,
                 dense_dtype_bytes=dense_dtype_bytes)


__all__ = ["SIZE_METRICS", "SPARSE_ENCODING", "LinearCount", "Sizes", "gguf_bits", "gguf_file_bytes",
           "linear_counts", "model_sizes", "nominal_bytes", "scheme_of_file", "sparse_bytes",
           "torch_artifact_bytes"]
