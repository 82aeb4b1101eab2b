"""llama.cpp's names for a transformers model's tensors (llama and qwen2 architectures)."""

from __future__ import annotations

import gguf
from torch import nn

from mpt_utils.errors import MPTError

T = gguf.MODEL_TENSOR
# transformers model_type -> llama.cpp architecture (Mistral uses llama.cpp's llama graph)
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
GLOBAL = {"model.embed_tokens": T.TOKEN_EMBD, "model.norm": T.OUTPUT_NORM, "lm_head": T.OUTPUT}
PER_LAYER = {
    "input_layernorm": T.ATTN_NORM,
    "self_attn.q_proj": T.ATTN_Q,
    "self_attn.k_proj": T.ATTN_K,
    "self_attn.v_proj": T.ATTN_V,
    "self_attn.o_proj": T.ATTN_OUT,
    "post_attention_layernorm": T.FFN_NORM,
    "mlp.gate_proj": T.FFN_GATE,
    "mlp.up_proj": T.FFN_UP,
    "mlp.down_proj": T.FFN_DOWN,
}


def text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def gguf_arch(model: nn.Module) -> str:
    model_type = getattr(text_config(model), "model_type", None)
    if model_type not in ARCHS:
        raise MPTError(f"GGUF export does not support model_type {model_type!r}",
                       f"export one of: {', '.join(sorted(ARCHS))} (Llama-family and Qwen2 models)")
    return ARCHS[model_type]


def module_names(model: nn.Module) -> dict[str, str]:
    """Full module name -> llama.cpp tensor base name (append '.weight' / '.bias')."""
    arch = gguf.MODEL_ARCH.LLAMA if gguf_arch(model) == "llama" else gguf.MODEL_ARCH.QWEN2
    allowed = set(gguf.MODEL_TENSORS[arch])
    out = {}
    n_layers = text_config(model).num_hidden_layers
    for name, tensor in GLOBAL.items():
        out[name] = gguf.TENSOR_NAMES[tensor]
    for i in range(n_layers):
        for sub, tensor in PER_LAYER.items():
            if tensor not in allowed:
                raise MPTError(f"llama.cpp's {arch.name} graph has no {tensor.name}", "report this as a bug")
            out[f"model.layers.{i}.{sub}"] = gguf.TENSOR_NAMES[tensor].format(bid=i)
    return out
