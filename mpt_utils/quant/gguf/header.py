"""A fast reader of a GGUF file's header: its metadata keys and its tensor table, nothing else.

`gguf.GGUFReader` builds a numpy view per metadata item, so one parse of a file carrying a 49k-token
vocabulary and its merges takes ~5 s, and every GGUF point parsed files five times (size check, bits,
the tokenizer copied into each export). This reader walks the same layout with `struct` over a
memory map (~0.1 s): the fixed header (magic, version, tensor and key counts), every key with its
typed value (numeric arrays as numpy arrays, strings as the raw UTF-8 bytes the file holds, so a
copied value is written back byte for byte), then each tensor's name, shape, ggml type and offset.
Little-endian files only (what llama.cpp writes); anything else, or a truncated or damaged header,
raises `MPTError`.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from mpt_utils.errors import MPTError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_SCALAR = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
           GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
           GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
           GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}
_DTYPE = {t: np.dtype(fmt) for t, fmt in _SCALAR.items()}


@dataclass(frozen=True)
class Field:
    """One metadata key: its value type, its value (a number, bool, the string's bytes, or for an
    array a numpy array / a list of bytes) and for an array its items' type."""

    type: GGUFValueType
    value: Any
    item_type: GGUFValueType | None = None

    def contents(self) -> Any:
        """The value as `GGUFReader`'s `contents()` gives it: strings decoded, arrays as lists."""
        if self.type == GGUFValueType.STRING:
            return self.value.decode("utf-8")
        if self.type != GGUFValueType.ARRAY:
            return self.value
        if self.item_type == GGUFValueType.STRING:
            return [v.decode("utf-8") for v in self.value]
        return self.value.tolist() if isinstance(self.value, np.ndarray) else list(self.value)


@dataclass(frozen=True)
class Tensor:
    """One entry of the tensor table: `shape` in GGUF order (fastest dimension first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int

    @property
    def type_name(self) -> str:
        return GGMLQuantizationType(self.ggml_type).name

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def n_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(self.ggml_type)]
        return self.n_elements // block * size


@dataclass
class Header:
    path: str
    version: int
    fields: dict[str, Field] = field(default_factory=dict)
    tensors: list[Tensor] = field(default_factory=list)
    data_offset: int = 0  # where the tensor data starts (aligned)


class _Cursor:
    def __init__(self, buf: Any):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> bytes:
        n = self.scalar("<Q")
        end = self.pos + n
        if end > len(self.buf):
            raise struct.error(f"a string of {n} bytes runs past the end of the file")
        out = bytes(self.buf[self.pos:end])
        self.pos = end
        return out

    def value(self, vtype: GGUFValueType) -> tuple[Any, GGUFValueType | None]:
        if vtype == GGUFValueType.STRING:
            return self.string(), None
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype]), None
        if vtype != GGUFValueType.ARRAY:
            raise ValueError(f"unknown metadata value type {int(vtype)}")
        item = GGUFValueType(self.scalar("<I"))
        count = self.scalar("<Q")
        if item in _DTYPE:
            size = _DTYPE[item].itemsize * count
            if self.pos + size > len(self.buf):
                raise struct.error(f"an array of {count} items runs past the end of the file")
            arr = np.frombuffer(self.buf, _DTYPE[item], count, self.pos).copy()
            self.pos += size
            return arr, item
        return [self.value(item)[0] for _ in range(count)], item


def read_header(path: str | os.PathLike) -> Header:
    """The metadata and tensor table of the GGUF at `path` (module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise MPTError(f"GGUF file {p} does not exist", "export or quantize it first")
    try:
        with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(str(p), mm)
    except MPTError:
        raise
    except (struct.error, ValueError, OverflowError, KeyError) as err:
        raise MPTError(f"{p} is not a readable GGUF file: {type(err).__name__}: {str(err)[:160]}",
                       "re-export or re-download the file") from None


def _parse(path: str, buf: Any) -> Header:
    if bytes(buf[:4]) != MAGIC:
        raise ValueError("no GGUF magic at the start")
    cur = _Cursor(buf)
    cur.pos = 4
    version = cur.scalar("<I")
    if version not in (2, 3):  # a big-endian file reads as a huge version
        raise ValueError(f"GGUF version {version} (only little-endian versions 2 and 3 are read)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    header = Header(path, version)
    for _ in range(n_kv):
        key = cur.string().decode("utf-8")
        vtype = GGUFValueType(cur.scalar("<I"))
        value, item = cur.value(vtype)
        header.fields[key] = Field(vtype, value, item)
    for _ in range(n_tensors):
        name = cur.string().decode("utf-8")
        dims = tuple(cur.scalar("<Q") for _ in range(cur.scalar("<I")))
        header.tensors.append(Tensor(name, dims, cur.scalar("<I"), cur.scalar("<Q")))
    align = header.fields.get("general.alignment")
    alignment = int(align.value) if align is not None else DEFAULT_ALIGNMENT
    header.data_offset = -(-cur.pos // alignment) * alignment
    return header


__all__ = ["Field", "Header", "Tensor", "read_header"]
