"""AWQ: activation-aware weight quantization.

Reference: "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration",
J. Lin, J. Tang, H. Tang, S. Yang, W.-M. Chen, W.-C. Wang, G. Xiao, X. Dang, C. Gan, S. Han,
arXiv:2306.00978; code github.com/mit-han-lab/llm-awq (`awq/quantize/pre_quant.py` `run_awq`,
`auto_scale.py` `auto_scale_block` / `apply_scale`, `auto_clip.py` `auto_clip_block`).

Per decoder block, as in `run_awq`:
1. Scale search (`auto_scale_block`), every group on the unmodified block. For each group of linears
   that read one input through a foldable producer, try s = mean|x|^ratio / sqrt(max·min) for
   ratio = k/n_grid, k = 0 … n_grid−1 (n_grid = 20), replacing the linears by Q(W·s)/s (Q = group
   RTN), and keep the s with the lowest mean squared error at the output of the group's *inspected
   module*: the whole self-attention (with the block's position embeddings and mask) for q/k/v, the
   whole MLP for gate/up, the linear itself for o_proj (v -> o, only without GQA) and down_proj.
   Ratio 0 gives s = 1, so the search never does worse than plain RTN on that objective.
2. Fold every s into its producer, an exact equivalence (`apply_scale`).
3. Clipping search (`auto_clip_block`) for every linear except q/k (the attention softmax amplifies
   their errors): per output row and group, shrink the range to max·(1 − k/n_grid) for
   k < max_shrink·n_grid and keep the one with the lowest error of that group's partial output on the
   (scaled) inputs. Then group RTN.

Differences kept on purpose: the clipping error is computed exactly over all calibration tokens from
the engine's Gram matrix (the reference subsamples 512 tokens to save memory), and the single-linear
scale objectives likewise come from the Gram matrix (identical to running the linear). Block inputs
come from the dense model (sequential=False), as in the reference. `objective="linear"` is this
package's earlier objective: the summed output error of each linear of the group separately.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from torch import nn

from mpt_utils.calibration import LayerStats, decoder_layers, layerwise
from mpt_utils.errors import MPTError
from mpt_utils.quant import GRID, QUANTIZERS
from mpt_utils.quant.rtn import (
    QuantSpec,
    check_spec,
    from_groups,
    make_grid,
    normalize_group_size,
    quantize_weight,
    to_groups,
)

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
# (producer, consumers, inspected module) inside a block, as in llm-awq's auto_scale_block; the first
# match per consumer set is used. Inspected None: the error is measured at the single consumer's output.
SCALE_GROUPS = (
    ("input_layernorm", QKV, "self_attn"),
    ("self_attn_layer_norm", QKV, "self_attn"),  # OPT
    ("self_attn.v_proj", ("self_attn.o_proj",), None),
    ("self_attn.v_proj", ("self_attn.out_proj",), None),  # OPT
    ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),  # Gemma 3
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ("final_layer_norm", ("fc1",), None),  # OPT
    ("fc1", ("fc2",), None),  # OPT: only across a ReLU, which commutes with positive scales
    ("mlp.up_proj", ("mlp.down_proj",), None),
)
NO_CLIP = ("q_proj", "k_proj")  # their errors are amplified by the attention softmax (llm-awq skips them)
OBJECTIVES = ("module", "linear")

Call = tuple[tuple, dict]  # (args, kwargs) of one forward call of a module
Loss = Callable[[list[torch.Tensor]], float]  # objective for the group's linears replaced by these weights


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """‖X Wᵀ − X Âᵀ‖² from the Gram matrix XᵀX, without the raw activations."""
    e = (weight - approx).float()
    return torch.sum((e @ gram) * e)


def grid_scales(act_abs_mean: torch.Tensor, ratio: float) -> torch.Tensor:
    """llm-awq's candidate scales: mean|x|^ratio, normalised by sqrt(max·min)."""
    s = act_abs_mean.float().pow(ratio).clamp(min=1e-4)
    return s / torch.sqrt(s.max() * s.min())


def linears_loss(weights: list[torch.Tensor], gram: torch.Tensor) -> Loss:
    """objective="linear": Σ over the group's linears of ‖X Wᵀ − X Âᵀ‖²."""
    return lambda approx: float(sum(output_error(w, a, gram) for w, a in zip(weights, approx)))


def linear_mse_loss(weight: torch.Tensor, gram: torch.Tensor, n_tokens: int) -> Loss:
    """Mean squared error of one linear's output over tokens and output features (from the Gram)."""
    return lambda approx: float(output_error(weight, approx[0], gram)) / (max(n_tokens, 1) * weight.shape[0])


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def module_loss(inspect: nn.Module, linears: list[nn.Linear], calls: list[Call]) -> Loss:
    """Mean squared error at the output of `inspect`, re-run on its recorded `calls`, when `linears`
    (inside it) take the candidate weights, against its output as it is now (llm-awq
    `_search_module_scale`)."""
    with torch.no_grad():
        ref = [_first(inspect(*args, **kwargs)).float() for args, kwargs in calls]
    count = sum(r.numel() for r in ref)

    @torch.no_grad()
    def loss(approx: list[torch.Tensor]) -> float:
        originals = [lin.weight.data for lin in linears]
        try:
            for lin, a in zip(linears, approx):
                lin.weight.data = a.to(lin.weight.dtype)
            total = 0.0
            for (args, kwargs), r in zip(calls, ref):
                total += float((_first(inspect(*args, **kwargs)).float() - r).pow(2).sum(dtype=torch.float64))
        finally:
            for lin, w in zip(linears, originals):
                lin.weight.data = w
        return total / max(count, 1)

    return loss


@torch.no_grad()
def search_scales(weights: list[torch.Tensor], act_abs_mean: torch.Tensor, spec: QuantSpec, loss: Loss,
                  n_grid: int = 20) -> tuple[torch.Tensor, float, float, float]:
    """Best per-input-channel scale for linears sharing one input under the objective `loss`.
    Returns (scales, ratio, error, error at s=1)."""
    weights = [w.float() for w in weights]
    best = (torch.ones_like(act_abs_mean, dtype=torch.float32), 0.0, float("inf"))
    base = float("inf")
    for k in range(n_grid):
        ratio = k / n_grid
        s = grid_scales(act_abs_mean, ratio)
        err = loss([quantize_weight(w * s, spec) / s for w in weights])
        if k == 0:
            base = err
        if err < best[2]:
            best = (s, ratio, err)
    return best[0], best[1], best[2], base


@torch.no_grad()
def search_clip(weight: torch.Tensor, gram: torch.Tensor, spec: QuantSpec, n_grid: int = 20,
                max_shrink: float = 0.5) -> torch.Tensor:
    """Per (row, group) clipping of the weight range minimising that group's output error
    e_gᵀ G_gg e_g (llm-awq `auto_clip_layer`); returns the clipped weight, to be quantized with
    the same spec."""
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


def _scale_groups(modules: dict[str, nn.Module]) -> list[tuple[str, tuple[str, ...], str | None]]:
    groups, taken = [], set()
    for producer, consumers, inspect in SCALE_GROUPS:
        if producer not in modules or not all(c in modules for c in consumers) or taken & set(consumers):
            continue
        if inspect is not None and inspect not in modules:
            continue
        if isinstance(modules[producer], nn.Linear):  # v -> o only when v's outputs are o's inputs (no GQA)
            if modules[producer].out_features != modules[consumers[0]].in_features:
                continue
            if producer == "fc1" and not isinstance(getattr(modules[""], "activation_fn", None), nn.ReLU):
                continue
        groups.append((producer, consumers, inspect))
        taken |= set(consumers)
    return groups


def _objective(objective: str, modules: dict[str, nn.Module], consumers: tuple[str, ...], inspect: str | None,
               st: LayerStats, calls: dict[str, list[Call]] | None) -> Loss:
    weights = [modules[c].weight.data.float() for c in consumers]
    if objective == "linear":
        return linears_loss(weights, st.gram)
    if inspect is None:  # the inspected module is the linear itself: its output error from the Gram
        return linear_mse_loss(weights[0], st.gram, st.n)
    if not calls or not calls.get(inspect):
        raise MPTError(f"AWQ's module objective needs the recorded calls of {inspect!r}",
                       "run it through awq(...), which records them, or pass objective='linear'")
    return module_loss(modules[inspect], [modules[c] for c in consumers], calls[inspect])


@torch.no_grad()
def awq_block(block: nn.Module, stats: dict[str, LayerStats], spec: QuantSpec, n_grid: int = 20,
              max_shrink: float = 0.5, clip: bool = True, *, objective: str = "module",
              calls: dict[str, list[Call]] | None = None) -> dict[str, dict]:
    """Scale search, fold, clipping search and RTN for one block; returns per-group search records.

    `stats`: the dense block's input statistics per linear. `calls`: the (args, kwargs) of every call
    of the inspected modules ("self_attn", "mlp") on the calibration windows, which the module
    objective re-runs."""
    modules = dict(block.named_modules())
    found, records = [], {}
    for producer, consumers, inspect in _scale_groups(modules):  # every search sees the unmodified block
        st = stats[consumers[0]]
        loss = _objective(objective, modules, consumers, inspect, st, calls)
        s, ratio, err, base = search_scales([modules[c].weight.data for c in consumers], st.abs_mean, spec,
                                            loss, n_grid)
        found.append((producer, consumers, s))
        records["+".join(consumers)] = {"ratio": ratio, "error": err, "error_scale1": base,
                                        "inspected": (inspect or consumers[0]) if objective == "module" else None}
    in_scale: dict[str, torch.Tensor] = {}  # consumers' inputs are now x / s
    for producer, consumers, s in found:
        _fold_into_producer(modules[producer], s)
        for c in consumers:
            modules[c].weight.data.mul_(s.view(1, -1).to(modules[c].weight.dtype))
            in_scale[c] = s
    for name, st in stats.items():
        lin = modules[name]
        w = lin.weight.data
        if clip and not name.endswith(NO_CLIP):
            s = in_scale.get(name)
            gram = st.gram if s is None else st.gram / s.view(-1, 1) / s.view(1, -1)
            w = search_clip(w, gram, spec, n_grid, max_shrink)
        lin.weight.data = quantize_weight(w, spec)
    return records


def _record_inspected(layers: nn.ModuleList, current: dict, calls: dict[str, list[Call]]) -> list:
    """Pre-hooks recording every call of each block's inspected modules while that block is current."""
    handles = []
    names = {inspect for _, _, inspect in SCALE_GROUPS if inspect is not None}
    for i, layer in enumerate(layers):
        mods = dict(layer.named_modules())
        for name in names & set(mods):
            def hook(_m, args, kwargs, i=i, name=name):  # returns None: never replaces the inputs
                if current["block"] == i:
                    calls.setdefault(name, []).append((args, kwargs))
            handles.append(mods[name].register_forward_pre_hook(hook, with_kwargs=True))
    return handles


@QUANTIZERS.register("awq", version=2, display="AWQ", calibration=True, sources=GRID)
def awq(model: nn.Module, *, bits: int, group_size: int | None = 128, sym: bool = False,
        calib_ids: torch.Tensor | None = None, device: str | None = None, progress: bool = True,
        objective: str = "module", n_grid: int = 20, max_shrink: float = 0.5, clip: bool = True,
        zero: str = "int", stats: dict[str, LayerStats] | None = None):
    """Quantize every decoder-block linear of `model` in place with AWQ on `calib_ids` [n, seqlen].

    `objective`: "module" (default, the reference's) measures each scale candidate at the output of
    the inspected module (attention for q/k/v, MLP for gate/up); "linear" sums each linear's own
    output error. `n_grid` (20) and `max_shrink` (0.5) are the reference's grids; `clip=False` skips
    the clipping search (the reference's `mse_range=False`).
    `stats`: only with objective="linear", the dense model's statistics from
    `calibration.collect_stats` on the same windows (that objective only needs them, so a bit-width
    sweep can gather them once; the result is identical to running the engine again)."""
    from mpt_utils.quant import QuantResult

    if objective not in OBJECTIVES:
        raise MPTError(f"unknown AWQ objective {objective!r}", f"use one of {OBJECTIVES}")
    if objective == "module" and stats is not None:
        raise MPTError("awq's module objective re-runs the blocks, so precomputed stats cannot replace them",
                       "pass calib_ids and drop stats=, or use objective='linear'")
    if calib_ids is None and stats is None:
        raise MPTError("awq needs calibration data", "pass calib_ids=calibration_windows(tokenizer, ...)")
    spec = check_spec(QuantSpec(bits, normalize_group_size(group_size), sym, zero), "awq")
    layers_list = decoder_layers(model)
    names = {id(layer): name for name, layer in model.named_modules() if any(layer is m for m in layers_list)}
    layers: dict[str, QuantSpec] = {}
    searches: dict[str, dict] = {}
    start = time.perf_counter()
    # The engine does not hand on_block the inputs of a block's submodules: pre-hooks record the
    # calls of the inspected modules during its statistics pass of the current block.
    calls: dict[str, list[Call]] = {}
    current = {"block": 0}

    def on_block(i: int, block: nn.Module, block_stats) -> None:
        # the last n calls are this block's statistics pass
        block_calls = {k: v[-calib_ids.shape[0]:] for k, v in calls.items()} if calls else None
        for key, rec in awq_block(block, block_stats, spec, n_grid, max_shrink, clip, objective=objective,
                                  calls=block_calls).items():
            searches[f"{i}:{key}"] = rec
        calls.clear()
        current["block"] = i + 1
        layers.update({f"{names[id(block)]}.{name}": spec for name in block_stats})

    if stats is None:
        handles = _record_inspected(layers_list, current, calls) if objective == "module" else []
        try:
            layerwise(model, calib_ids, on_block, sequential=False, device=device, progress=progress, desc="awq")
        finally:
            for h in handles:
                h.remove()
    else:
        from mpt_utils.models import pick_device

        dev = pick_device(device)
        for i, block in enumerate(layers_list):
            home = next(block.parameters()).device
            prefix = names[id(block)]
            block_stats = {n: copy.copy(st).to(dev) for key, st in stats.items()
                           if (n := key.removeprefix(prefix + ".")) != key}
            on_block(i, block.to(dev), block_stats)
            block.to(home)
    ratios = [r["ratio"] for r in searches.values()]
    return QuantResult("awq", spec, layers, time.perf_counter() - start,
                       extra={"mean_ratio": sum(ratios) / max(len(ratios), 1), "objective": objective,
                              "searches": searches})
