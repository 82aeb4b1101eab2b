"""The GGUF of a model compressed by a recipe's torch steps, for llama.cpp's own quantizer and evaluator.

`mpt_utils.quant.gguf.export.export_gguf` writes a llama.cpp file from a model whose decoder linears
are plain (or bias-free `nn.Sequential` factor pairs). A recipe's torch steps leave two things it
does not take as they are:

- low-rank layers (`mpt_utils.lowrank.factorized.LowRankLinear`): llama.cpp's llama graph has no
  factorized linear, so each is multiplied back to its dense [out, in] weight U·V. The GGUF then
  holds full-size matrices: the file does NOT shrink with the rank (an honest-size finding: on
  llama.cpp, low rank buys no bytes and no speed, only its damage). The export works on a copy
  that shares every other tensor with the model, so the model itself is left untouched;
- structured pruning: llama.cpp's llama architecture reads one head count, one KV head count and one
  FFN width for all layers from the file's header, so a model whose blocks were pruned to different
  widths (FLAP, LLM-Pruner; SliceGPT's rotated stream with shortcut matrices) cannot be described to
  it. Those are refused with one MPTError; uniform results (ShortGPT/SLEB dropping whole blocks, or
  any width pruning that left every block alike) export normally.

Unstructured and N:M pruned weights export as they are: the zeros are stored (see `sizes`).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from mpt_utils.errors import MPTError

STRUCTURED_FIX = ("llama.cpp's llama graph takes one head count and one FFN width for every layer: export a "
                  "uniform structured result (shortgpt / sleb remove whole blocks), or score this model in "
                  "torch (apply_recipe + PairedEvaluator) instead of through a GGUF")


def _lowrank_type() -> type[nn.Module]:
    from mpt_utils.lowrank.factorized import LowRankLinear

    return LowRankLinear


def has_lowrank(model: nn.Module) -> bool:
    kind = _lowrank_type()
    return any(isinstance(m, kind) for m in model.modules())


@torch.no_grad()
def dense_linear(layer: nn.Module) -> nn.Linear:
    """An nn.Linear computing what a `LowRankLinear` computes: weight U·V (in float32, then stored in
    the factors' dtype), the up factor's bias."""
    up, down = layer.up, layer.down
    weight = (up.weight.float() @ down.weight.float()).to(up.weight.dtype)
    out = nn.Linear(down.in_features, up.out_features, bias=up.bias is not None, device=weight.device,
                    dtype=weight.dtype)
    out.weight.copy_(weight)
    if up.bias is not None:
        out.bias.copy_(up.bias)
    return out


def dense_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose LowRankLinear modules are replaced by equivalent nn.Linear layers. Every
    other parameter and buffer is shared with `model`, not copied (a 7B export must not hold two
    models): only the module objects, config and the new dense weights are new."""
    from mpt_utils.lowrank.factorized import set_module

    kind = _lowrank_type()
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    clone = copy.deepcopy(model, memo=shared)
    for name in [n for n, m in clone.named_modules() if isinstance(m, kind)]:
        set_module(clone, name, dense_linear(clone.get_submodule(name)))
    return clone


def check_uniform_structure(model: nn.Module) -> None:
    """One MPTError when llama.cpp cannot represent the model's blocks: per-layer widths recorded by
    structured pruning (`config.mpt_structure`), SliceGPT's sliced blocks, or any block whose linear
    shapes differ from the header the export writes (heads·head_dim, KV heads, FFN width, hidden size)."""
    from mpt_utils.calibration import decoder_layers
    from mpt_utils.prune.structured.surgery import STRUCTURE_KEY
    from mpt_utils.quant.gguf.names import text_config

    cfg = text_config(model)
    record = getattr(cfg, STRUCTURE_KEY, None)
    if record:
        what = "SliceGPT's sliced residual stream" if record.get("slicegpt") else "per-layer widths"
        widths = sorted({(s.get("heads"), s.get("kv_heads"), s.get("intermediate")) for s in record.get("layers", [])})
        raise MPTError(f"cannot export a structured-pruned model with {what} to GGUF "
                       f"(layer (heads, kv_heads, ffn) shapes: {widths})", STRUCTURED_FIX)
    hidden = int(cfg.hidden_size)
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    want = {"self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv * head_dim, hidden),
            "self_attn.v_proj": (kv * head_dim, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
            "mlp.gate_proj": (int(cfg.intermediate_size), hidden), "mlp.up_proj": (int(cfg.intermediate_size), hidden),
            "mlp.down_proj": (hidden, int(cfg.intermediate_size))}
    lowrank = _lowrank_type()
    for i, block in enumerate(decoder_layers(model)):
        for sub, shape in want.items():
            try:
                module = block.get_submodule(sub)
            except AttributeError:
                raise MPTError(f"decoder block {i} has no {sub} (a {type(block).__name__})", STRUCTURED_FIX) from None
            if isinstance(module, lowrank):
                got = (module.out_features, module.in_features)
            else:
                weight = getattr(module, "weight", None)
                got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
            if got != shape:
                raise MPTError(f"decoder block {i}'s {sub} is {got}, the GGUF header describes {shape} for every "
                               f"layer (non-uniform structured pruning)", STRUCTURED_FIX)


def export_recipe_gguf(model: nn.Module, tokenizer, path: str | os.PathLike, *, dtype: str = "f16",
                       tokenizer_gguf: str | os.PathLike | None = None, name: str | None = None) -> Path:
    """Write the GGUF of `model` as a recipe's torch steps left it (`dtype`: "f16" or "f32"; quantize
    the file afterwards with `quantize_gguf`). Low-rank layers are multiplied back to dense weights
    (the file does not shrink, see the module docstring), pruned zeros are written as zeros, and a
    structured result llama.cpp cannot describe (non-uniform widths, SliceGPT) is one MPTError before
    anything is written. `model` is not modified."""
    from mpt_utils.quant.gguf.export import export_gguf
    from mpt_utils.quant.gguf.names import gguf_arch

    gguf_arch(model)  # an unsupported architecture is named before the shape checks
    check_uniform_structure(model)
    target = dense_copy(model) if has_lowrank(model) else model
    return export_gguf(target, tokenizer, path, dtype=dtype, tokenizer_gguf=tokenizer_gguf, name=name)


__all__ = ["check_uniform_structure", "dense_copy", "dense_linear", "export_recipe_gguf", "has_lowrank"]
