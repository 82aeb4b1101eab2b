"""Physical surgery on decoder models: drop blocks, KV-head groups and MLP channels, slice the hidden
size (SliceGPT), and save/reload the smaller model with `save_pretrained`.

A pruned model may have different widths per layer (FLAP, LLM-Pruner), added output biases (FLAP)
or rotated/sliced residual streams with shortcut matrices (SliceGPT). A plain HF config cannot say
that, so `finalize` writes the per-layer shapes into `config.mpt_structure` and `load_pruned`
rebuilds those shapes before loading the weights. Uniform results keep a plain HF config.

Heads under grouped-query attention are pruned as whole KV groups: one key/value head together with
the query heads that share it, so `num_key_value_groups` stays valid for every layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpt_utils.calibration import decoder_layers
from mpt_utils.errors import MPTError

STRUCTURE_KEY = "mpt_structure"
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------- inspection
def llama_parts(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(self_attn, mlp) of a Llama-style block (Llama, Qwen2, Mistral, Gemma-3), else a clear error."""
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    ok = (attn is not None and mlp is not None and all(isinstance(getattr(attn, n, None), nn.Linear) for n in ATTN)
          and all(isinstance(getattr(mlp, n, None), nn.Linear) for n in MLP) and hasattr(attn, "head_dim"))
    if not ok:
        raise MPTError(f"{type(block).__name__} is not a Llama-style block (q/k/v/o_proj + gate/up/down_proj)",
                       "width pruning supports Llama, Qwen2, Mistral and Gemma-3 decoders; block removal "
                       "(shortgpt, sleb) works for any decoder")
    return attn, mlp


def n_kv_groups(attn: nn.Module) -> int:
    return attn.k_proj.out_features // attn.head_dim


def group_size(attn: nn.Module) -> int:
    """Query heads per KV head (1 for plain multi-head attention)."""
    return int(getattr(attn, "num_key_value_groups", 1))


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def block_params(model: nn.Module) -> int:
    return sum(count_params(b) for b in decoder_layers(model))


def group_params(block: nn.Module) -> int:
    """Parameters that one KV group (1 kv head + its query heads) owns in q, k, v and o."""
    attn, _ = llama_parts(block)
    hd, rep = attn.head_dim, group_size(attn)
    q_rows, kv_rows = rep * hd, hd
    total = q_rows * attn.q_proj.in_features + 2 * kv_rows * attn.k_proj.in_features
    total += attn.o_proj.out_features * q_rows
    for lin, rows in ((attn.q_proj, q_rows), (attn.k_proj, kv_rows), (attn.v_proj, kv_rows)):
        total += rows if lin.bias is not None else 0
    return total


def channel_params(block: nn.Module) -> int:
    """Parameters one MLP intermediate channel owns (a gate row, an up row, a down column)."""
    _, mlp = llama_parts(block)
    total = mlp.gate_proj.in_features + mlp.up_proj.in_features + mlp.down_proj.out_features
    total += sum(1 for lin in (mlp.gate_proj, mlp.up_proj) if lin.bias is not None)
    return total


def group_channels(attn: nn.Module, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of q_proj (= column indices of o_proj) and of k/v_proj owned by KV `groups`."""
    hd, rep = attn.head_dim, group_size(attn)
    groups = torch.as_tensor(groups, dtype=torch.long).flatten()
    heads = (groups[:, None] * rep + torch.arange(rep)).flatten()
    q_idx = (heads[:, None] * hd + torch.arange(hd)).flatten()
    kv_idx = (groups[:, None] * hd + torch.arange(hd)).flatten()
    return q_idx, kv_idx


# ----------------------------------------------------------------------------- linear surgery
def new_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding exactly `weight` [out, in] (and `bias`), without a random init."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach().contiguous().clone())
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().contiguous().clone())
    return lin


def _rows(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    idx = idx.to(lin.weight.device)
    return new_linear(lin.weight[idx], None if lin.bias is None else lin.bias[idx])


def _cols(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    return new_linear(lin.weight[:, idx.to(lin.weight.device)], lin.bias)


def keep_kv_groups(block: nn.Module, keep: torch.Tensor, compensation: torch.Tensor | None = None) -> None:
    """Keep only KV groups `keep` of a block's attention; `compensation` [hidden] is added to o_proj's
    bias (FLAP's baseline compensation for the removed heads' mean output)."""
    attn, _ = llama_parts(block)
    keep = torch.as_tensor(keep, dtype=torch.long).sort().values
    if keep.numel() == 0:
        raise MPTError("cannot remove every attention head of a block", "keep at least one KV group per layer")
    q_idx, kv_idx = group_channels(attn, keep)
    attn.q_proj, attn.o_proj = _rows(attn.q_proj, q_idx), _cols(attn.o_proj, q_idx)
    attn.k_proj, attn.v_proj = _rows(attn.k_proj, kv_idx), _rows(attn.v_proj, kv_idx)
    if compensation is not None:
        add_bias(attn.o_proj, compensation)


def keep_mlp_channels(block: nn.Module, keep: torch.Tensor, compensation: torch.Tensor | None = None) -> None:
    """Keep only intermediate channels `keep` of a block's MLP (gate/up rows, down columns)."""
    _, mlp = llama_parts(block)
    keep = torch.as_tensor(keep, dtype=torch.long).sort().values
    if keep.numel() == 0:
        raise MPTError("cannot remove every MLP channel of a block", "keep at least one channel per layer")
    mlp.gate_proj, mlp.up_proj = _rows(mlp.gate_proj, keep), _rows(mlp.up_proj, keep)
    mlp.down_proj = _cols(mlp.down_proj, keep)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = keep.numel()
    if compensation is not None:
        add_bias(mlp.down_proj, compensation)


def add_bias(lin: nn.Linear, delta: torch.Tensor) -> None:
    delta = delta.to(lin.weight.device, lin.weight.dtype)
    if lin.bias is None:
        lin.bias = nn.Parameter(delta.clone())
    else:
        with torch.no_grad():
            lin.bias.add_(delta)


# Config lists with one entry per decoder layer, by position (attention kind, MLP kind, RoPE on/off,
# heads per layer): dropping a block drops its entry, or the config would describe other layers.
PER_LAYER_LISTS = ("layer_types", "mlp_layer_types", "no_rope_layers", "num_attention_heads_per_layer")


def drop_blocks(model: nn.Module, remove: list[int]) -> None:
    """Delete decoder blocks `remove` and renumber the rest (KV-cache indices, config: layer count and
    the per-layer lists of `PER_LAYER_LISTS`)."""
    layers = decoder_layers(model)
    remove = sorted(set(int(i) for i in remove))
    if remove and (remove[0] < 0 or remove[-1] >= len(layers)):
        raise MPTError(f"block indices {remove} out of range for {len(layers)} blocks", "pass valid indices")
    if len(remove) >= len(layers):
        raise MPTError("cannot remove every decoder block", "use a ratio below 1")
    cfg = getattr(model, "config", None)
    lists = {k: getattr(cfg, k, None) for k in PER_LAYER_LISTS} if cfg is not None else {}
    lists = {k: v for k, v in lists.items() if isinstance(v, (list, tuple)) and len(v) == len(layers)}
    for i in reversed(remove):
        del layers[i]
    for new_idx, block in enumerate(layers):
        for mod in block.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    if cfg is not None:
        cfg.num_hidden_layers = len(layers)
        for key, values in lists.items():
            setattr(cfg, key, [v for i, v in enumerate(values) if i not in set(remove)])


# ----------------------------------------------------------------------------- SliceGPT modules
class FusedRMSNorm(nn.Module):
    """RMSNorm whose scale was folded into the next linear layers (SliceGPT). It divides by the
    original hidden size, not the sliced one, so slicing does not rescale the signal."""

    def __init__(self, mean_dim: int, eps: float):
        super().__init__()
        self.mean_dim, self.eps = int(mean_dim), float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        var = x.pow(2).sum(-1, keepdim=True) / self.mean_dim
        return (x * torch.rsqrt(var + self.eps)).to(dtype)

    def extra_repr(self) -> str:
        return f"mean_dim={self.mean_dim}, eps={self.eps}"


class SlicedDecoderLayer(nn.Module):
    """A Llama-style block on a rotated, sliced residual stream. The residual connections carry the
    change of basis between consecutive PCA rotations (SliceGPT's shortcut matrices Q_lᵀQ_{l+1})."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, attn_shortcut: nn.Linear, mlp_shortcut: nn.Linear,
                 mean_dim: int, eps: float):
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm = FusedRMSNorm(mean_dim, eps)
        self.post_attention_layernorm = FusedRMSNorm(mean_dim, eps)
        self.attn_shortcut, self.mlp_shortcut = attn_shortcut, mlp_shortcut

    def attention_part(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        out = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        attn_out = out[0] if isinstance(out, tuple) else out
        return self.attn_shortcut(hidden_states) + attn_out

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        kwargs.pop("output_attentions", None)
        hidden = self.attention_part(hidden_states, **kwargs)
        return self.mlp_shortcut(hidden) + self.mlp(self.post_attention_layernorm(hidden))


def _identity_linear(n_in: int, n_out: int, like: torch.Tensor) -> nn.Linear:
    return new_linear(torch.eye(n_out, n_in, dtype=like.dtype, device=like.device), None)


def to_sliced_layer(block: nn.Module, mean_dim: int, eps: float) -> SlicedDecoderLayer:
    """Fold a block's RMSNorm scales into q/k/v and gate/up, and wrap it with identity shortcuts."""
    attn, mlp = llama_parts(block)
    norms = (getattr(block, "input_layernorm", None), getattr(block, "post_attention_layernorm", None))
    if any(n is None or not hasattr(n, "weight") for n in norms) or len(list(block.children())) != 4:
        raise MPTError(f"SliceGPT needs a pre-norm Llama block (two RMSNorms, no extra norms); got "
                       f"{type(block).__name__}", "use a Llama, Qwen2 or Mistral model")
    with torch.no_grad():
        for norm, lins in ((norms[0], (attn.q_proj, attn.k_proj, attn.v_proj)), (norms[1], (mlp.gate_proj, mlp.up_proj))):
            scale = norm.weight.detach().float()
            for lin in lins:
                lin.weight.mul_(scale.to(lin.weight.dtype)[None, :])
    d = attn.q_proj.in_features
    w = attn.q_proj.weight
    return SlicedDecoderLayer(attn, mlp, _identity_linear(d, d, w), _identity_linear(d, d, w), mean_dim, eps)


# ----------------------------------------------------------------------------- structure record
def layer_shape(block: nn.Module) -> dict[str, Any]:
    attn, mlp = llama_parts(block)
    hd = attn.head_dim
    shape = {"heads": attn.q_proj.out_features // hd, "kv_heads": attn.k_proj.out_features // hd,
             "intermediate": mlp.gate_proj.out_features, "o_bias": attn.o_proj.bias is not None,
             "down_bias": mlp.down_proj.bias is not None}
    if isinstance(block, SlicedDecoderLayer):
        shape["sliced"] = {"attn_in": attn.q_proj.in_features, "mid": attn.o_proj.out_features,
                           "out": mlp.down_proj.out_features}
    return shape


def _embedding_and_head(model: nn.Module) -> tuple[nn.Embedding, nn.Linear]:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is None or head is None:
        raise MPTError(f"{type(model).__name__} has no input/output embeddings", "use a causal LM")
    return emb, head


def finalize(model: nn.Module, slicegpt: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Make `model.config` describe the pruned tensors. Returns the structure record (None when a
    plain HF config suffices: uniform widths, original biases, no slicing)."""
    cfg = model.config
    layers = decoder_layers(model)
    cfg.num_hidden_layers = len(layers)
    try:
        shapes = [layer_shape(b) for b in layers]
    except MPTError:  # not Llama-style: only block removal applies, the config already says it all
        cfg.__dict__.pop(STRUCTURE_KEY, None)
        return None
    hd = llama_parts(layers[0])[0].head_dim
    cfg.head_dim = hd  # explicit, so changing the head count never changes the rotary dimension
    prev = getattr(cfg, STRUCTURE_KEY, None) or {}
    slicegpt = slicegpt or prev.get("slicegpt")
    base_o = bool(getattr(cfg, "attention_bias", False))
    base_down = bool(getattr(cfg, "mlp_bias", False))
    uniform = (all(s == shapes[0] for s in shapes) and slicegpt is None
               and shapes[0]["o_bias"] == base_o and shapes[0]["down_bias"] == base_down)
    if uniform:
        s = shapes[0]
        cfg.num_attention_heads, cfg.num_key_value_heads = s["heads"], s["kv_heads"]
        cfg.intermediate_size = s["intermediate"]
        cfg.__dict__.pop(STRUCTURE_KEY, None)
        return None
    record = {"version": 1, "head_dim": hd, "layers": shapes, "slicegpt": slicegpt}
    setattr(cfg, STRUCTURE_KEY, record)
    return record


def apply_structure(model: nn.Module, record: dict[str, Any]) -> None:
    """Reshape a freshly built model to the recorded per-layer shapes (weights are loaded after)."""
    layers = decoder_layers(model)
    shapes = record["layers"]
    if len(shapes) != len(layers):
        raise MPTError(f"structure record has {len(shapes)} layers, config builds {len(layers)}",
                       "the saved model directory is inconsistent: re-save it")
    hd = int(record["head_dim"])
    sl = record.get("slicegpt")
    dtype = next(model.parameters()).dtype

    def empty(out_f: int, in_f: int, bias: bool) -> nn.Linear:
        return new_linear(torch.empty(out_f, in_f, dtype=dtype), torch.empty(out_f, dtype=dtype) if bias else None)

    for i, s in enumerate(shapes):
        block = layers[i]
        attn, mlp = llama_parts(block)
        d = attn.q_proj.in_features
        d_in = s.get("sliced", {}).get("attn_in", d)
        d_mid = s.get("sliced", {}).get("mid", d)
        d_out = s.get("sliced", {}).get("out", d)
        q, kv = s["heads"] * hd, s["kv_heads"] * hd
        attn.q_proj = empty(q, d_in, attn.q_proj.bias is not None)
        attn.k_proj = empty(kv, d_in, attn.k_proj.bias is not None)
        attn.v_proj = empty(kv, d_in, attn.v_proj.bias is not None)
        attn.o_proj = empty(d_mid, q, s["o_bias"])
        mlp.gate_proj = empty(s["intermediate"], d_mid, mlp.gate_proj.bias is not None)
        mlp.up_proj = empty(s["intermediate"], d_mid, mlp.up_proj.bias is not None)
        mlp.down_proj = empty(d_out, s["intermediate"], s["down_bias"])
        if "sliced" in s:
            layers[i] = SlicedDecoderLayer(attn, mlp, empty(d_mid, d_in, False), empty(d_out, d_mid, False),
                                           sl["mean_dim"], sl["eps"])
    if sl:
        emb, head = _embedding_and_head(model)
        new_emb = nn.Embedding(emb.num_embeddings, sl["embed_dim"], padding_idx=emb.padding_idx, device="meta")
        new_emb.weight = nn.Parameter(torch.empty(emb.num_embeddings, sl["embed_dim"], dtype=dtype))
        model.set_input_embeddings(new_emb)
        model.set_output_embeddings(empty(head.out_features, sl["head_in"], head.bias is not None))
        model.model.norm = FusedRMSNorm(sl["mean_dim"], sl["eps"])


# ----------------------------------------------------------------------------- save / load
def save_pruned(model: nn.Module, path: str | Path, tokenizer=None, meta: dict[str, Any] | None = None) -> Path:
    """`save_pretrained` the pruned model (plus tokenizer and a pruning report) into `path`."""
    path = Path(path)
    finalize(model)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    if meta is not None:
        from mpt_utils.store import _jsonable, atomic_write_text

        atomic_write_text(path / "mpt_pruning.json", json.dumps(_jsonable(meta), indent=1))
    return path


def _state_dict_from(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(path / f)))
        return state
    single = path / "model.safetensors"
    if not single.exists():
        raise MPTError(f"no safetensors weights in {path}", "save the model with save_pruned / save_pretrained")
    return load_file(str(single))


def load_pruned(path: str | Path, device: str | torch.device | None = None,
                dtype: torch.dtype | None = None):
    """Rebuild a model saved by `save_pruned` (any per-layer structure) -> LoadedModel."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from mpt_utils.models import LoadedModel, model_info, pick_device

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    record = getattr(config, STRUCTURE_KEY, None)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    if record:
        apply_structure(model, record)
    state = _state_dict_from(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise MPTError(f"weights in {path} do not match the recorded structure "
                       f"(missing {missing[:3]}, unexpected {unexpected[:3]})", "re-save the model with save_pruned")
    if tied:
        model.tie_weights()
    model.to(pick_device(device)).eval()
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tok = None
    return LoadedModel(model, tok, model_info(model, path.name, "local", str(path), note="structured-pruned"))
