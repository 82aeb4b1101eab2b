"""AWQ (Lin et al., 2024): activation-aware weight quantization.

Per decoder block, for each group of linears that read the same input through a foldable producer
(RMSNorm -> q/k/v, norm -> gate/up, v -> o when shapes allow, up -> down), search a per-input-channel
scale s = mean|x|^ratio (normalised by sqrt(max·min)) on a grid of ratios in [0, 1), choosing the
one that minimises the group's output error ‖X Wᵀ − (X/s) Q(W·s)ᵀ‖². Ratio 0 gives s = 1, so the
search never returns a worse error than plain RTN. The chosen s is folded into the producer
(an exact equivalence), then each linear except q/k gets a per-group clipping search (shrink the
range to 1 … 1−max_shrink of its max, keep the best per row and group), then group RTN.

Errors are computed exactly over all calibration tokens from the engine's Gram matrix XᵀX:
‖X Eᵀ‖² = tr(E XᵀX Eᵀ). Block inputs come from the dense model (sequential=False), as in llm-awq,
whose scale search also runs on un-quantized features.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from mpt_utils.calibration import LayerStats, decoder_layers, layerwise
from mpt_utils.errors import MPTError
from mpt_utils.quant.rtn import (
    QuantSpec,
    check_spec,
    from_groups,
    make_grid,
    normalize_group_size,
    quantize_weight,
    to_groups,
)

# (producer, consumers) inside a block; the first match per consumer set is used.
SCALE_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),  # OPT
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("self_attn.v_proj", ("self_attn.out_proj",)),  # OPT
    ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),  # Gemma 3
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("final_layer_norm", ("fc1",)),  # OPT
    ("mlp.up_proj", ("mlp.down_proj",)),
)
NO_CLIP = ("q_proj", "k_proj")  # their errors are amplified by the attention softmax (llm-awq skips them)


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """‖X Wᵀ − X Âᵀ‖² from the Gram matrix XᵀX, without the raw activations."""
    e = (weight - approx).float()
    return torch.sum((e @ gram) * e)


def _scaled_error(weights: list[torch.Tensor], gram: torch.Tensor, scales: torch.Tensor,
                  spec: QuantSpec) -> torch.Tensor:
    total = torch.zeros((), device=gram.device)
    for w in weights:
        approx = quantize_weight(w * scales, spec) / scales
        total = total + output_error(w, approx, gram)
    return total


@torch.no_grad()
def search_scales(weights: list[torch.Tensor], gram: torch.Tensor, act_abs_mean: torch.Tensor,
                  spec: QuantSpec, n_grid: int = 20) -> tuple[torch.Tensor, float, float, float]:
    """Best per-channel scale for linears sharing one input. Returns (scales, ratio, error, error at s=1)."""
    weights = [w.float() for w in weights]
    x_mean = act_abs_mean.float().clamp(min=1e-4)
    best = (torch.ones_like(x_mean), 0.0, float("inf"))
    base = float("inf")
    for k in range(n_grid):
        ratio = k / n_grid
        s = x_mean.pow(ratio).clamp(min=1e-4)
        s = s / torch.sqrt(s.max() * s.min())
        err = float(_scaled_error(weights, gram, s, spec))
        if k == 0:
            base = err
        if err < best[2]:
            best = (s, ratio, err)
    return best[0], best[1], best[2], base


@torch.no_grad()
def search_clip(weight: torch.Tensor, gram: torch.Tensor, spec: QuantSpec, n_grid: int = 20,
                max_shrink: float = 0.5) -> torch.Tensor:
    """Per (row, group) clipping of the weight range minimising that group's output error
    e_gᵀ G_gg e_g; returns the clipped weight, to be quantized with the same spec."""
    w = weight.float()
    wg, in_f = to_groups(w, spec.group_size)  # [out, n_groups, g]
    g = wg.shape[-1]
    pad = wg.shape[1] * g - in_f
    gram_p = torch.nn.functional.pad(gram.float(), (0, pad, 0, pad)) if pad else gram.float()
    blocks = torch.stack([gram_p[j * g : (j + 1) * g, j * g : (j + 1) * g] for j in range(wg.shape[1])])
    amax = wg.abs().amax(dim=-1, keepdim=True)
    best_err = torch.full(wg.shape[:2], float("inf"), device=w.device)
    best_max = amax.clone()
    for k in range(int(max_shrink * n_grid)):
        cmax = amax * (1 - k / n_grid)
        clipped = torch.clamp(wg, -cmax, cmax)
        q = make_grid(clipped, spec).apply(clipped)
        e = wg - q  # [out, n_groups, g]
        if pad:  # padded columns are copies, not real weights: keep them out of the error
            e[:, -1, g - pad :] = 0
        err = torch.einsum("ogi,gij,ogj->og", e, blocks, e)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better.unsqueeze(-1), cmax, best_max)
    return from_groups(torch.clamp(wg, -best_max, best_max), in_f).to(weight.dtype)


def _fold_into_producer(producer: nn.Module, scales: torch.Tensor) -> None:
    """Divide the producer's output channels by `scales` (exactly undone by the consumers' ×s)."""
    if isinstance(producer, nn.Linear):
        producer.weight.data.div_(scales.view(-1, 1).to(producer.weight.dtype))
        if producer.bias is not None:
            producer.bias.data.div_(scales.to(producer.bias.dtype))
        return
    weight = producer.weight.data
    if "Gemma" in type(producer).__name__:  # Gemma RMSNorm multiplies by (1 + weight)
        weight.copy_((1.0 + weight.float()) / scales - 1.0)
    else:
        weight.div_(scales.to(weight.dtype))
    if getattr(producer, "bias", None) is not None:
        producer.bias.data.div_(scales.to(producer.bias.dtype))


def _scale_groups(modules: dict[str, nn.Module]) -> list[tuple[str, tuple[str, ...]]]:
    groups, taken = [], set()
    for producer, consumers in SCALE_GROUPS:
        if producer not in modules or not all(c in modules for c in consumers) or taken & set(consumers):
            continue
        if isinstance(modules[producer], nn.Linear):  # v -> o only when v's outputs are o's inputs (no GQA)
            if modules[producer].out_features != modules[consumers[0]].in_features:
                continue
        groups.append((producer, consumers))
        taken |= set(consumers)
    return groups


@torch.no_grad()
def awq_block(block: nn.Module, stats, spec: QuantSpec, n_grid: int = 20, max_shrink: float = 0.5,
              clip: bool = True) -> dict[str, dict]:
    """Scale search, fold, clipping search and RTN for one block; returns per-group search records."""
    modules = dict(block.named_modules())
    in_scale: dict[str, torch.Tensor] = {}  # consumers' inputs are now x / s
    records = {}
    for producer, consumers in _scale_groups(modules):
        st = stats[consumers[0]]
        weights = [modules[c].weight.data for c in consumers]
        s, ratio, err, base = search_scales(weights, st.gram, st.abs_mean, spec, n_grid)
        _fold_into_producer(modules[producer], s)
        for c in consumers:
            modules[c].weight.data.mul_(s.view(1, -1).to(modules[c].weight.dtype))
            in_scale[c] = s
        records["+".join(consumers)] = {"ratio": ratio, "error": err, "error_scale1": base}
    for name, st in stats.items():
        lin = modules[name]
        w = lin.weight.data
        if clip and not name.endswith(NO_CLIP):
            s = in_scale.get(name)
            gram = st.gram if s is None else st.gram / s.view(-1, 1) / s.view(1, -1)
            w = search_clip(w, gram, spec, n_grid, max_shrink)
        lin.weight.data = quantize_weight(w, spec)
    return records


def awq(model: nn.Module, *, bits: int, group_size: int | None = 128, sym: bool = False,
        calib_ids: torch.Tensor | None = None, device: str | None = None, progress: bool = True,
        n_grid: int = 20, max_shrink: float = 0.5, clip: bool = True, zero: str = "int",
        stats: dict[str, LayerStats] | None = None):
    """Quantize every decoder-block linear of `model` in place with AWQ on `calib_ids` [n, seqlen].

    `stats`: the dense model's statistics from `calibration.collect_stats` on the same windows.
    AWQ only ever looks at dense-model inputs, so a bit-width sweep can gather them once and pass
    them here; the result is identical to running the engine again."""
    from mpt_utils.quant import QuantResult

    if calib_ids is None and stats is None:
        raise MPTError("awq needs calibration data", "pass calib_ids=calibration_windows(tokenizer, ...)")
    spec = check_spec(QuantSpec(bits, normalize_group_size(group_size), sym, zero), "awq")
    names = {id(layer): name for name, layer in model.named_modules()
             if any(layer is m for m in decoder_layers(model))}
    layers: dict[str, QuantSpec] = {}
    searches: dict[str, dict] = {}
    start = time.perf_counter()

    def on_block(i: int, block: nn.Module, stats) -> None:
        for key, rec in awq_block(block, stats, spec, n_grid, max_shrink, clip).items():
            searches[f"{i}:{key}"] = rec
        layers.update({f"{names[id(block)]}.{n}": spec for n in stats})

    if stats is None:
        layerwise(model, calib_ids, on_block, sequential=False, device=device, progress=progress, desc="awq")
    else:
        from mpt_utils.models import pick_device

        dev = pick_device(device)
        for i, block in enumerate(decoder_layers(model)):
            home = next(block.parameters()).device
            prefix = names[id(block)]
            block_stats = {n: copy.copy(st).to(dev) for key, st in stats.items()
                           if (n := key.removeprefix(prefix + ".")) != key}
            on_block(i, block.to(dev), block_stats)
            block.to(home)
    ratios = [r["ratio"] for r in searches.values()]
    return QuantResult("awq", spec, layers, time.perf_counter() - start,
                       extra={"mean_ratio": sum(ratios) / max(len(ratios), 1), "searches": searches})
