"""MoDeGPT: training-free modular decomposition of each transformer block.

Reference: "MoDeGPT: Modular Decomposition for Large Language Model Compression", Chi-Heng Lin,
Shangqian Gao, James Seale Smith, Abhishek Patel, Shikhar Tuli, Yilin Shen, Hongxia Jin and Yen-Chang
Hsu, arXiv:2408.09632 (ICLR 2025); implemented from the paper's equations.

A block is three modules, each a pair of matrices compressed jointly on its calibration inputs
(sequentially: block i sees the outputs of the compressed blocks before it):

- Type I, MLP (`gate`, `up` → `down`): Nyström approximation. Keep the k intermediate neurons with the
  largest ridge leverage scores of the correlation C_σ of the down-projection's inputs,
  s_i = [C_σ (C_σ + λI)⁻¹]_ii (λ = `ridge` × mean diag C_σ), slice gate/up to them and re-fit
  W_down ← W_down·C_σ[:, S]·(C_σ[S, S])⁻¹, the least-squares map from the kept neurons to the full
  output.
- Type II, key-query (`q`, `k`): CR decomposition. Keep the head dimensions with the largest
  ‖C_q^½[:, i]‖·‖C_k^½[:, i]‖ = √(C_q,ii·C_k,ii) (C_q, C_k: correlations of the query and key
  outputs). With rotary embeddings dimensions i and i + d_h/2 rotate together, so whole rotary pairs
  are kept; with grouped-query attention a key head's dimensions serve all its query heads, so their
  scores add. The dropped dimensions are zero in q and k, which removes them from q·kᵀ exactly.
- Type III, value-output (`v`, `o`): SVD. The rank-k W_V′·W_O′ closest to W_V·W_O on the data,
  min ‖X(W_V W_O − W_V′ W_O′)‖, from the SVD of C^½·W_V·W_O (C the inputs' correlation), computed
  through QR factors of the two thin matrices; with grouped-query attention one value head and
  all the output slices of its query heads form one pair.

Global sparsity allocation: layer importance s_l = 1 − mean cos(block input, block output) on the
calibration windows, and sparsities φ = L·φ̄·softmax(−s/ε) (the entropy-regularised allocation of
the paper), capped at `max_sparsity` with the excess spread over the other layers. Every module of
a layer gets its layer's sparsity, so a layer's parameters shrink by φ_l and the ratio (the
parameter reduction of the decoder linears) is φ̄; kept widths are rounded down, so the measured
reduction is at or slightly above the request. ε, the allocation's temperature, is an option (0.1);
`allocation="uniform"` gives every layer φ̄ (on the embedded model at 0.2 the global allocation
gives PPL 125 against 174 uniform).

Supported: Llama-style blocks (q/k/v/o with rotate-half rotary embeddings, gated MLP), e.g. Llama,
Mistral, Qwen2. The compressed layers keep the dense widths at their interfaces (zeros in the
dropped q/k/v features), so the stock attention code runs unchanged while only the kept weights
are stored.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn

from mpt_utils.calibration import LayerStats, decoder_layers, layerwise
from mpt_utils.errors import MPTError
from mpt_utils.lowrank import LOWRANK
from mpt_utils.lowrank._structured import GatherLinear, ScatterLinear, ShrunkLinear
from mpt_utils.lowrank.factorized import (
    LowRankPlan,
    LowRankReport,
    count_params,
    get_module,
    layer_reduction,
    set_module,
)
from mpt_utils.lowrank.ranks import check_lowrank_ratio
from mpt_utils.lowrank.svd_llm import whitening

MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
ALLOCATIONS = ("global", "uniform")


# ----------------------------------------------------------------------------------------------
# the three module types, on weight tensors (float64 inside)
# ----------------------------------------------------------------------------------------------

def ridge_leverage(corr: torch.Tensor, ridge: float) -> torch.Tensor:
    """s_i = [C (C + λI)⁻¹]_ii with λ = ridge · mean diag C, as 1 − λ·[(C + λI)⁻¹]_ii (one Cholesky
    factorization instead of an eigendecomposition: ~10× faster for the 1536-wide MLP of the
    embedded model, same values)."""
    c = corr.double()
    lam = ridge * float(torch.diagonal(c).mean().clamp_min(1e-30))
    shifted = c + lam * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    inv = torch.cholesky_inverse(torch.linalg.cholesky(shifted))
    return 1.0 - lam * torch.diagonal(inv)


@torch.no_grad()
def nystrom_mlp(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, corr: torch.Tensor, keep: int,
                ridge: float = 1e-2, index: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Type I: (kept neuron indices, gate [k, d], up [k, d], down [d, k]). `index` overrides the
    leverage selection (for baselines); the down-projection is re-fitted either way."""
    if index is None:
        index = torch.topk(ridge_leverage(corr, ridge), keep).indices.sort().values
    c = corr.double().to(w_down.device)
    idx = index.to(c.device)
    sub = c[idx][:, idx]
    sub = sub + 1e-10 * float(torch.diagonal(sub).mean().clamp_min(1e-30)) * torch.eye(len(idx), dtype=c.dtype,
                                                                                       device=c.device)
    # W_down·C[:, S]·C[S, S]⁻¹, solved rather than inverted
    down = torch.linalg.solve(sub, (w_down.double() @ c[:, idx]).T).T
    return index, w_gate[index], w_up[index], down.to(w_down.dtype)


def rotary_pair_dims(scores: torch.Tensor, keep_pairs: int) -> torch.Tensor:
    """Head dimensions of the `keep_pairs` best rotary pairs (i, i + d/2), sorted."""
    half = scores.shape[-1] // 2
    pair = scores[..., :half] + scores[..., half:]
    top = torch.topk(pair, keep_pairs).indices.sort().values
    return torch.cat([top, top + half])


@torch.no_grad()
def cr_key_query(w_q: torch.Tensor, w_k: torch.Tensor, corr_x: torch.Tensor, n_heads: int, n_kv: int,
                 head_dim: int, keep_pairs: int) -> list[torch.Tensor]:
    """Type II: for each key head, the kept head dimensions (rotary pairs) by the CR scores."""
    c = corr_x.double().to(w_q.device)
    q = w_q.double().reshape(n_heads, head_dim, -1)
    k = w_k.double().reshape(n_kv, head_dim, -1)
    q_var = torch.einsum("hid,de,hie->hi", q, c, q).clamp_min(0).sqrt()  # ‖C_q^½ e_i‖ per query head
    k_var = torch.einsum("gid,de,gie->gi", k, c, k).clamp_min(0).sqrt()
    group = n_heads // n_kv
    dims = []
    for g in range(n_kv):
        score = k_var[g] * q_var[g * group:(g + 1) * group].sum(0)
        dims.append(rotary_pair_dims(score, keep_pairs))
    return dims


@torch.no_grad()
def svd_value_output(w_v: torch.Tensor, w_o: torch.Tensor, corr_x: torch.Tensor, n_heads: int, n_kv: int,
                     head_dim: int, keep: int, damp: float = 1e-6, whiten: bool = True
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Type III: per key-value group g, (A_g [d_h, k], B_g [k, d_h]) with W_V′ = W_V,g·A_g and
    W_O,h′ = B_g·W_O,h, minimising ‖L_Cᵀ(W_V W_O − W_V′ W_O′)‖ (whiten=False: plain SVD of W_V W_O)."""
    if whiten:
        lower, _ = whitening(corr_x.double().to(w_v.device), damp)
    else:
        lower = torch.eye(w_v.shape[1], dtype=torch.float64, device=w_v.device)
    group = n_heads // n_kv
    a_list, b_list = [], []
    for g in range(n_kv):
        wv = w_v[g * head_dim:(g + 1) * head_dim].double().T  # [d, d_h]
        wo = torch.cat([w_o[:, h * head_dim:(h + 1) * head_dim].double().T  # [d_h, d] per head
                        for h in range(g * group, (g + 1) * group)], dim=1)
        _, r_m = torch.linalg.qr(lower.T @ wv)
        _, r_n = torch.linalg.qr(wo.T)
        u, s, vh = torch.linalg.svd(r_m @ r_n.T)
        root = s[:keep].sqrt()
        a_list.append(torch.linalg.pinv(r_m) @ (u[:, :keep] * root))
        b_list.append((root[:, None] * vh[:keep]) @ torch.linalg.pinv(r_n.T))
    return a_list, b_list


# ----------------------------------------------------------------------------------------------
# allocation
# ----------------------------------------------------------------------------------------------

def allocate_sparsity(importance: torch.Tensor | list[float], target: float, epsilon: float = 0.1,
                      max_sparsity: float = 0.9) -> list[float]:
    """φ_l = L·φ̄·softmax(−s_l/ε), capped at `max_sparsity` with the excess given to the other layers in
    the same proportions; the mean stays φ̄."""
    s = torch.as_tensor(importance, dtype=torch.float64)
    n = s.numel()
    if target > max_sparsity:
        raise MPTError(f"ratio {target} is above max_sparsity={max_sparsity}", "lower the ratio or raise max_sparsity")
    weight = torch.softmax(-s / epsilon, 0)
    phi = torch.zeros(n, dtype=torch.float64)
    free = torch.ones(n, dtype=torch.bool)
    budget = target * n
    for _ in range(n):
        phi[free] = budget * weight[free] / weight[free].sum()
        over = free & (phi > max_sparsity)
        if not over.any():
            break
        phi[over] = max_sparsity
        free &= ~over
        budget = target * n - float(phi[~free].sum())
    return [float(p) for p in phi]


@torch.no_grad()
def block_importance(model: nn.Module, calib_ids: torch.Tensor, device: torch.device) -> list[float]:
    """1 − mean cosine similarity between each block's input and output hidden states."""
    layers = decoder_layers(model)
    sums = [0.0] * len(layers)
    count = [0] * len(layers)
    inputs: dict[int, torch.Tensor] = {}

    def pre(i):
        def hook(_m, args, kwargs):
            inputs[i] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    def post(i):
        def hook(_m, _args, _kwargs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            cos = torch.nn.functional.cosine_similarity(inputs.pop(i).float(), out.float(), dim=-1)
            sums[i] += float(cos.sum())
            count[i] += cos.numel()
        return hook

    home = next(model.parameters()).device
    model.to(device)
    handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(post(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for window in calib_ids:
            model(input_ids=window.unsqueeze(0).to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.to(home)
    return [1.0 - s / max(c, 1) for s, c in zip(sums, count)]


# ----------------------------------------------------------------------------------------------
# compressing one block
# ----------------------------------------------------------------------------------------------

def _attention_shape(attn: nn.Module) -> tuple[int, int, int]:
    cfg = attn.config
    head_dim = int(getattr(attn, "head_dim", cfg.hidden_size // cfg.num_attention_heads))
    return int(cfg.num_attention_heads), int(getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)), head_dim


def _check_block(block: nn.Module) -> None:
    names = set(dict(block.named_modules()))
    missing = [n for n in (*MLP, *ATTN) if n not in names]
    if missing:
        raise MPTError(f"MoDeGPT needs Llama-style blocks; this one has no {missing[0]}",
                       "use a Llama, Mistral or Qwen2 model")
    attn = block.get_submodule("self_attn")
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        raise MPTError("MoDeGPT's key-query slicing cannot pass through per-head q/k norms (Gemma 3, Qwen3)",
                       "use a Llama, Mistral or Qwen2 model")


def _slice_bias(bias: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    return None if bias is None else bias[index]


@torch.no_grad()
def compress_block(block: nn.Module, stats: dict[str, LayerStats], sparsity: float, *, ridge: float,
                   damp: float, modules: tuple[str, ...] = ("mlp", "qk", "vo")) -> dict[str, nn.Module]:
    """Compress one block in place at `sparsity`; returns the replaced dense linears by in-block name."""
    replaced: dict[str, nn.Module] = {}
    if sparsity <= 0:
        return replaced
    lin = {n: block.get_submodule(n) for n in (*MLP, *ATTN)}
    if "mlp" in modules:
        h = stats["mlp.down_proj"]
        d_int = lin["mlp.gate_proj"].out_features
        keep = max(1, math.floor((1 - sparsity) * d_int + 1e-9))
        if keep < d_int:
            gate, up, down = (lin[n] for n in MLP)
            corr = h.gram.to(gate.weight.device) / max(h.n, 1)
            idx, wg, wu, wd = nystrom_mlp(gate.weight, up.weight, down.weight, corr, keep, ridge)
            dev = gate.weight.device
            news = {"mlp.gate_proj": ShrunkLinear(wg, _slice_bias(gate.bias, idx), (d_int, gate.in_features), keep),
                    "mlp.up_proj": ShrunkLinear(wu, _slice_bias(up.bias, idx), (d_int, up.in_features), keep),
                    "mlp.down_proj": ShrunkLinear(wd.to(dev), down.bias, (down.out_features, d_int), keep)}
            for n, m in news.items():
                replaced[n] = set_module(block, n, m)
    attn = block.get_submodule("self_attn")
    n_heads, n_kv, head_dim = _attention_shape(attn)
    x = stats["self_attn.q_proj"]
    corr_x = x.gram / max(x.n, 1)
    group = n_heads // n_kv
    if "qk" in modules:
        keep_pairs = max(1, math.floor((1 - sparsity) * head_dim / 2 + 1e-9))
        if 2 * keep_pairs < head_dim:
            q, k = lin["self_attn.q_proj"], lin["self_attn.k_proj"]
            dims = cr_key_query(q.weight, k.weight, corr_x.to(q.weight.device), n_heads, n_kv, head_dim, keep_pairs)
            q_idx = torch.cat([h * head_dim + dims[h // group] for h in range(n_heads)]).to(q.weight.device)
            k_idx = torch.cat([g * head_dim + dims[g] for g in range(n_kv)]).to(k.weight.device)
            replaced["self_attn.q_proj"] = set_module(block, "self_attn.q_proj", ScatterLinear(
                q.weight[q_idx], q_idx, q.out_features, _slice_bias(q.bias, q_idx)))
            replaced["self_attn.k_proj"] = set_module(block, "self_attn.k_proj", ScatterLinear(
                k.weight[k_idx], k_idx, k.out_features, _slice_bias(k.bias, k_idx)))
    if "vo" in modules:
        keep = max(1, math.floor((1 - sparsity) * head_dim + 1e-9))
        if keep < head_dim:
            v, o = lin["self_attn.v_proj"], lin["self_attn.o_proj"]
            a_list, b_list = svd_value_output(v.weight, o.weight, corr_x.to(v.weight.device), n_heads, n_kv,
                                              head_dim, keep, damp)
            dt, dev = v.weight.dtype, v.weight.device
            v_rows, v_bias, o_cols = [], [], []
            for g in range(n_kv):
                block_v = v.weight[g * head_dim:(g + 1) * head_dim].double()  # [d_h, d]
                v_rows.append(a_list[g].T @ block_v)
                if v.bias is not None:
                    v_bias.append(a_list[g].T @ v.bias[g * head_dim:(g + 1) * head_dim].double())
                for h in range(g * group, (g + 1) * group):
                    o_cols.append(o.weight[:, h * head_dim:(h + 1) * head_dim].double() @ b_list[g].T)
            v_idx = torch.cat([g * head_dim + torch.arange(keep) for g in range(n_kv)]).to(dev)
            o_idx = torch.cat([h * head_dim + torch.arange(keep) for h in range(n_heads)]).to(dev)
            bias = torch.cat(v_bias).to(dt) if v_bias else None
            replaced["self_attn.v_proj"] = set_module(block, "self_attn.v_proj", ScatterLinear(
                torch.cat(v_rows).to(dt), v_idx, v.out_features, bias))
            replaced["self_attn.o_proj"] = set_module(block, "self_attn.o_proj", GatherLinear(
                torch.cat(o_cols, dim=1).to(dt), o_idx, o.in_features, o.bias))
    return replaced


# ----------------------------------------------------------------------------------------------
# the plan
# ----------------------------------------------------------------------------------------------

class MoDeGPTPlan(LowRankPlan):
    """Layer importances from the dense model, computed once; `apply(ratio)` allocates the sparsities and
    compresses block by block on the compressed prefix's inputs."""

    def __init__(self, model: nn.Module, calib_ids: torch.Tensor, importance: list[float], device: torch.device,
                 modules: tuple[str, ...], progress: bool, ridge: float, damp: float, epsilon: float,
                 max_sparsity: float, allocation: str):
        layers = decoder_layers(model)
        prefix = {id(b): n for n, b in model.named_modules() if any(b is m for m in layers)}
        self.block_names = [prefix[id(b)] for b in layers]
        names = [*(MLP if "mlp" in modules else ()), *(ATTN[:2] if "qk" in modules else ()),
                 *(ATTN[2:] if "vo" in modules else ())]
        self.names = [f"{b}.{n}" for b in self.block_names for n in names]
        self._shapes = {}
        for n in self.names:
            mod = get_module(model, n)
            self._shapes[n] = (mod.out_features, mod.in_features)
        super().__init__("modegpt", {}, self._allocate_widths,
                         {"calibration": True, "importance": importance, "allocation": allocation,
                          "epsilon": epsilon, "ridge": ridge, "modules": modules, "sparsities": {}})
        self.calib_ids, self.device, self.modules, self.progress = calib_ids, device, modules, progress
        self.ridge, self.damp, self.epsilon, self.max_sparsity = ridge, damp, epsilon, max_sparsity
        self.allocation, self.importance = allocation, importance

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self._shapes)

    def sparsities(self, ratio: float) -> list[float]:
        ratio = check_lowrank_ratio(ratio)
        if self.allocation == "uniform":
            return [ratio] * len(self.block_names)
        return allocate_sparsity(self.importance, ratio, self.epsilon, self.max_sparsity)

    def _allocate_widths(self, ratio: float) -> dict[str, int]:
        """1 for every linear whose block is compressed at `ratio`, 0 where the block stays dense (the
        kept widths follow from the block's sparsity in `compress_block`)."""
        out = {}
        for block, phi in zip(self.block_names, self.sparsities(ratio)):
            for n in self.names:
                if n.startswith(f"{block}."):
                    out[n] = 0 if phi <= 0 else 1
        return out

    def apply(self, model: nn.Module, ratio: float) -> LowRankReport:
        start = time.perf_counter()
        phis = self.sparsities(ratio)
        self.info["sparsities"][ratio] = phis
        before = count_params(model)
        home = next(model.parameters()).device
        originals: dict[str, nn.Module] = {}
        position = dict(zip(self.block_names, range(len(self.block_names))))
        block_of = {id(get_module(model, b)): b for b in self.block_names}

        def on_block(_i: int, block: nn.Module, stats: dict[str, LayerStats]) -> None:
            name = block_of[id(block)]
            done = compress_block(block, stats, phis[position[name]], ridge=self.ridge, damp=self.damp,
                                  modules=self.modules)
            originals.update({f"{name}.{n}": m.to(home) for n, m in done.items()})

        if ratio > 0:
            layerwise(model, self.calib_ids, on_block, sequential=True, device=self.device,
                      layer_filter=lambda n: n in ("self_attn.q_proj", "mlp.down_proj"), progress=self.progress,
                      desc="MoDeGPT blocks")
        layers = [layer_reduction(n, get_module(model, n)) for n in self.names]
        return LowRankReport(self.method, ratio, layers, before, count_params(model), time.perf_counter() - start,
                             originals)

    def apply_shapes(self, model: nn.Module, ratio: float) -> LowRankReport:
        return self.apply(model, ratio)


@LOWRANK.register("modegpt", version=1, display="MoDeGPT", calibration=True, mode="II")
def plan_modegpt(model: nn.Module, calib_ids: torch.Tensor | None = None, *,
                 stats: dict[str, LayerStats] | None = None, device: str | torch.device | None = None,
                 layer_filter: Callable[[str], bool] | None = None, progress: bool = True,
                 ridge: float = 1e-2, epsilon: float = 0.1, max_sparsity: float = 0.9,
                 allocation: str = "global", damp: float = 1e-6) -> LowRankPlan:
    """MoDeGPT (module docstring). Needs calib_ids (the compression is sequential, so precomputed
    `stats` of the dense model are not used). `layer_filter` sees in-block names: a module (MLP,
    key-query, value-output) is compressed only when all its linears pass it."""
    from mpt_utils.models import pick_device

    if calib_ids is None:
        raise MPTError("MoDeGPT compresses on calibration windows", "pass calib_ids=calibration_windows(...)")
    if allocation not in ALLOCATIONS:
        raise MPTError(f"unknown MoDeGPT allocation {allocation!r}", f"use one of {ALLOCATIONS}")
    if ridge <= 0 or epsilon <= 0 or not 0 < max_sparsity < 1:
        raise MPTError(f"invalid MoDeGPT options (ridge={ridge}, epsilon={epsilon}, max_sparsity={max_sparsity})",
                       "use ridge > 0, epsilon > 0 and max_sparsity in (0, 1)")
    for block in decoder_layers(model):
        _check_block(block)
    ok = (lambda n: True) if layer_filter is None else layer_filter
    modules = tuple(m for m, names in (("mlp", MLP), ("qk", ATTN[:2]), ("vo", ATTN[2:]))
                    if all(ok(n) for n in names))
    if not modules:
        raise MPTError("layer_filter leaves no MoDeGPT module (MLP, key-query, value-output) whole", "check layer_filter")
    dev = pick_device(device)
    importance = block_importance(model, calib_ids, dev) if allocation == "global" else []
    return MoDeGPTPlan(model, calib_ids, importance, dev, modules, progress, ridge, damp, epsilon, max_sparsity,
                       allocation)
