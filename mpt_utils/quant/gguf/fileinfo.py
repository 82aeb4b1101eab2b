"""What a GGUF file really holds: size on disk, bits per weight, tensor types (fallbacks visible)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mpt_utils.errors import MPTError
from mpt_utils.quant.gguf.header import read_header


@dataclass
class GGUFInfo:
    path: str
    file_bytes: int
    tensor_bytes: int
    n_params: int
    bits_per_weight: float  # all tensor bytes x 8 / all parameters (norms and embeddings included)
    matrix_bits_per_weight: float  # the same over 2-D tensors only
    file_type: int | None
    type_counts: dict[str, int] = field(default_factory=dict)  # tensors per ggml type
    type_params: dict[str, int] = field(default_factory=dict)  # parameters per ggml type
    tensor_types: dict[str, str] = field(default_factory=dict)  # tensor name -> ggml type

    @property
    def size_gb(self) -> float:
        return self.file_bytes / 1e9

    def as_dict(self) -> dict:
        return {**asdict(self), "size_gb": self.size_gb}

    def summary(self) -> str:
        """'Q4_K:60 Q5_0:150 F32:61' style, largest parameter share first."""
        order = sorted(self.type_params, key=lambda t: -self.type_params[t])
        return " ".join(f"{t}:{self.type_counts[t]}" for t in order)


def read_gguf(path: str | os.PathLike) -> GGUFInfo:
    """Parse `path`'s header (`header.read_header`); a missing, truncated or corrupt file raises MPTError."""
    p = Path(path)
    header = read_header(p)
    counts: Counter = Counter()
    params: Counter = Counter()
    types = {}
    total_bytes = n_params = mat_bytes = mat_params = 0
    for t in header.tensors:
        kind = t.type_name
        n = t.n_elements
        counts[kind] += 1
        params[kind] += n
        types[t.name] = kind
        total_bytes += int(t.n_bytes)
        n_params += n
        if len(t.shape) > 1:
            mat_bytes += int(t.n_bytes)
            mat_params += n
    if p.stat().st_size < header.data_offset + total_bytes:
        raise MPTError(f"{p} is truncated: {p.stat().st_size} bytes on disk, tensors need {total_bytes}",
                       "re-export or re-download the file")
    ftype_field = header.fields.get("general.file_type")
    return GGUFInfo(path=str(p), file_bytes=p.stat().st_size, tensor_bytes=total_bytes, n_params=n_params,
                    bits_per_weight=8 * total_bytes / max(n_params, 1),
                    matrix_bits_per_weight=8 * mat_bytes / max(mat_params, 1),
                    file_type=int(ftype_field.contents()) if ftype_field is not None else None,
                    type_counts=dict(counts), type_params=dict(params), tensor_types=types)
