"""Quantization family: simulated torch methods (RTN, GPTQ, AWQ, SmoothQuant; the fixed formats NF4,
FP4 and LLM.int8()) and real GGUF files.

Every torch quantizer has one signature and quantizes the decoder-block linears in place:

    fn(model, *, bits, group_size=128, sym=False, calib_ids=None, device=None, progress=True, **options)
        -> QuantResult

Pick one by name with `QUANTIZERS.get(name)` or call `quantize(model, name, ...)`. The storage the
format would really take (codes + scales + zero points) comes from `mpt_utils.quant.size`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mpt_utils.errors import MPTError
from mpt_utils.registry import Registry

if TYPE_CHECKING:
    from mpt_utils.quant.rtn import QuantSpec


@dataclass
class QuantResult:
    """What a quantizer did: the default spec, the spec of every quantized linear (full module name),
    the activation bits if activations are fake-quantized too, and the wall time."""

    method: str
    spec: QuantSpec
    layers: dict[str, QuantSpec]
    seconds: float
    act_bits: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# what `quantize` passes itself: the rest of a quantizer's keyword parameters are its options
ENGINE_ARGS = ("model", "bits", "group_size", "sym", "calib_ids", "device", "progress")
# Every module of this package is imported on first lookup; each quantizer module registers itself with
# `@QUANTIZERS.register(name, version=, display=, calibration=)`. `fixed_bits`: the one bit width of a
# fixed format (NF4: 4, LLM.int8(): 8), which sweeps and tables use instead of a bit-width list.
QUANTIZERS: Registry = Registry("quantizer", ENGINE_ARGS, family="quant", package=__name__,
                                traits={"fixed_bits": None})
GRID = ("mpt_utils.quant.rtn",)  # the quantization grid every torch quantizer rounds onto


_UNSET: Any = object()


def quantize(model: torch.nn.Module, method: str, *, bits: int, group_size: int | None = _UNSET,
             sym: bool = _UNSET, calib_ids: torch.Tensor | None = None, device: str | None = None,
             progress: bool = True, **options) -> QuantResult:
    """Quantize `model` in place with the registered method `method`. `group_size` / `sym` left
    out take the method's own default (g128 asymmetric for RTN/GPTQ/AWQ, per-channel symmetric
    for SmoothQuant)."""
    fn = QUANTIZERS.get(method)
    QUANTIZERS.check_options(method, options)
    if QUANTIZERS.info(method).calibration and calib_ids is None and options.get("stats") is None:
        raise MPTError(f"{method} needs calibration data", "pass calib_ids=calibration_windows(tokenizer, ...)")
    given = {k: v for k, v in (("group_size", group_size), ("sym", sym)) if v is not _UNSET}
    return fn(model, bits=bits, calib_ids=calib_ids, device=device, progress=progress, **given, **options)


def __getattr__(attr: str):  # QuantSpec lives in rtn, which registers into QUANTIZERS: imported on first use
    if attr == "QuantSpec":
        from mpt_utils.quant.rtn import QuantSpec

        return QuantSpec
    raise AttributeError(attr)


__all__ = ["QUANTIZERS", "QuantResult", "QuantSpec", "quantize"]
