"""Export a transformers causal LM (llama / mistral / qwen2) to an F32 or F16 GGUF for llama.cpp.

Tensor names and hyper-parameter keys are llama.cpp's own. For the llama graph the q/k rows are
permuted from transformers' rotate-half RoPE layout to llama.cpp's interleaved one (qwen2 uses
NeoX RoPE in llama.cpp, so its rows stay). 1-D tensors (norms, biases) are always F32, as in
llama.cpp's converter. Compressed models export as they are: pruned zeros stay zeros, a factored
linear (a bias-free nn.Sequential of linears) is multiplied back to its dense weight.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from mpt_utils.errors import MPTError
from mpt_utils.quant.gguf.names import gguf_arch, module_names, text_config
from mpt_utils.quant.gguf.tokenizer import copy_from_gguf, write_from_hf

DTYPES = {"f32": (np.float32, gguf.LlamaFileType.ALL_F32), "f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16)}


class _Writer(gguf.GGUFWriter):
    """GGUFWriter that can also write an empty typed array (the format allows it, the package refuses)."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return bytes(head + self._pack("I", sub_type) + self._pack("Q", 0))
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of each head from [first half | second half] (rotate-half) to interleaved pairs."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The [out, in] weight a module applies (a plain one, or the product of a factored linear)."""
    if isinstance(module, nn.Sequential):
        w = None
        for part in module:
            if not isinstance(part, nn.Linear) or part.bias is not None:
                raise MPTError(f"cannot export a {type(part).__name__} inside a factored linear",
                               "export plain linears or bias-free nn.Sequential(Linear, Linear) factors")
            w = part.weight if w is None else part.weight @ w
        return w
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise MPTError(f"cannot export a {type(module).__name__} without a weight", "export a dense or pruned model")
    return weight


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise MPTError(f"RoPE scaling {kind!r} is not exported", "export a model with default RoPE")
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _hparams(writer: gguf.GGUFWriter, cfg, ftype: int, name: str) -> int:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(int(cfg.num_hidden_layers))
    writer.add_feed_forward_length(int(cfg.intermediate_size))
    writer.add_head_count(int(cfg.num_attention_heads))
    writer.add_head_count_kv(int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads))
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(int(cfg.vocab_size))
    writer.add_file_type(int(ftype))
    return head_dim


@torch.no_grad()
def export_gguf(model: nn.Module, tokenizer, path: str | os.PathLike, *, dtype: str = "f32",
                tokenizer_gguf: str | os.PathLike | None = None, name: str | None = None) -> Path:
    """Write `model` (+ tokenizer) as a GGUF llama.cpp loads. `tokenizer_gguf`: copy the tokenizer
    keys from that GGUF instead of converting `tokenizer` (use it for models loaded from a GGUF)."""
    if dtype not in DTYPES:
        raise MPTError(f"unsupported export dtype {dtype!r}", f"use one of {sorted(DTYPES)}; quantize afterwards")
    arch = gguf_arch(model)
    cfg = text_config(model)
    np_dtype, ftype = DTYPES[dtype]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    writer = _Writer(tmp, arch)
    try:
        _hparams(writer, cfg, ftype, name or str(getattr(cfg, "_name_or_path", "") or "mpt-export"))
        vocab = int(cfg.vocab_size)
        if tokenizer_gguf is not None:
            copy_from_gguf(writer, tokenizer_gguf, vocab)
        else:
            write_from_hf(writer, tokenizer, vocab, cfg.model_type)
        modules = dict(model.named_modules())
        embed = modules["model.embed_tokens"].weight
        tied = "lm_head" in modules and dense_weight(modules["lm_head"]).data_ptr() == embed.data_ptr()
        n_kv = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        for hf_name, base in module_names(model).items():
            if hf_name == "lm_head" and (tied or hf_name not in modules):
                continue  # llama.cpp reuses token_embd for the output when output.weight is absent
            if hf_name not in modules:
                raise MPTError(f"model has no module {hf_name!r}", "export an unmodified module layout")
            module = modules[hf_name]
            w = dense_weight(module).detach().float().cpu()
            if arch == "llama" and hf_name.endswith("q_proj"):
                w = _permute_rope(w, cfg.num_attention_heads)
            elif arch == "llama" and hf_name.endswith("k_proj"):
                w = _permute_rope(w, n_kv)
            arr = w.numpy()
            writer.add_tensor(f"{base}.weight", arr.astype(np_dtype) if arr.ndim > 1 else arr.astype(np.float32))
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                b = bias.detach().float().cpu()
                if arch == "llama" and hf_name.endswith(("q_proj", "k_proj")):
                    heads = cfg.num_attention_heads if hf_name.endswith("q_proj") else n_kv
                    b = _permute_rope(b, heads)
                writer.add_tensor(f"{base}.bias", b.numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():  # failed half-way: never leave a truncated file behind
            try:
                writer.close()
            finally:
                tmp.unlink()
    return out
