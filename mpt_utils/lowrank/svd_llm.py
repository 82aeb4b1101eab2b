"""SVD-LLM (Wang et al., ICLR'25): truncation-aware data whitening.

With XᵀX = L·Lᵀ (Cholesky of the calibration Gram matrix of the layer's inputs), the output error
of a rank-r approximation is ‖(W − W′)X‖_F = ‖(W − W′)L‖_F. Truncating the SVD of W·L therefore
minimises the output error directly: each dropped singular value of W·L is exactly the error it
adds, which plain SVD of W cannot promise. W′ = U_r Σ_r V_rᵀ L⁻¹. This is the "activation-centric"
(Mode II) family: it exploits the low-rank geometry of the inputs, not of the weights.

`sequential=True` is the layer-wise update: block i is whitened with the Gram matrix of inputs that
already went through the compressed blocks 0..i−1 (`calibration.layerwise(sequential=True)`), so
later layers correct for earlier truncation. It is ratio-specific, so each ratio costs a pass.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from mpt_utils.calibration import LayerStats, collect_stats, decoder_layers, layerwise
from mpt_utils.errors import MPTError
from mpt_utils.lowrank.factorized import (
    LowRankPlan,
    LowRankReport,
    apply_ranks,
    count_params,
    get_module,
    layer_reduction,
    target_linears,
)
from mpt_utils.lowrank.ranks import uniform_ranks
from mpt_utils.lowrank.svd import scaled_svd, uniform_plan


@torch.no_grad()
def whitening(gram: torch.Tensor, damp: float = 1e-6) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor L of XᵀX (float64). When XᵀX is not positive definite (dead input
    channels, fewer tokens than features) its spectrum is shifted just enough: the smallest
    eigenvalue is raised to `damp`·mean(diag). Returns (L, shift added)."""
    g = gram.detach().to(torch.float64)
    g = 0.5 * (g + g.T)
    factor, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return factor, 0.0
    scale = float(torch.diagonal(g).mean().clamp_min(1e-12))
    lowest = float(torch.linalg.eigvalsh(g)[0])
    shift = max(-lowest, 0.0) + damp * scale
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    for _ in range(8):  # the eigenvalue estimate itself has rounding error; grow until it factors
        factor, info = torch.linalg.cholesky_ex(g + shift * eye)
        if int(info) == 0:
            return factor, shift
        shift *= 10
    raise MPTError("the calibration Gram matrix could not be made positive definite",
                   "use more calibration tokens (n_calib × seqlen) than input features")


def whitened_svd(linear: nn.Linear, stats: LayerStats, device: torch.device | str | None = None,
                 damp: float = 1e-6, keep: int | None = None):
    if stats.n == 0:
        raise MPTError("no calibration rows reached this layer", "check the calibration windows")
    lower, _ = whitening(stats.gram.to(device) if device is not None else stats.gram, damp)
    return scaled_svd(linear.weight, linear.bias, lower=lower, keep=keep, device=device)


def plan_svd_llm(model: nn.Module, calib_ids: torch.Tensor | None = None, *,
                 stats: dict[str, LayerStats] | None = None, device: str | torch.device | None = None,
                 layer_filter=None, progress: bool = True, sequential: bool = False,
                 damp: float = 1e-6) -> LowRankPlan:
    """SVD-LLM. One-shot (default): whiten every layer with the dense model's Gram matrices
    (`stats` from `collect_stats`, else gathered from `calib_ids`). `sequential=True`: the returned
    plan re-runs calibration through the compressed blocks at `apply` time."""
    from mpt_utils.models import pick_device

    dev = pick_device(device)
    if sequential:
        if calib_ids is None:
            raise MPTError("sequential SVD-LLM needs calibration windows", "pass calib_ids")
        return SequentialSVDLLM(model, calib_ids, dev, layer_filter, progress, damp)
    if stats is None:
        if calib_ids is None:
            raise MPTError("SVD-LLM needs calibration data", "pass calib_ids or stats from collect_stats")
        stats = collect_stats(model, calib_ids, device=dev, layer_filter=layer_filter, progress=progress)

    def factorize(name: str, lin: nn.Linear):
        if name not in stats:
            raise MPTError(f"no calibration statistics for {name}", "collect stats on the same model")
        return whitened_svd(lin, stats[name], dev, damp)

    return uniform_plan("svd_llm", model, factorize, layer_filter=layer_filter, progress=progress,
                        info={"calibration": True, "sequential": False})


class SequentialSVDLLM(LowRankPlan):
    """SVD-LLM with the layer-wise update; the factors depend on the ratio, so nothing is cached."""

    def __init__(self, model: nn.Module, calib_ids: torch.Tensor, device: torch.device, layer_filter,
                 progress: bool, damp: float):
        linears = target_linears(model, layer_filter)
        self._shapes = {n: (lin.out_features, lin.in_features) for n, lin in linears.items()}
        super().__init__("svd_llm", {}, lambda ratio: uniform_ranks(self._shapes, ratio),
                         {"calibration": True, "sequential": True})
        self.calib_ids, self.device, self.layer_filter = calib_ids, device, layer_filter
        self.progress, self.damp = progress, damp

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self._shapes)

    def apply(self, model: nn.Module, ratio: float) -> LowRankReport:
        start = time.perf_counter()
        before = count_params(model)
        ranks = self.ranks(ratio)
        prefix = {id(b): n for n, b in model.named_modules() if any(b is m for m in decoder_layers(model))}
        originals: dict[str, nn.Module] = {}

        def on_block(_i: int, block: nn.Module, stats: dict[str, LayerStats]) -> None:
            facts, block_ranks = {}, {}
            for name, st in stats.items():
                full = f"{prefix[id(block)]}.{name}"
                if ranks.get(full, 0) > 0:
                    facts[name] = whitened_svd(get_module(block, name), st, self.device, self.damp)
                    block_ranks[name] = ranks[full]
            # the block's own names; the report below re-reads the whole model
            done = apply_ranks(block, facts, block_ranks, self.method, ratio)
            originals.update({f"{prefix[id(block)]}.{n}": m for n, m in done.originals.items()})

        if any(r > 0 for r in ranks.values()):
            layerwise(model, self.calib_ids, on_block, sequential=True, device=self.device,
                      layer_filter=self.layer_filter, progress=self.progress, desc="svd_llm sequential")
        layers = [layer_reduction(n, get_module(model, n)) for n in self._shapes]
        return LowRankReport(self.method, ratio, layers, before, count_params(model),
                             time.perf_counter() - start, originals)
