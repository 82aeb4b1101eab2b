"""A linear layer stored as two smaller linears, y = up(down(x)), so parameters and FLOPs really shrink.

A dense [out, in] weight holds out·in numbers; a rank-r factorization holds r·(out + in). It saves
parameters only while r < out·in / (out + in) (the break-even rank: 288 for a 576×576 matrix, 144 for
192×576), so every entry point here refuses ranks at or above it unless the caller asks for growth
explicitly (tests of full-rank reconstruction do).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from mpt_utils.errors import MPTError


def breakeven_rank(out_features: int, in_features: int) -> int:
    """The largest rank whose factorization stores fewer parameters than the dense weight."""
    return max((out_features * in_features - 1) // (out_features + in_features), 0)


def factorized_params(out_features: int, in_features: int, rank: int) -> int:
    return rank * (out_features + in_features)


def check_rank(out_features: int, in_features: int, rank: int, allow_growth: bool = False) -> int:
    """Validate a rank for an [out, in] weight; ranks that would not shrink the layer are an MPTError."""
    rank = int(rank)
    full = min(out_features, in_features)
    if not 1 <= rank <= full:
        raise MPTError(f"rank {rank} is outside [1, {full}] for a {out_features}×{in_features} weight",
                       "pick a rank between 1 and min(out, in)")
    limit = breakeven_rank(out_features, in_features)
    if rank > limit and not allow_growth:
        dense = out_features * in_features
        raise MPTError(
            f"rank {rank} on a {out_features}×{in_features} weight stores "
            f"{factorized_params(out_features, in_features, rank):,} parameters, not fewer than the dense "
            f"{dense:,}", f"use a rank ≤ {limit} (the break-even rank), i.e. a parameter reduction > 0")
    return rank


class LowRankLinear(nn.Module):
    """W ≈ U·V with U [out, r] (`up`, carries the bias) and V [r, in] (`down`)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 allow_growth: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank = check_rank(out_features, in_features, rank, allow_growth)
        self.down = nn.Linear(in_features, self.rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(self.rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None,
                     dtype: torch.dtype | None = None, allow_growth: bool = False) -> LowRankLinear:
        """Build from U [out, r] and V [r, in] (and the dense layer's bias, if any)."""
        if up.shape[1] != down.shape[0]:
            raise MPTError(f"factor shapes {tuple(up.shape)} and {tuple(down.shape)} do not chain",
                           "pass U [out, r] and V [r, in]")
        dtype = dtype or up.dtype
        layer = cls(down.shape[1], up.shape[0], up.shape[1], bias=bias is not None, device=up.device,
                    dtype=dtype, allow_growth=allow_growth)
        with torch.no_grad():
            layer.up.weight.copy_(up.to(dtype))
            layer.down.weight.copy_(down.to(dtype))
            if bias is not None:
                layer.up.bias.copy_(bias.to(dtype))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @property
    def weight_approx(self) -> torch.Tensor:
        """The dense [out, in] matrix this layer computes (for tests and error measurements)."""
        return self.up.weight @ self.down.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def get_module(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name)


def set_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` at dotted path `name` inside `root`; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once), what the model really stores."""
    return sum(p.numel() for p in model.parameters())


@dataclass
class LayerReduction:
    """Measured size of one decomposed linear (rank 0 = left dense)."""

    name: str
    out_features: int
    in_features: int
    rank: int  # 0 when kept dense
    dense_params: int
    params: int

    @property
    def reduction(self) -> float:
        return 1.0 - self.params / self.dense_params


def layer_reduction(name: str, module: nn.Module) -> LayerReduction:
    """Read the size of a (possibly factorized) linear from its tensors, weights only (no bias).
    Layers that replaced a dense one by another structure (MoDeGPT's slices, LoSparse's U·V + S)
    carry `dense_shape`, `stored_params` and `kept` (their rank or kept width)."""
    dense_shape = getattr(module, "dense_shape", None)
    if dense_shape is not None:
        out_f, in_f = dense_shape
        return LayerReduction(name, out_f, in_f, int(module.kept), out_f * in_f, int(module.stored_params))
    if isinstance(module, LowRankLinear):
        params = module.up.weight.numel() + module.down.weight.numel()
        rank = module.rank
    elif isinstance(module, nn.Linear):
        params, rank = module.weight.numel(), 0
    else:
        raise MPTError(f"{name} is a {type(module).__name__}, not a linear layer", "pass linear layer names")
    return LayerReduction(name, module.out_features, module.in_features, rank,
                          module.out_features * module.in_features, params)


# ----------------------------------------------------------------------------------------------
# decomposing a whole model: which linears, the factors, and swapping them in and out
# ----------------------------------------------------------------------------------------------

def target_linears(model: nn.Module, layer_filter: Callable[[str], bool] | None = None) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder blocks by full module name (embeddings and lm_head stay
    dense, as in ASVD and SVD-LLM). `layer_filter` sees the name inside the block, e.g. 'mlp.up_proj'."""
    from mpt_utils.calibration import decoder_layers, linear_layers

    blocks = {id(b) for b in decoder_layers(model)}
    out: dict[str, nn.Linear] = {}
    for prefix, block in model.named_modules():
        if id(block) not in blocks:
            continue
        for name, lin in linear_layers(block).items():
            if layer_filter is None or layer_filter(name):
                out[f"{prefix}.{name}"] = lin
    if not out:
        raise MPTError("no linear layers to decompose in the decoder blocks", "check layer_filter")
    return out


@dataclass
class Factorization:
    """W ≈ U_r·diag(s_r)·Vt_r from the SVD of the scaled weight W·S = U·diag(s)·Vᵀ, with Vt = Vᵀ·S⁻¹
    (S = I for plain SVD, diag(|x|^α) for ASVD, the Cholesky factor of XᵀX for SVD-LLM). Only the
    leading `max_rank` components are kept: ranks above the break-even rank are never applied."""

    u: torch.Tensor  # [out, k]
    s: torch.Tensor  # [k], descending, float32
    vt: torch.Tensor  # [k, in], scaling already undone
    bias: torch.Tensor | None = None

    @property
    def max_rank(self) -> int:
        return int(self.s.numel())

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(U [out, r], V [r, in]) with √s split between them, so both factors are well scaled."""
        if rank > self.max_rank:
            raise MPTError(f"rank {rank} exceeds the {self.max_rank} components kept", "use a smaller rank")
        root = self.s[:rank].sqrt()
        return self.u[:, :rank].float() * root, root[:, None] * self.vt[:rank].float()

    def module(self, rank: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
               allow_growth: bool = False) -> LowRankLinear:
        up, down = self.factors(rank)
        dtype = dtype or self.u.dtype
        bias = None if self.bias is None else self.bias.to(device)
        return LowRankLinear.from_factors(up.to(device), down.to(device), bias, dtype=dtype,
                                          allow_growth=allow_growth)

    def weight(self, rank: int) -> torch.Tensor:
        up, down = self.factors(rank)
        return up @ down


@dataclass
class LowRankReport:
    """What a decomposition did, measured on the model's tensors after it was applied."""

    method: str
    ratio: float  # requested parameter reduction of the decomposed linears
    layers: list[LayerReduction]
    n_params_before: int
    n_params_after: int
    seconds: float
    originals: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    @property
    def param_reduction(self) -> float:
        """Achieved fraction of the decomposed linears' weights removed (Table 7's axis)."""
        dense = sum(layer.dense_params for layer in self.layers)
        return 1.0 - sum(layer.params for layer in self.layers) / dense

    @property
    def model_reduction(self) -> float:
        """Achieved fraction of the whole model's parameters removed (embeddings and norms included)."""
        return 1.0 - self.n_params_after / self.n_params_before

    @property
    def n_factorized(self) -> int:
        return sum(layer.rank > 0 for layer in self.layers)

    def summary(self) -> dict[str, float]:
        """Tidy metrics for the results store. Matmul FLOPs of the linears shrink exactly like their
        weights (2·r·(out+in) vs 2·out·in per token), so flops_reduction = param_reduction."""
        return {"param_reduction": self.param_reduction, "model_param_reduction": self.model_reduction,
                "flops_reduction": self.param_reduction, "n_params": float(self.n_params_after),
                "n_factorized": float(self.n_factorized), "decompose_seconds": self.seconds}

    def layer_rows(self) -> list[dict]:
        return [{"metric": "layer_reduction", "value": layer.reduction, "layer": layer.name,
                 "rank": layer.rank, "out_features": layer.out_features, "in_features": layer.in_features}
                for layer in self.layers]

    def restore(self, model: nn.Module) -> None:
        """Put the dense linears back (the factorized ones are dropped)."""
        for name, module in self.originals.items():
            set_module(model, name, module)
        self.originals = {}


def apply_ranks(model: nn.Module, factorizations: Mapping[str, Factorization], ranks: Mapping[str, int],
                method: str, ratio: float, keep_originals: bool = True) -> LowRankReport:
    """Replace each linear with its rank-r factorization (rank 0: left dense), in place."""
    start = time.perf_counter()
    before = count_params(model)
    originals: dict[str, nn.Module] = {}
    for name, rank in ranks.items():
        if rank <= 0:
            continue
        old = get_module(model, name)
        new = factorizations[name].module(rank, device=old.weight.device, dtype=old.weight.dtype)
        set_module(model, name, new)
        if keep_originals:
            originals[name] = old
    layers = [layer_reduction(name, get_module(model, name)) for name in factorizations]
    return LowRankReport(method, ratio, layers, before, count_params(model), time.perf_counter() - start,
                         originals)


class LowRankPlan:
    """The expensive, ratio-independent part of a method (the SVDs, ASVD's sensitivity) done once;
    `apply(model, ratio)` then only slices factors, so a ratio sweep costs one decomposition."""

    def __init__(self, method: str, factorizations: dict[str, Factorization],
                 allocate: Callable[[float], dict[str, int]], info: dict | None = None):
        self.method = method
        self.factorizations = factorizations
        self._allocate = allocate
        self.info = info or {}

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {n: (f.u.shape[0], f.vt.shape[1]) for n, f in self.factorizations.items()}

    def ranks(self, ratio: float) -> dict[str, int]:
        from mpt_utils.lowrank.ranks import check_lowrank_ratio

        return self._allocate(check_lowrank_ratio(ratio))

    def apply(self, model: nn.Module, ratio: float) -> LowRankReport:
        """Decompose `model` in place at `ratio`; `report.restore(model)` undoes it."""
        return apply_ranks(model, self.factorizations, self.ranks(ratio), self.method, ratio)

    def apply_shapes(self, model: nn.Module, ratio: float) -> LowRankReport:
        """The model factorized at `ratio` with the plan's ranks and truncated factors but without any
        ratio-specific refinement a method adds in `apply` (SVD-LLM's update): the same layer shapes,
        hence the same speed and size, for a fraction of the cost. For timing only."""
        return LowRankPlan.apply(self, model, ratio)

    @contextmanager
    def swapped(self, model: nn.Module, ratio: float) -> Iterator[LowRankReport]:
        """The model decomposed at `ratio` inside the block, dense again after it."""
        report = self.apply(model, ratio)
        try:
            yield report
        finally:
            report.restore(model)
