"""GPTQ: one-shot weight quantization from second-order layer statistics.

Reference: "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
E. Frantar, S. Ashkboos, T. Hoefler, D. Alistarh, arXiv:2210.17323; code github.com/IST-DASLab/gptq
(`gptq.py` `GPTQ.fasterquant` for one linear, `llama.py` `llama_sequential` for the block loop).

For each linear, with H = 2/n XᵀX from the calibration inputs, columns are quantized in turn and each
column's rounding error is spread over the not-yet-quantized columns through the upper Cholesky
factor of H⁻¹ (the OBS update), in lazy batches of `block_size` columns. Dampening adds
`damp`·mean(diag H) to the diagonal. As in `fasterquant`:
- act-order (`--act-order`) visits columns by decreasing diag(H);
- with groups, a group's grid is fitted when its first column comes up, on the weights as updated
  by the finished lazy batches (the reference reads `W`, not the in-batch copy `W1`); with act-order
  these groups are runs of the *permuted* columns, so each column stores its group index;
- static groups (`--static-groups`) fit every group's grid up front on the original columns
  [0, g), [g, 2g), …; act-order then only changes the visiting order, no per-column index is stored.

Blocks run through the shared engine `mpt_utils.calibration.layerwise` with sequential=True: block
i+1 is calibrated on the outputs of the already quantized block i. True-sequential
(`--true-sequential`) also goes sequential inside a block: [q, k, v] -> o -> [gate, up] -> down,
re-running the block on its inputs after each group so that later linears are calibrated on the
outputs of the quantized earlier ones.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
from torch import nn

from mpt_utils.calibration import LayerStats, decoder_layers, layerwise, linear_layers
from mpt_utils.errors import MPTError
from mpt_utils.quant import GRID, QUANTIZERS
from mpt_utils.quant.rtn import QuantSpec, check_spec, make_grid, normalize_group_size

# The reference's true-sequential order (llama.py), with the OPT names of the same roles.
SEQUENTIAL_ORDER = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj", "self_attn.out_proj"),
    ("mlp.gate_proj", "mlp.up_proj", "fc1"),
    ("mlp.down_proj", "fc2"),
)


def sequential_groups(names: Iterable[str]) -> list[list[str]]:
    """A block's linear names in true-sequential order; linears of no known role come last, together."""
    names = list(names)
    known = {n for group in SEQUENTIAL_ORDER for n in group}
    groups = [[n for n in names if n in group] for group in SEQUENTIAL_ORDER]
    groups.append([n for n in names if n not in known])
    return [g for g in groups if g]


@torch.no_grad()
def gptq_weight(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, damp: float = 0.01,
                block_size: int = 128, act_order: bool = False,
                static_groups: bool = False) -> tuple[torch.Tensor, float]:
    """Quantize one [out, in] weight with GPTQ; returns (de-quantized weight, summed OBS error)."""
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    cols = w.shape[1]
    g = spec.group_size
    grid = make_grid(w, spec) if g is None else None  # fitted before dead columns are zeroed, as the reference
    dead = torch.diagonal(h) == 0  # inputs never active: weights there cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    static = [make_grid(w[:, j : j + g], spec) for j in range(0, cols, g)] if g and static_groups else None
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diagonal(h)) * torch.eye(cols, device=h.device)
    try:
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        u = torch.linalg.cholesky(hinv, upper=True)
    except torch.linalg.LinAlgError:
        raise MPTError("GPTQ: the layer Hessian is not positive definite even after dampening",
                       "raise damp (e.g. 0.1) or use more calibration windows") from None

    q_all = torch.zeros_like(w)
    loss = torch.zeros(w.shape[0], device=w.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if static is not None:
                grid = static[(int(perm[c]) if perm is not None else c) // g]
            elif g is not None and c % g == 0:
                grid = make_grid(w[:, c : c + g], spec)
            col = w1[:, i : i + 1]
            q = grid.apply(col)
            q_all[:, c] = q[:, 0]
            e = (col - q) / u1[i, i]
            loss += (e[:, 0] ** 2) / 2
            w1[:, i:] -= e @ u1[i : i + 1, i:]
            err1[:, i] = e[:, 0]
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    if perm is not None:
        q_all = q_all[:, torch.argsort(perm)]
    return q_all.to(weight.dtype), float(loss.sum())


BlockCall = tuple[tuple, dict]  # (args, kwargs) of one forward call of a decoder block


@torch.no_grad()
def block_stats(block: nn.Module, names: list[str], calls: list[BlockCall]) -> dict[str, LayerStats]:
    """Input statistics of `names`, re-running the block (as it is now) on its recorded calls."""
    modules = dict(block.named_modules())
    dev = next(block.parameters()).device
    stats = {n: LayerStats(modules[n].in_features, dev) for n in names}

    def hook_for(st: LayerStats):
        def hook(_m, args, _o):  # returns None: never replaces the output
            st.add(args[0].detach())
        return hook

    handles = [modules[n].register_forward_hook(hook_for(stats[n])) for n in names]
    try:
        for args, kwargs in calls:
            block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.no_grad()
def gptq_block(block: nn.Module, stats: dict[str, LayerStats], spec: QuantSpec, *,
               calls: list[BlockCall] | None = None, damp: float = 0.01, block_size: int = 128,
               act_order: bool = True, static_groups: bool = True
               ) -> tuple[dict[str, float], dict[str, LayerStats]]:
    """Quantize every linear of one decoder block in place.

    `stats`: input statistics of the dense block. With `calls` (the block's forward inputs), the
    block is quantized true-sequentially: the first group of `sequential_groups` uses `stats`, each
    later group statistics re-collected on the block with the earlier groups already quantized.
    Returns the OBS loss of every linear and the statistics each one was quantized from."""
    modules = dict(block.named_modules())
    names = list(linear_layers(block))
    groups = sequential_groups(names) if calls is not None else [[n for n in names if n in stats]]
    losses: dict[str, float] = {}
    used: dict[str, LayerStats] = {}
    for k, group in enumerate(groups):
        group_stats = stats if k == 0 else block_stats(block, group, calls)
        for name in group:
            lin = modules[name]
            used[name] = group_stats[name]
            lin.weight.data, losses[name] = gptq_weight(lin.weight.data, group_stats[name].hessian, spec, damp,
                                                        block_size, act_order, static_groups)
    return losses, used


@QUANTIZERS.register("gptq", version=2, display="GPTQ", calibration=True, sources=GRID)
def gptq(model: nn.Module, *, bits: int, group_size: int | None = 128, sym: bool = False,
         calib_ids: torch.Tensor | None = None, device: str | None = None, progress: bool = True,
         damp: float = 0.01, block_size: int = 128, act_order: bool = True, static_groups: bool = True,
         true_sequential: bool = True, zero: str = "int"):
    """Quantize every decoder-block linear of `model` in place with GPTQ on `calib_ids` [n, seqlen].

    Defaults follow the reference README's recommendation for LLaMA (`--act-order --true-sequential`,
    which it reports fixes GPTQ on LLaMA-7B) and use `--static-groups` with groups, the README's way
    to combine act-order with grouping without per-column group indices (the reference's flags are
    all off by default). `act_order=False, true_sequential=False` gives the paper's original GPTQ;
    `static_groups=False` with act-order gives the reference's dynamic groups, whose per-column
    group index the size accounting charges. `damp` (0.01) and `block_size` (128) are the
    reference's `--percdamp` and `blocksize`."""
    from mpt_utils.quant import QuantResult

    if calib_ids is None:
        raise MPTError("gptq needs calibration data", "pass calib_ids=calibration_windows(tokenizer, ...)")
    if not 0 <= damp < 1:
        raise MPTError(f"damp={damp} is outside [0, 1)", "use the paper's 0.01")
    if not isinstance(block_size, int) or block_size < 1:
        raise MPTError(f"block_size={block_size!r} is invalid", "use a positive integer (the reference's 128)")
    group_size = normalize_group_size(group_size)
    g_idx = act_order and group_size is not None and not static_groups  # dynamic groups of permuted columns
    spec = check_spec(QuantSpec(bits, group_size, sym, zero, act_order_index=g_idx), "gptq")
    layers_list = decoder_layers(model)
    names = {id(layer): name for name, layer in model.named_modules() if any(layer is m for m in layers_list)}
    layers: dict[str, QuantSpec] = {}
    losses: dict[str, float] = {}
    start = time.perf_counter()

    # True-sequential re-runs a block on its own inputs, which the engine does not hand to on_block:
    # a pre-hook on each block records its calls (args, kwargs) during the engine's statistics pass.
    calls: dict[int, list[BlockCall]] = {}
    index = {id(layer): i for i, layer in enumerate(layers_list)}
    current = {"block": 0}

    def record(module, args, kwargs):  # returns None: never replaces the inputs
        if index[id(module)] == current["block"]:
            calls.setdefault(id(module), []).append((args, kwargs))

    handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers_list] \
        if true_sequential else []
    first = set(sequential_groups(linear_layers(layers_list[0]))[0]) if true_sequential else None

    def on_block(i: int, block: nn.Module, stats) -> None:
        # the last n calls are the statistics pass (block 0 also sees the engine's capture pass)
        block_calls = calls.pop(id(block), [])[-calib_ids.shape[0]:] if true_sequential else None
        current["block"] = i + 1  # the engine's re-run of this block is not recorded
        block_losses, _ = gptq_block(block, stats, spec, calls=block_calls, damp=damp, block_size=block_size,
                                     act_order=act_order, static_groups=static_groups)
        for name, loss in block_losses.items():
            losses[f"{names[id(block)]}.{name}"] = loss
            layers[f"{names[id(block)]}.{name}"] = spec

    try:
        layerwise(model, calib_ids, on_block, sequential=True, device=device, progress=progress, desc="gptq",
                  layer_filter=(lambda n: n in first) if true_sequential else None)
    finally:
        for h in handles:
            h.remove()
    return QuantResult("gptq", spec, layers, time.perf_counter() - start,
                       extra={"damp": damp, "act_order": act_order, "static_groups": static_groups,
                              "true_sequential": true_sequential, "block_size": block_size,
                              "obs_loss": sum(losses.values())})
