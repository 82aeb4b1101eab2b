"""Quantize a GGUF with llama.cpp's own quantizer (llama_model_quantize via llama-cpp-python).

The scheme names are llama.cpp's (`llama-quantize --help`). Its per-tensor rules apply unchanged:
k-quant mixes (Q4_K_M, ...) put some tensors at higher precision, and rows whose length is not a
multiple of 256 fall back to a legacy or IQ4_NL type. `fileinfo.read_gguf` shows what happened.
IQ2_* / IQ1_* (and Q2_K_S) refuse to run without an importance matrix; pass one (see imatrix.py).
"""

from __future__ import annotations

import ctypes
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mpt_utils.errors import MPTError
from mpt_utils.native import in_child, run_isolated

# scheme -> (llama_ftype, nominal bits for the paper's bit axis)
SCHEMES: dict[str, tuple[int, float]] = {
    "F32": (0, 32), "F16": (1, 16), "BF16": (32, 16), "Q8_0": (7, 8),
    "Q6_K": (18, 6), "Q5_K_M": (17, 5), "Q5_K_S": (16, 5), "Q5_1": (9, 5), "Q5_0": (8, 5),
    "Q4_K_M": (15, 4), "Q4_K_S": (14, 4), "Q4_1": (3, 4), "Q4_0": (2, 4), "IQ4_NL": (25, 4), "IQ4_XS": (30, 4),
    "Q3_K_L": (13, 3), "Q3_K_M": (12, 3), "Q3_K_S": (11, 3), "IQ3_M": (27, 3), "IQ3_S": (26, 3),
    "IQ3_XS": (22, 3), "IQ3_XXS": (23, 3),
    "Q2_K": (10, 2), "Q2_K_S": (21, 2), "IQ2_M": (29, 2), "IQ2_S": (28, 2), "IQ2_XS": (20, 2),
    "IQ2_XXS": (19, 2), "IQ1_M": (31, 1), "IQ1_S": (24, 1),
}
NEEDS_IMATRIX = {"IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S", "Q2_K_S"}


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise MPTError(f"unknown GGUF scheme {scheme!r}", f"use one of: {', '.join(SCHEMES)}")
    return scheme


def llama_ftype_constants() -> dict[str, int]:
    """llama.cpp's own LLAMA_FTYPE_* values (call it through `run_isolated`: it loads the library)."""
    llama_cpp = _llama_cpp()
    return {name: int(getattr(llama_cpp, name)) for name in dir(llama_cpp) if name.startswith("LLAMA_FTYPE_")}


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise MPTError("GGUF quantization needs llama-cpp-python",
                       "pip install llama-cpp-python (compiles ~6 min on 2 cores) or `make setup`") from None
    return llama_cpp


def _imatrix_array(llama_cpp, imatrix: dict[str, np.ndarray]):
    """A NULL-terminated llama_model_imatrix_data[] plus the buffers it points into (keep them alive)."""
    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    keep = []
    for i, (name, values) in enumerate(sorted(imatrix.items())):
        arr = np.ascontiguousarray(values, dtype=np.float32)
        cname = ctypes.create_string_buffer(name.encode())
        keep += [arr, cname]
        entries[i].name = ctypes.cast(cname, ctypes.c_char_p)
        entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = arr.size
    return entries, keep


@dataclass
class QuantizeReport:
    scheme: str
    seconds: float
    fallbacks: list[str] = field(default_factory=list)  # llama.cpp's own "falling back" lines
    log_tail: str = ""


@contextmanager
def _captured_log(llama_cpp, lines: list[str]):
    """Route llama.cpp's log into `lines` (its fallback warnings become data, not stderr noise)."""

    @llama_cpp.llama_log_callback
    def collect(_level, text, _user):
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield
    finally:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def quantize_gguf(src: str | os.PathLike, dst: str | os.PathLike, scheme: str, *, n_threads: int | None = None,
                  imatrix: dict[str, np.ndarray] | None = None, isolate: bool = True) -> QuantizeReport:
    """Write `dst` = `src` quantized to `scheme` by llama.cpp, in a child process unless `isolate=False`
    (a native fault then becomes an MPTError naming the signal and the file)."""
    check_scheme(scheme)
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise MPTError(f"GGUF file {src} does not exist", "export the model first (export_gguf)")
    if scheme in NEEDS_IMATRIX and not imatrix:
        raise MPTError(f"llama.cpp refuses {scheme} without an importance matrix",
                       "pass imatrix=imatrix_from_stats(...) (see mpt_utils.quant.gguf.imatrix)")
    if isolate and not in_child():
        return run_isolated("mpt_utils.quant.gguf.quantize:quantize_gguf",
                            {"src": str(src), "dst": str(dst), "scheme": scheme, "n_threads": n_threads,
                             "imatrix": imatrix, "isolate": False}, what=f"{src} -> {scheme}")
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = SCHEMES[scheme][0]
    params.nthread = n_threads or os.cpu_count() or 1
    keep = None
    if imatrix:
        entries, keep = _imatrix_array(llama_cpp, imatrix)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial")
    lines: list[str] = []
    start = time.perf_counter()
    with _captured_log(llama_cpp, lines):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    seconds = time.perf_counter() - start
    del keep
    log = "".join(lines)
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        errors = [ln.strip() for ln in log.splitlines() if "error" in ln.lower() or "failed" in ln.lower()]
        raise MPTError(f"llama.cpp failed to quantize {src.name} to {scheme} (code {rc}): "
                       f"{' | '.join(errors[-3:]) or log[-300:]}",
                       "check that the input is a valid F32/F16 GGUF of a llama.cpp architecture")
    os.replace(tmp, dst)
    fallbacks = [" ".join(ln.split()) for ln in log.splitlines() if "falling back" in ln]
    return QuantizeReport(scheme, seconds, fallbacks, log[-2000:])
