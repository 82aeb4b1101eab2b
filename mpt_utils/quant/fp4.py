"""FP4: bitsandbytes' 4-bit float (1 sign, 2 exponent, 1 mantissa bit) with blockwise absmax scaling,
the data type QLoRA compares NF4 against.

Reference: "QLoRA: Efficient Finetuning of Quantized LLMs", T. Dettmers, A. Pagnoni, A. Holtzman,
L. Zettlemoyer, arXiv:2305.14314 (NeurIPS 2023; FP4 vs NF4 in its Table 2 and Fig. 3); code
github.com/artidoro/qlora and github.com/bitsandbytes-foundation/bitsandbytes (`functional.py`:
`get_4bit_type("fp4")`, `quantize_4bit`; `backends/default/ops.py`).

Exactly NF4's machinery (`_blockwise`) with the FP4 levels {0, ±0.0625, ±2, ±3, ±4, ±6, ±8, ±12} / 12:
blocks of 64, fp32 absmax, double quantization of the constants on by default (bitsandbytes'
`Linear4bit(compress_statistics=True)` and QLoRA's setting); `double_quant=False` keeps fp32 constants.
Calibration-free and simulated.
"""

from __future__ import annotations

from torch import nn

from mpt_utils.quant import GRID, QUANTIZERS
from mpt_utils.quant._blockwise import quantize_codebook


@QUANTIZERS.register("fp4", version=1, display="FP4", calibration=False, fixed_bits=4, paper_name="QLoRA_FP4",
                     sources=("mpt_utils.quant._blockwise", *GRID))
def fp4(model: nn.Module, *, bits: int = 4, group_size: int | None = 64, sym: bool = True,
        calib_ids=None, device: str | None = None, progress: bool = True, double_quant: bool = True):
    """FP4 in place on every decoder-block linear, blocks of `group_size` (bitsandbytes' 64), with
    `double_quant` of the absmax constants. `calib_ids`, `device` and `progress` are ignored."""
    return quantize_codebook(model, "fp4", "fp4", bits=bits, group_size=group_size, sym=sym,
                             double_quant=double_quant)
