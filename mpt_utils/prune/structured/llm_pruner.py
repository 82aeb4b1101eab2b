"""LLM-Pruner: dependency-grouped structured pruning by Taylor importance.

Reference: "LLM-Pruner: On the Structural Pruning of Large Language Models", Ma, Fang and Wang,
arXiv:2305.11627 (NeurIPS 2023), github.com/horseee/LLM-Pruner (`hf_prune.py`, `post_training.py`).

Coupled structures are pruned together: an attention group is the q/k/v rows and o_proj columns of
one KV group (1 key/value head + its query heads under GQA, or one head without GQA); an MLP group
is the gate row, up row and down column of one intermediate channel. The importance of a group is
aggregated ("sum") from element-wise first-order Taylor scores |w * dL/dw| of all its parameters
(`param_first`, the paper's default; `param_second`, `param_mix` and `vectorize` are the paper's
variants), with the LM loss of a few calibration samples.

Block-wise, as in the paper's LLaMA recipe: the first and last blocks are kept intact (layers 4-30 of
32, scaled to the model's depth) and every block in range loses the same fraction r_l of its
attention+MLP parameters, r_l chosen so the whole model loses `ratio` of them. Heads go in whole KV
groups (round(r_l * groups)); the MLP channel count then makes up the block's exact budget, since
with only a few KV groups per layer a shared ratio would miss it by a whole group.
Recovery is separate: `mpt_utils.prune.structured.recovery.lora_recover`, whose defaults are the
reference's post-training budget (LoRA r=8 on Alpaca-cleaned, ~50k samples, 2 epochs, batch 64,
lr 1e-4: 1,556 steps); a run with less states its budget (steps, batch, lr, windows) explicitly.
"""

from __future__ import annotations

import torch
from torch import nn

from mpt_utils.calibration import decoder_layers
from mpt_utils.errors import MPTError
from mpt_utils.progress import progress_bar
from mpt_utils.prune.structured import STRUCTURED, cached, model_device
from mpt_utils.prune.structured.surgery import (
    channel_params,
    group_channels,
    group_params,
    keep_kv_groups,
    keep_mlp_channels,
    llama_parts,
    n_kv_groups,
)

IMPORTANCE = ("param_first", "param_second", "param_mix", "vectorize")


def default_range(n_layers: int) -> tuple[int, int]:
    """LLM-Pruner's LLaMA-7B range (blocks 4..30 of 32) scaled to `n_layers`."""
    start = int(round(4 * n_layers / 32))
    end = n_layers - int(round(2 * n_layers / 32))
    return (start, end) if end > start else (0, n_layers)


def _element_salience(p: nn.Parameter, grad: torch.Tensor, acc: torch.Tensor | None, kind: str) -> torch.Tensor:
    w = p.detach().float()
    first = w * grad
    if kind in ("param_first", "vectorize"):
        return first
    second = w * acc * w
    return second if kind == "param_second" else first - 0.5 * second


def _grads(model: nn.Module, calib_ids: torch.Tensor, second_order: bool, device, progress: bool):
    """Mean gradient of the LM loss over the samples (and the mean squared per-sample gradient)."""
    dev = model_device(model, device)
    model.to(dev)
    params = [p for block in decoder_layers(model) for p in block.parameters()]
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(True)
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params] if second_order else None
    was_training = model.training
    model.eval()  # no dropout: the gradient of the deployed function
    try:
        for window in progress_bar(calib_ids, desc="taylor grads", disable=not progress, leave=False):
            model.zero_grad(set_to_none=True)
            ids = window.unsqueeze(0).to(dev)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            for k, p in enumerate(params):
                g = p.grad.detach().float() if p.grad is not None else torch.zeros_like(total[k])
                total[k] += g / len(calib_ids)
                if acc is not None:
                    acc[k] += g * g / len(calib_ids)
    finally:
        model.zero_grad(set_to_none=True)
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)
    index = {id(p): k for k, p in enumerate(params)}
    return total, acc, index


def taylor_importance(model: nn.Module, calib_ids: torch.Tensor, kind: str = "param_first",
                      device: str | torch.device | None = None, progress: bool = True
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(KV-group importance [G], MLP-channel importance [m]) for every block."""
    if kind not in IMPORTANCE:
        raise MPTError(f"unknown LLM-Pruner importance {kind!r}", f"use one of {IMPORTANCE}")
    total, acc, index = _grads(model, calib_ids, kind in ("param_second", "param_mix"), device, progress)

    def sal(p):
        k = index[id(p)]
        return _element_salience(p, total[k], None if acc is None else acc[k], kind)

    def rows(lin):  # per output row: |s| summed (param_*) or s summed (vectorize, abs taken per group)
        s = sal(lin.weight)
        r = s.sum(1) if kind == "vectorize" else s.abs().sum(1)
        if lin.bias is not None:
            b = sal(lin.bias)
            r = r + (b if kind == "vectorize" else b.abs())
        return r.cpu()

    def cols(lin):
        s = sal(lin.weight)
        return (s.sum(0) if kind == "vectorize" else s.abs().sum(0)).cpu()

    out = []
    for block in decoder_layers(model):
        attn, mlp = llama_parts(block)
        q, k, v, o = rows(attn.q_proj), rows(attn.k_proj), rows(attn.v_proj), cols(attn.o_proj)
        groups = []
        for g in range(n_kv_groups(attn)):
            q_idx, kv_idx = group_channels(attn, torch.tensor([g]))
            groups.append(q[q_idx].sum() + k[kv_idx].sum() + v[kv_idx].sum() + o[q_idx].sum())
        chan = rows(mlp.gate_proj) + rows(mlp.up_proj) + cols(mlp.down_proj)
        g_imp = torch.stack(groups)
        if kind == "vectorize":
            g_imp, chan = g_imp.abs(), chan.abs()
        out.append((g_imp, chan))
    return out


@STRUCTURED.register("llm_pruner", version=2, display="LLM-Pruner", calibration=True, paper_name="LLM_Pruner",
                     sources=("mpt_utils.prune.structured.recovery",))
def llm_pruner(model: nn.Module, ratio: float, calib_ids: torch.Tensor, *, cache: dict | None = None,
               importance: str = "param_first", layer_start: int | None = None, layer_end: int | None = None,
               n_samples: int = 10, sample_len: int = 64, seed: int = 0,
               device: str | torch.device | None = None, progress: bool = True) -> dict:
    """Remove `ratio` of the attention+MLP parameters, uniformly over blocks [layer_start, layer_end).
    The gradient uses the first `n_samples` calibration windows cut to `sample_len` tokens (the
    paper: 10 samples of 64 tokens)."""
    layers = decoder_layers(model)
    start, end = default_range(len(layers))
    start = start if layer_start is None else layer_start
    end = end if layer_end is None else layer_end
    if not 0 <= start < end <= len(layers):
        raise MPTError(f"layer range [{start}, {end}) invalid for {len(layers)} blocks",
                       f"use 0 <= layer_start < layer_end <= {len(layers)}")
    samples = calib_ids[:n_samples, :sample_len]
    imp = cached(cache, f"llm_pruner:{importance}", samples,
                 lambda: taylor_importance(model, samples, importance, device, progress))

    prunable = [n_kv_groups(llama_parts(b)[0]) * group_params(b) + llama_parts(b)[1].gate_proj.out_features
                * channel_params(b) for b in layers]
    r_layer = ratio * sum(prunable) / sum(prunable[start:end])
    capped = r_layer > 0.95
    r_layer = min(r_layer, 0.95)
    kept_g, kept_c = [], []
    for i, block in enumerate(layers):
        attn, mlp = llama_parts(block)
        n_g, n_c = n_kv_groups(attn), mlp.gate_proj.out_features
        g_imp, c_imp = imp[i]
        if start <= i < end:
            drop_g = min(int(round(r_layer * n_g)), n_g - 1)
            budget = r_layer * prunable[i] - drop_g * group_params(block)
            drop_c = min(max(int(round(budget / channel_params(block))), 0), n_c - 1)
            keep_kv_groups(block, g_imp.argsort(descending=True)[: n_g - drop_g])
            keep_mlp_channels(block, c_imp.argsort(descending=True)[: n_c - drop_c])
        kept_g.append(n_kv_groups(llama_parts(block)[0]))
        kept_c.append(llama_parts(block)[1].gate_proj.out_features)
    return {"importance": importance, "layer_range": [start, end], "layer_ratio": r_layer, "ratio_capped": capped,
            "kept_groups": kept_g, "kept_channels": kept_c, "n_samples": int(samples.shape[0]),
            "sample_len": int(samples.shape[1])}
