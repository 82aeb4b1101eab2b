"""SoLA: soft activation sparsity (a few prime MLP neurons kept whole) plus whitened low rank for the rest.

Reference: "SoLA: Leveraging Soft Activation Sparsity and Low-Rank Decomposition for Large Language
Model Compression", Xinhao Huang, You-Liang Huang, Zeyi Wen, AAAI 2025, arXiv:2604.03258; code: the
authors' GitHub repository SoLA (`sola_neuron_idx/` for the neuron norms, `sola/training_sola.py`
and `sola/` for the decomposition).

1. Prime neurons. On the dense model, each MLP neuron j's score is the mean over calibration tokens
   of |a_j|, a = act(gate(x))·up(x) the input of down_proj (the reference's `neurons_dict` norm
   divided by the token count). The `prime_share` (reference: 15 %) with the largest score are the
   "heavy hitters": their rows of gate/up and their columns of down stay in full rank.
2. Marginal neurons. The other rows of gate/up and columns of down, and q, k and o of the attention
   (v stays dense, as in the reference), are factorized by the SVD of W·L with XᵀX = L·Lᵀ the
   Cholesky factor of the dense calibration Gram matrix of the layer's inputs (for down, the Gram
   matrix restricted to the marginal neurons), truncated to rank r: up = U_r Σ_r^½, down =
   Σ_r^½ V_rᵀ L⁻¹ (the reference's `get_uv`).
3. The first and last `skip_layers` (reference: 2) decoder blocks stay dense.

Deviation, rank allocation. The paper's adaptive component-wise allocation is run in the reference
as one rank per matrix type (q, k, o, gate, up, down) from tables hand-tuned for Llama-2 7B/13B at
20-50 % compression (its automatic search is commented out and tied to those models' sizes), and it
leaves o_proj dense at 20 %. Those tables do not transfer
to other shapes, so here every factorized matrix gets the same parameter reduction, the one that
makes the whole set of decomposed linears meet `ratio` (SVD-LLM's uniform allocation).

The ratio is, as for every low-rank method here, the fraction of the decoder linears' weights
removed; v_proj, the skipped blocks and the prime neurons count as kept. Integer ranks put the
achieved reduction slightly above the request; it is measured from the tensors.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from mpt_utils.calibration import LayerStats, collect_stats, decoder_layers
from mpt_utils.errors import MPTError
from mpt_utils.lowrank import LOWRANK
from mpt_utils.lowrank.factorized import (
    Factorization,
    LowRankLinear,
    LowRankPlan,
    LowRankReport,
    count_params,
    get_module,
    layer_reduction,
    set_module,
    target_linears,
)
from mpt_utils.lowrank.ranks import rank_for_ratio
from mpt_utils.lowrank.svd import scaled_svd
from mpt_utils.lowrank.svd_llm import whitening
from mpt_utils.progress import progress_bar

ATTN_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj")
ROW_PARTS = ("mlp.gate_proj", "mlp.up_proj")  # neurons are output rows
COL_PART = "mlp.down_proj"  # neurons are input columns


class PrimeLowRankLinear(nn.Module):
    """A linear whose prime neurons (output rows, or input columns with `split="in"`) keep their dense
    weights and whose other neurons go through a rank-r factorization."""

    def __init__(self, heavy: nn.Linear, low: LowRankLinear, prime: torch.Tensor, marginal: torch.Tensor,
                 dense_shape: tuple[int, int], split: str):
        super().__init__()
        self.heavy, self.low, self.split = heavy, low, split
        self.register_buffer("prime", prime.clone())
        self.register_buffer("marginal", marginal.clone())
        self.dense_shape = tuple(dense_shape)
        self.out_features, self.in_features = self.dense_shape
        self.kept = low.rank

    @property
    def stored_params(self) -> int:
        return self.heavy.weight.numel() + self.low.up.weight.numel() + self.low.down.weight.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split == "in":
            return self.heavy(x[..., self.prime]) + self.low(x[..., self.marginal])
        out = x.new_empty(*x.shape[:-1], self.out_features)
        out[..., self.prime] = self.heavy(x)
        out[..., self.marginal] = self.low(x)
        return out

    @property
    def weight_approx(self) -> torch.Tensor:
        """The dense [out, in] matrix this layer computes (for tests and error measurements)."""
        w = torch.empty(self.dense_shape, dtype=self.heavy.weight.dtype, device=self.heavy.weight.device)
        if self.split == "in":
            w[:, self.prime], w[:, self.marginal] = self.heavy.weight, self.low.weight_approx
        else:
            w[self.prime], w[self.marginal] = self.heavy.weight, self.low.weight_approx
        return w


def neuron_scores(stats: LayerStats) -> torch.Tensor:
    """Mean |a_j| over the calibration tokens of down_proj's inputs (the reference's neuron norm)."""
    if stats.n == 0:
        raise MPTError("no calibration rows reached this layer", "check the calibration windows")
    return stats.abs_sum.double() / stats.n


def prime_neurons(scores: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(prime, marginal) neuron indices, each sorted: the ⌊share·n⌋ largest scores are prime."""
    n_top = int(scores.numel() * share)  # the reference's int(len * 0.15)
    order = torch.argsort(scores, descending=True, stable=True)
    return order[:n_top].sort().values, order[n_top:].sort().values


class SoLAPlan(LowRankPlan):
    """Prime neurons and the whitened SVDs of the marginal parts, done once; `apply` slices ranks."""

    def __init__(self, facts: dict[str, Factorization], neurons: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 all_shapes: dict[str, tuple[int, int]], info: dict):
        self._all = all_shapes
        self.neurons = neurons  # per MLP prefix: (prime, marginal)
        super().__init__("sola", facts, self._allocate_ranks, info)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self._all)

    def _allocate_ranks(self, ratio: float) -> dict[str, int]:
        """One reduction ρ′ for every factorized (marginal / attention) matrix such that the decoder
        linears as a whole lose `ratio` of their weights (prime rows, v, skipped blocks kept)."""
        if ratio == 0:
            return dict.fromkeys(self.factorizations, 0)
        total = sum(o * i for o, i in self._all.values())
        low = {n: (f.u.shape[0], f.vt.shape[1]) for n, f in self.factorizations.items()}
        low_dense = sum(o * i for o, i in low.values())
        fixed = total - low_dense
        inner = 1.0 - ((1.0 - ratio) * total - fixed) / low_dense
        if inner >= 1.0:
            raise MPTError(f"ratio={ratio} is out of SoLA's reach: the prime neurons, v_proj and the skipped blocks "
                           f"hold {fixed / total:.0%} of the decoder linears' weights",
                           f"use a ratio below {low_dense / total:.2f}, or lower prime_share / skip_layers")
        ranks = {}
        for n, (o, i) in low.items():
            try:
                ranks[n] = rank_for_ratio(o, i, inner)
            except MPTError:
                raise MPTError(f"ratio={ratio} leaves rank 0 for {n}", "use a smaller ratio") from None
        return ranks

    def apply(self, model: nn.Module, ratio: float) -> LowRankReport:
        start = time.perf_counter()
        before = count_params(model)
        ranks = self.ranks(ratio)
        originals: dict[str, nn.Module] = {}
        for name, rank in ranks.items():
            if rank <= 0:
                continue
            old = get_module(model, name)
            dev, dtype = old.weight.device, old.weight.dtype
            low = self.factorizations[name].module(rank, device=dev, dtype=dtype)
            prefix, _, part = name.rpartition(".")
            if part in ("gate_proj", "up_proj", "down_proj"):
                prime, marginal = (t.to(dev) for t in self.neurons[prefix])
                split = "in" if part == "down_proj" else "out"
                w = old.weight.detach()
                heavy_w = w[:, prime] if split == "in" else w[prime]
                heavy_b = old.bias if split == "in" else (None if old.bias is None else old.bias[prime])
                heavy = nn.Linear(heavy_w.shape[1], heavy_w.shape[0], bias=heavy_b is not None, device=dev,
                                  dtype=dtype)
                with torch.no_grad():
                    heavy.weight.copy_(heavy_w)
                    if heavy_b is not None:
                        heavy.bias.copy_(heavy_b.detach())
                new: nn.Module = PrimeLowRankLinear(heavy, low, prime, marginal, tuple(w.shape), split)
            else:
                new = low
            originals[name] = set_module(model, name, new)
        layers = [layer_reduction(n, get_module(model, n)) for n in self._all]
        return LowRankReport(self.method, ratio, layers, before, count_params(model), time.perf_counter() - start,
                             originals)

    def apply_shapes(self, model: nn.Module, ratio: float) -> LowRankReport:
        return self.apply(model, ratio)


def _marginal_weight(lin: nn.Linear, part: str, marginal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = lin.weight.detach()
    if part == COL_PART:
        return w[:, marginal], None  # the bias (if any) stays with the prime part
    return w[marginal], None if lin.bias is None else lin.bias.detach()[marginal]


@LOWRANK.register("sola", version=1, display="SoLA", calibration=True, mode="II")
def plan_sola(model: nn.Module, calib_ids: torch.Tensor | None = None, *,
              stats: dict[str, LayerStats] | None = None, device: str | torch.device | None = None,
              layer_filter: Callable[[str], bool] | None = None, progress: bool = True,
              prime_share: float = 0.15, skip_layers: int = 2, damp: float = 1e-6) -> LowRankPlan:
    """SoLA from the dense model's statistics (`stats` from `collect_stats`, else gathered from
    `calib_ids`): `prime_share` of the MLP neurons (reference 0.15) by mean |activation| stay dense,
    the rest and q/k/o are whitened and factorized; the first and last `skip_layers` blocks
    (reference 2) stay dense. `layer_filter` (names inside a block, e.g. 'mlp.up_proj') narrows the
    factorized matrices further."""
    from mpt_utils.models import pick_device

    if not 0 <= prime_share < 1:
        raise MPTError(f"prime_share={prime_share} must be in [0, 1)", "the reference keeps 0.15")
    if skip_layers < 0:
        raise MPTError(f"skip_layers={skip_layers} must be >= 0", "the reference skips 2 blocks at each end")
    dev = pick_device(device)
    if stats is None:
        if calib_ids is None:
            raise MPTError("SoLA needs calibration data", "pass calib_ids or stats from collect_stats")
        stats = collect_stats(model, calib_ids, device=dev, progress=progress)
    blocks = decoder_layers(model)
    prefix = {id(b): n for n, b in model.named_modules() if any(b is x for x in blocks)}
    kept_blocks = [prefix[id(b)] for b in blocks[skip_layers:len(blocks) - skip_layers]]
    all_linears = target_linears(model)
    all_shapes = {n: (lin.out_features, lin.in_features) for n, lin in all_linears.items()}
    parts = ATTN_PARTS + ROW_PARTS + (COL_PART,)
    wanted = [f"{p}.{part}" for p in kept_blocks for part in parts
              if (layer_filter is None or layer_filter(part)) and f"{p}.{part}" in all_linears]
    if not wanted:
        raise MPTError("no linear layers to decompose", f"check layer_filter and skip_layers={skip_layers}")
    missing = [n for n in wanted if n not in stats]
    if missing:
        raise MPTError(f"no calibration statistics for {missing[0]}", "collect stats on the same model")
    neurons = {}
    for p in kept_blocks:
        down = f"{p}.{COL_PART}"
        if down in stats:
            neurons[f"{p}.mlp"] = prime_neurons(neuron_scores(stats[down]), prime_share)
    facts: dict[str, Factorization] = {}
    for name in progress_bar(wanted, desc="sola SVDs", disable=not progress, leave=False):
        lin = all_linears[name]
        block_prefix, _, _ = name.rpartition(".")
        part = name[len(block_prefix.rpartition(".")[0]) + 1:]
        gram = stats[name].gram
        if part in ROW_PARTS + (COL_PART,):
            prime, marginal = neurons[block_prefix]
            weight, bias = _marginal_weight(lin, part, marginal)
            if part == COL_PART:
                gram = gram[marginal][:, marginal]
        else:
            weight, bias = lin.weight.detach(), None if lin.bias is None else lin.bias.detach()
        lower, _ = whitening(gram.to(dev), damp)
        facts[name] = scaled_svd(weight, bias, lower=lower, device=dev)
    info = {"calibration": True, "prime_share": prime_share, "skip_layers": skip_layers,
            "prime_neurons": {k: v[0].tolist() for k, v in neurons.items()}}
    return SoLAPlan(facts, neurons, all_shapes, info)
