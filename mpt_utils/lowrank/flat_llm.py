"""FLAT-LLM: fine-grained low-rank transformations in the activation space, with importance-preserving
rank selection.

Reference: "FLAT-LLM: Fine-grained Low-rank Activation Space Transformation for Large Language Model
Compression", Tian, Solgi, Lu, Yang, Li and Zhang, arXiv:2505.23966, github.com/TTTTTTris/FLAT-LLM
(`lib/prune.py` `prune_flatllm` and `compute_bi`, `compute_rank.py`).

1. Importance-preserving rank selection (IPRS). Each decoder block's importance is its block
   influence on the dense model: the angular distance arccos(cos(h_in, h_out))/π between the
   hidden state entering and leaving the block, summed over the calibration tokens. The kept share
   φ_i of block i's V, O and MLP weights is proportional to its importance, capped at 1, the budget
   above a cap going to the others (greedy), with Σφ_i = N·r and r the kept share of V, O and MLP
   that meets the overall target when Q and K stay dense (as in the reference).
2. Head-wise PCA of the values (V, O). Per key/value head h, the eigenvectors Q_h of the covariance
   of its value outputs (W_v,h·XᵀX·W_v,hᵀ) give a basis ordered by energy; the leading r = ⌊φ·d_head⌋
   are kept: v_proj's rows of head h become Q_rᵀW_v,h and o_proj's columns of every query head that
   reads head h become W_o,·Q_r. The attention then runs on r-dimensional values (`FlatAttention`);
   keys and queries keep their full head dimension.
3. MLP. The reference keeps k = ⌊φ·d_int⌋ intermediate neurons with the largest ridge leverage scores
   diag(C(C + I)⁻¹) (C: Gram matrix of down_proj's inputs) and refits down_proj on them:
   W_down′ = W_down·C[:, S]·C[S, S]⁻¹ (gate and up keep the rows S). C[S, S] is inverted as a
   pseudo-inverse (eigenvalues below 1e-10 of the largest dropped): the same where it is well
   conditioned, finite where the calibration has fewer tokens than kept neurons (the reference's
   plain inverse fails there). With that few tokens (the smoke profile: 4 × 128 against 1536
   neurons) the refit still over-fits and the model collapses; the embedded 16 × 512 does not.
4. Sequential: block by block, each block's statistics come from the inputs that already went through
   the compressed blocks before it (`calibration.layerwise(sequential=True)`), as `prune_flatllm` does.

The ratio is, as for every low-rank method here, the fraction of all decomposed linears' weights
removed (Q and K count as kept). Integer head and neuron counts put the achieved reduction slightly
above the request; it is measured from the tensors.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from mpt_utils.calibration import LayerStats, decoder_layers, layerwise
from mpt_utils.errors import MPTError
from mpt_utils.lowrank import LOWRANK
from mpt_utils.lowrank.factorized import (
    LayerReduction,
    LowRankPlan,
    LowRankReport,
    count_params,
    get_module,
    set_module,
)

ATTN, MLP = "self_attn", "mlp"
PINV_RTOL = 1e-10  # eigenvalues of C[S, S] below this share of the largest are rounding noise (float64)


class FlatAttention(nn.Module):
    """A Llama attention whose values have `v_head_dim` < head_dim (queries and keys unchanged)."""

    def __init__(self, attn: nn.Module, v_proj: nn.Linear, o_proj: nn.Linear, v_head_dim: int):
        super().__init__()
        for key in ("config", "layer_idx", "head_dim", "num_key_value_groups", "scaling", "attention_dropout",
                    "is_causal"):
            setattr(self, key, getattr(attn, key))
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, v_proj, o_proj
        self.v_head_dim = int(v_head_dim)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None,
                **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

        cache = kwargs.pop("past_key_values", cache)
        shape = hidden_states.shape[:-1]
        query = self.q_proj(hidden_states).view(*shape, -1, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(*shape, -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(*shape, -1, self.v_head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attend(self, query, key, value, attention_mask,
                              dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
                              **kwargs)
        return self.o_proj(out.reshape(*shape, -1).contiguous()), weights


@torch.no_grad()
def block_influence(model: nn.Module, calib_ids: torch.Tensor, device: torch.device) -> list[float]:
    """Σ over calibration tokens of arccos(cos(h_in, h_out))/π per decoder block, on the dense model."""
    layers = decoder_layers(model)
    scores = [0.0] * len(layers)
    handles = []

    def hook(i):
        def fn(_m, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, (tuple, list)) else output
            x, y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
            sim = torch.nn.functional.cosine_similarity(x, y, dim=-1).nan_to_num(0.5).clamp(0, 1)
            scores[i] += float((torch.arccos(sim) / math.pi).sum())
        return fn

    home = next(model.parameters()).device
    model.to(device)
    try:
        handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
        for row in calib_ids.to(device):
            model(input_ids=row[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.to(home)
    return scores


def proportional_with_cap(importance: Sequence[float], budget: float) -> list[float]:
    """φ_i ∝ importance, Σφ = budget, each φ ≤ 1: capped blocks are fixed at 1, the rest re-shared."""
    if budget >= len(importance):
        return [1.0] * len(importance)
    phi = [0.0] * len(importance)
    free = list(range(len(importance)))
    while free:
        total = sum(importance[i] for i in free)
        share = {i: (importance[i] / total * budget if total > 0 else budget / len(free)) for i in free}
        over = [i for i in free if share[i] > 1]
        if not over:
            for i in free:
                phi[i] = share[i]
            break
        for i in over:
            phi[i] = 1.0
        budget -= len(over)
        free = [i for i in free if i not in over]
    return phi


def _flat_block(block: nn.Module, stats: dict[str, LayerStats], phi: float, n_heads: int, n_kv: int,
                ridge: float, device: torch.device) -> dict[str, nn.Module]:
    """Compress one block in place at kept share φ; returns the replaced modules by name in the block."""
    attn, mlp = block.self_attn, block.mlp
    replaced: dict[str, nn.Module] = {}
    # values: head-wise PCA of v_proj's outputs, from its input Gram matrix
    wv = attn.v_proj.weight.detach().to(device, torch.float64)
    wo = attn.o_proj.weight.detach().to(device, torch.float64)
    d_head = wv.shape[0] // n_kv
    r = max(int(phi * d_head), 1)
    gram = stats["self_attn.v_proj"].gram.to(device, torch.float64)
    wv_h = wv.view(n_kv, d_head, -1)
    cov = wv_h @ gram @ wv_h.transpose(1, 2)  # [kv, d_head, d_head]
    _, vecs = torch.linalg.eigh(cov)
    basis = vecs.flip(-1)[..., :r]  # the r leading eigenvectors per kv head
    new_v = (basis.transpose(1, 2) @ wv_h).reshape(n_kv * r, -1)
    wo_h = wo.view(wo.shape[0], n_heads, d_head).transpose(0, 1)  # [heads, out, d_head]
    kv_of = torch.arange(n_heads, device=device) // (n_heads // n_kv)
    new_o = (wo_h @ basis[kv_of]).transpose(0, 1).reshape(wo.shape[0], n_heads * r)
    v_lin = _linear(new_v, attn.v_proj)
    o_lin = _linear(new_o, attn.o_proj)
    replaced["self_attn"] = attn
    block.self_attn = FlatAttention(attn, v_lin, o_lin, r)
    # MLP: ridge leverage scores of the intermediate activations, Nyström refit of down_proj
    c = stats["mlp.down_proj"].gram.to(device, torch.float64)
    d_int = c.shape[0]
    k = max(int(phi * d_int), 1)
    eye = torch.eye(d_int, dtype=c.dtype, device=device)
    scores = torch.diagonal(torch.linalg.solve(c + ridge * eye, c))  # diag(C(C+λI)⁻¹); C symmetric
    keep = torch.topk(scores, k).indices.sort().values
    w_down = mlp.down_proj.weight.detach().to(device, torch.float64)
    # W·C[:, S]·C[S, S]⁻¹; the pseudo-inverse equals the inverse when C[S, S] is invertible and stays
    # finite when it is not (fewer calibration tokens than kept neurons)
    new_down = w_down @ c[:, keep] @ torch.linalg.pinv(c[keep][:, keep], hermitian=True, rtol=PINV_RTOL)
    for name, weight in (("gate_proj", mlp.gate_proj.weight[keep]), ("up_proj", mlp.up_proj.weight[keep]),
                         ("down_proj", new_down)):
        old = getattr(mlp, name)
        bias = old.bias if name == "down_proj" or old.bias is None else old.bias[keep]
        replaced[f"mlp.{name}"] = old
        setattr(mlp, name, _linear(weight, old, bias))
    return replaced


def _linear(weight: torch.Tensor, like: nn.Linear, bias: torch.Tensor | None = None) -> nn.Linear:
    dev, dtype = like.weight.device, like.weight.dtype
    bias = like.bias if bias is None and like.bias is not None and like.bias.shape[0] == weight.shape[0] else bias
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=dev, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(weight.to(dev, dtype))
        if bias is not None:
            lin.bias.copy_(bias.detach().to(dev, dtype))
    return lin


class FlatLLMPlan(LowRankPlan):
    """Block importances measured once; `apply(model, ratio)` runs the sequential compression pass."""

    def __init__(self, model: nn.Module, calib_ids: torch.Tensor, importance: list[float], device: torch.device,
                 ridge: float, progress: bool):
        self.calib_ids, self.importance, self.device = calib_ids, importance, device
        self.ridge, self.progress = ridge, progress
        cfg = model.config
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.prefixes = [n for n, m in model.named_modules() if any(m is b for b in decoder_layers(model))]
        parts = {"q_proj": ATTN, "k_proj": ATTN, "v_proj": ATTN, "o_proj": ATTN,
                 "gate_proj": MLP, "up_proj": MLP, "down_proj": MLP}
        names = [f"{p}.{part}.{n}" for p in self.prefixes for n, part in parts.items()]
        self._shapes = {n: tuple(get_module(model, n).weight.shape) for n in names}
        self._last: tuple[float, dict[str, nn.Module]] | None = None
        super().__init__("flat_llm", {}, self.kept_shares,
                         {"calibration": True, "importance": importance, "ridge": ridge, "kept_share": {}})

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self._shapes)

    def kept_shares(self, ratio: float) -> dict[str, float]:
        """φ per block (the kept share of its V, O and MLP weights) that meets `ratio` overall."""
        total = sum(o * i for o, i in self._shapes.values())
        qk = sum(o * i for n, (o, i) in self._shapes.items() if n.endswith(("q_proj", "k_proj")))
        rest = total - qk
        kept = ((1 - ratio) * total - qk) / rest
        if kept <= 0:
            raise MPTError(f"ratio={ratio} would remove more than every V, O and MLP weight (Q and K stay dense)",
                           f"use a ratio below {rest / total:.2f}")
        phi = proportional_with_cap(self.importance, kept * len(self.importance))
        out = dict(zip(self.prefixes, phi))
        self.info["kept_share"][ratio] = out
        return out

    def apply(self, model: nn.Module, ratio: float) -> LowRankReport:
        start = time.perf_counter()
        before = count_params(model)
        phi = self.ranks(ratio)
        originals: dict[str, nn.Module] = {}
        if self._last is not None and self._last[0] == ratio:  # the same ratio again (another corpus)
            dev = next(model.parameters()).device
            for name, module in self._last[1].items():
                originals[name] = set_module(model, name, copy.deepcopy(module).to(dev))
        elif any(p < 1 for p in phi.values()):
            home = next(model.parameters()).device
            position = {id(b): p for p, b in zip(self.prefixes, decoder_layers(model))}

            def on_block(_i: int, block: nn.Module, stats: dict[str, LayerStats]) -> None:
                prefix = position[id(block)]
                if phi[prefix] >= 1:
                    return
                for name, old in _flat_block(block, stats, phi[prefix], self.n_heads, self.n_kv, self.ridge,
                                             self.device).items():
                    originals[f"{prefix}.{name}"] = old.to(home)

            layerwise(model, self.calib_ids, on_block, sequential=True, device=self.device, progress=self.progress,
                      desc="flat_llm sequential")
            self._last = (ratio, {n: copy.deepcopy(get_module(model, n)).cpu() for n in originals})
        layers = [self._reduction(model, n) for n in self._shapes]
        return LowRankReport(self.method, ratio, layers, before, count_params(model), time.perf_counter() - start,
                             originals)

    def apply_shapes(self, model: nn.Module, ratio: float) -> LowRankReport:
        return self.apply(model, ratio)

    def _reduction(self, model: nn.Module, name: str) -> LayerReduction:
        out_f, in_f = self._shapes[name]
        weight = get_module(model, name).weight
        kept = weight.shape[0] if weight.shape[0] != out_f else (weight.shape[1] if weight.shape[1] != in_f else 0)
        return LayerReduction(name, out_f, in_f, kept, out_f * in_f, weight.numel())


@LOWRANK.register("flat_llm", version=1, display="FLAT-LLM", calibration=True, mode="II")
def plan_flat_llm(model: nn.Module, calib_ids: torch.Tensor | None = None, *,
                  stats: dict[str, LayerStats] | None = None, device: str | torch.device | None = None,
                  layer_filter: Callable[[str], bool] | None = None, progress: bool = True,
                  ridge: float = 1.0) -> LowRankPlan:
    """FLAT-LLM: block importances now, the sequential head-wise PCA / neuron selection at `apply`.
    `ridge` is the λ of the leverage scores diag(C(C + λI)⁻¹) (the reference: 1, on C summed over
    the calibration tokens). Needs calib_ids (its statistics come from the compressed prefix, so
    `stats` of the dense model are not used); `layer_filter` is not supported (V, O and the MLP of
    every block are compressed together, Q and K never)."""
    from mpt_utils.models import pick_device

    if calib_ids is None:
        raise MPTError("FLAT-LLM compresses block by block on calibration windows", "pass calib_ids")
    if layer_filter is not None:
        raise MPTError("FLAT-LLM compresses V, O and the MLP of every block together", "drop layer_filter")
    if ridge <= 0:
        raise MPTError(f"ridge={ridge} must be positive", "the reference uses 1.0")
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", "") not in ("llama", "mistral") or any(
            b.self_attn.v_proj.bias is not None for b in decoder_layers(model)):
        raise MPTError("FLAT-LLM's attention rewrite supports Llama-style attention without biases only",
                       "use a Llama or Mistral model")
    dev = pick_device(device)
    importance = block_influence(model, calib_ids, dev)
    return FlatLLMPlan(model, calib_ids, importance, dev, ridge, progress)
