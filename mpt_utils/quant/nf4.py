"""NF4: 4-bit NormalFloat with blockwise absmax scaling and double quantization (QLoRA's format).

Reference: "QLoRA: Efficient Finetuning of Quantized LLMs", T. Dettmers, A. Pagnoni, A. Holtzman,
L. Zettlemoyer, arXiv:2305.14314 (NeurIPS 2023); code github.com/artidoro/qlora, the format itself in
bitsandbytes, github.com/bitsandbytes-foundation/bitsandbytes (`functional.py`: `get_4bit_type`,
`quantize_4bit`, `quantize_blockwise`; `backends/default/ops.py`: the reference kernels).

Each block of 64 consecutive weights (of the flattened matrix) is divided by its absmax and rounded to
the nearest of the 16 NF4 levels, quantiles of N(0, 1) with an exact zero (`_blockwise.NF4_LEVELS`).
Double quantization, on by default as in QLoRA (`bnb_4bit_use_double_quant=True`) and in bitsandbytes'
`Linear4bit(compress_statistics=True)`, stores the fp32 absmax constants as 8-bit codes in blocks of
256: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits per weight instead of 4.5. `double_quant=False` keeps fp32
constants. Calibration-free; simulated (the weights hold the de-quantized values); the storage the
format really takes comes from `AbsmaxSpec.storage_bits`.
"""

from __future__ import annotations

from torch import nn

from mpt_utils.quant import GRID, QUANTIZERS
from mpt_utils.quant._blockwise import quantize_codebook


@QUANTIZERS.register("nf4", version=1, display="NF4", calibration=False, fixed_bits=4, paper_name="QLoRA_NF4",
                     sources=("mpt_utils.quant._blockwise", *GRID))
def nf4(model: nn.Module, *, bits: int = 4, group_size: int | None = 64, sym: bool = True,
        calib_ids=None, device: str | None = None, progress: bool = True, double_quant: bool = True):
    """NF4 in place on every decoder-block linear, blocks of `group_size` (bitsandbytes' 64), with
    `double_quant` of the absmax constants (QLoRA's default). `calib_ids`, `device` and `progress` are
    accepted for the shared signature and ignored."""
    return quantize_codebook(model, "nf4", "nf4", bits=bits, group_size=group_size, sym=sym,
                             double_quant=double_quant)
