"""LLM.int8(): vector-wise int8 matrix multiplication with a mixed-precision decomposition of the
activation outlier features.

Reference: "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale", T. Dettmers, M. Lewis,
Y. Belkada, L. Zettlemoyer, arXiv:2208.07339 (NeurIPS 2022); code
github.com/bitsandbytes-foundation/bitsandbytes (`nn.Linear8bitLt`, `autograd/_functions.py`
`MatMul8bitLt`, `backends/default/ops.py`: `int8_vectorwise_quant`, `int8_mixed_scaled_mm`).

Weights: int8 codes per output row, round(127·W_ij / max_j |W_ij|), with an fp32 absmax per row
(bitsandbytes' `CB` and `SCB`). At every forward call, on the call's input X [tokens, in]:
- the outlier feature dimensions O are the input columns with some |X_tj| >= `threshold` (6.0, the
  paper's α and bitsandbytes' `llm_int8_threshold`);
- the other columns are quantized per token (row of X) to int8 by their absmax and multiplied with the
  int8 weight codes; the product is rescaled by the outer product of both absmax vectors / 127²;
- the outlier columns are multiplied in the model's precision (fp16 in the paper) with the matching
  weight columns and added. As in bitsandbytes' inference setting (`has_fp16_weights=False`, what
  `load_in_8bit` uses), those weight columns are the int8 rows de-quantized: the model stores only
  int8 weights. `fp16_weights=True` uses the original weights there, the paper's Fig. 2 formulation
  and bitsandbytes' `has_fp16_weights=True`, which keeps an fp16 copy of the weights (counted in the
  storage).
The token absmax is taken over the regular columns only, the paper's decomposition; bitsandbytes'
kernel takes it after zeroing only the outlier entries, so its scale can also see the small entries of
outlier columns (a kernel detail that can only coarsen its grid). The int8 products are accumulated
in float32 here (int32 in the kernels; equal while a dot product stays below 2^24). The decomposition
is decided per call over all tokens of the batch, as in the library. Calibration-free; lm_head and
embeddings stay in high precision (bitsandbytes' `llm_int8_skip_modules` default).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from mpt_utils.errors import MPTError
from mpt_utils.quant import GRID, QUANTIZERS
from mpt_utils.quant._blockwise import AbsmaxSpec, check_fixed
from mpt_utils.quant.rtn import block_linears

QMAX = 127.0


def int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise (vector-wise) int8 codes of a 2-D `x` (as float) and each row's fp32 absmax."""
    absmax = x.float().abs().amax(dim=1)
    codes = torch.round(x.float() * (QMAX / absmax.clamp_min(1e-30)).unsqueeze(1))
    return codes, absmax


class Int8MixedLinear(nn.Linear):
    """A linear whose forward is LLM.int8()'s decomposed matmul. `weight` holds the de-quantized int8
    weight (what every reader of the model sees); the codes and row absmax are buffers."""

    quantizes_activations = True  # its forward is more than its weights: a checkpoint cannot hold it

    def __init__(self, linear: nn.Linear, threshold: float, fp16_weights: bool):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device="meta")
        w = linear.weight.detach()
        codes, absmax = int8_rows(w)
        self.threshold = float(threshold)
        self.register_buffer("codes", codes.to(torch.int8), persistent=False)
        self.register_buffer("row_absmax", absmax, persistent=False)
        self.register_buffer("fp16_weight", w.clone() if fp16_weights else None, persistent=False)
        self.weight = nn.Parameter((codes * (absmax / QMAX).unsqueeze(1)).to(w.dtype), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.last_outliers = torch.empty(0, dtype=torch.long)  # outlier columns of the latest call

    def outlier_columns(self, a: torch.Tensor) -> torch.Tensor:
        """Mask of the input columns holding an activation of magnitude >= threshold (0: none)."""
        if self.threshold <= 0:
            return torch.zeros(a.shape[1], dtype=torch.bool, device=a.device)
        return (a.abs() >= self.threshold).any(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.reshape(-1, self.in_features).float()
        outliers = self.outlier_columns(a)
        self.last_outliers = outliers.nonzero().flatten().cpu()
        xq, x_absmax = int8_rows(a.masked_fill(outliers, 0.0))
        out = (xq @ self.codes.float().t()) * torch.outer(x_absmax, self.row_absmax) / (QMAX * QMAX)
        if bool(outliers.any()):
            w = self.fp16_weight if self.fp16_weight is not None else self.weight
            out = out + a[:, outliers] @ w[:, outliers].float().t()
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold}, fp16_weights={self.fp16_weight is not None}"


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@QUANTIZERS.register("llm_int8", version=1, display="LLM.int8()", calibration=False, fixed_bits=8,
                     sources=("mpt_utils.quant._blockwise", *GRID))
@torch.no_grad()
def llm_int8(model: nn.Module, *, bits: int = 8, group_size: int | None = None, sym: bool = True,
             calib_ids=None, device: str | None = None, progress: bool = True, threshold: float = 6.0,
             fp16_weights: bool = False):
    """Replace every decoder-block linear of `model` by an `Int8MixedLinear` (int8 row-wise weights,
    per-token int8 activations, outlier features >= `threshold` in the model's precision; 0 turns the
    decomposition off: pure vector-wise int8). `calib_ids`, `device` and `progress` are ignored."""
    from mpt_utils.quant import QuantResult

    check_fixed("llm_int8", bits, 8, sym)
    if group_size not in (None, 0, -1):
        raise MPTError("LLM.int8() quantizes weights per output row", "leave group_size=None (the default)")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        raise MPTError(f"threshold={threshold!r} is invalid",
                       "use 6.0 (the paper's and bitsandbytes' default), or 0 for no decomposition")
    spec = AbsmaxSpec(8, None, True, codebook="int8", fp16_copy=bool(fp16_weights))
    start = time.perf_counter()
    layers = {}
    for name, lin in block_linears(model).items():
        _replace(model, name, Int8MixedLinear(lin, threshold, fp16_weights).to(lin.weight.device))
        layers[name] = spec
    return QuantResult("llm_int8", spec, layers, time.perf_counter() - start, act_bits=8,
                       extra={"threshold": float(threshold), "fp16_weights": bool(fp16_weights)})
