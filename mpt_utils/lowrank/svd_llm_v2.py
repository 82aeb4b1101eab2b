"""SVD-LLM V2: heterogeneous per-matrix compression ratios and loss-optimized truncation.

Reference: "SVD-LLM V2: Optimizing Singular Value Truncation for Large Language Model Compression",
Wang, Alam, Wan, Shen and Zhang, arXiv:2503.12340 (NAACL 2025), github.com/AIoT-MLSys-Lab/SVD-LLM.

1. Loss-optimized weight truncation. SVD-LLM whitens with the Cholesky factor of XᵀX, which fails or
   loses accuracy when XᵀX is ill-conditioned. V2 uses two rounds of SVD instead: XᵀX = U_s S U_sᵀ
   (for the symmetric positive semi-definite Gram matrix its SVD is its eigendecomposition), then the
   SVD of D = W·U_s·√S = U Σ Vᵀ, and W′ = U_r Σ_r V_rᵀ √S⁻¹ U_sᵀ. Since (U_s√S)(U_s√S)ᵀ = XᵀX, the
   output loss ‖(W − W′)X‖_F equals √(Σ_{i>r} σ_i²), the theoretical minimum of any rank-r W′.
2. Heterogeneous compression-ratio allocation (the paper's Algorithm 1). Matrices of the same kind
   (all q_proj, all up_proj, ...) form a group. Each matrix's theoretical truncation loss L_min at the
   target ratio R is computed from its spectrum; within a group the ratio of matrix i is
   R_i = |G|·R·(1/log L_i) / Σ_j (1/log L_j): a matrix whose truncation costs more is compressed less,
   and the group's mean ratio stays R (its matrices share one shape, so the parameter budget is met).

The reference repository has not released V2's code; the allocation follows Algorithm 1 as printed
(log of the losses, then their inverses, normalised within the group). The losses are sums over all
calibration tokens (‖(W − W′)X‖_F), so log L > 0 in practice. A
group where some L ≤ 1 (a log that is not positive has no meaningful inverse) keeps the uniform ratio
R, recorded in `plan.info["uniform_groups"]`. Ratios are clipped to what a rank-1 factor allows, the
excess redistributed over the group's other matrices. V2 is training-free: no parameter update.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from mpt_utils.calibration import LayerStats, collect_stats
from mpt_utils.errors import MPTError
from mpt_utils.lowrank import LOWRANK
from mpt_utils.lowrank.factorized import Factorization, LowRankPlan, breakeven_rank, target_linears
from mpt_utils.lowrank.ranks import Shape, rank_for_ratio
from mpt_utils.lowrank.svd import top_singular
from mpt_utils.progress import progress_bar

REFERENCE_TOKENS = 256 * 2048  # SVD-LLM's whitening calibration: 256 windows of 2048 tokens


@torch.no_grad()
def gram_root(gram: torch.Tensor, damp: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """First SVD round: XᵀX = U_s S U_sᵀ; returns (U_s√S, √S⁻¹U_sᵀ) in float64. Eigenvalues below
    `damp`·mean are raised to it so the inverse stays finite (they carry no output energy)."""
    g = gram.detach().to(torch.float64)
    evals, vecs = torch.linalg.eigh(0.5 * (g + g.T))
    floor = max(float(evals.clamp_min(0).mean()) * damp, torch.finfo(torch.float64).tiny)
    root = evals.clamp_min(floor).sqrt()
    return vecs * root, (vecs / root).T


@torch.no_grad()
def loss_optimized_svd(linear: nn.Linear, stats: LayerStats, device: torch.device | str | None = None,
                       damp: float = 1e-10, roots: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> tuple[Factorization, torch.Tensor]:
    """Second SVD round on D = W·U_s·√S. Returns the factorization (break-even many components) and
    the full spectrum of D (float64, CPU), from which every truncation loss is read. `roots`: the
    first round's result when already computed for the same inputs."""
    if stats.n == 0:
        raise MPTError("no calibration rows reached this layer", "check the calibration windows")
    dev = torch.device(device) if device is not None else linear.weight.device
    root, inv_root = roots if roots is not None else gram_root(stats.gram.to(dev), damp)
    w = linear.weight.detach().to(dev, torch.float64)
    out_f, in_f = w.shape
    u, s, vh = top_singular(w @ root, min(out_f, in_f))
    keep = breakeven_rank(out_f, in_f)
    store = linear.weight.dtype if linear.weight.dtype.is_floating_point else torch.float32
    bias = None if linear.bias is None else linear.bias.detach().cpu().clone()
    fact = Factorization(u=u[:, :keep].to("cpu", store), s=s[:keep].float().cpu(),
                         vt=(vh[:keep] @ inv_root).to("cpu", store), bias=bias)
    return fact, s.cpu()


def truncation_loss(spectrum: torch.Tensor, rank: int) -> float:
    """‖(W − W′)X‖_F of the rank-`rank` truncation: the norm of the dropped singular values of D."""
    if rank <= 0:
        return 0.0
    return float(spectrum[rank:].double().square().sum().sqrt())


def max_ratio(shape: Shape) -> float:
    """The largest parameter reduction that still leaves rank 1."""
    out_f, in_f = shape
    return 1.0 - (out_f + in_f) / (out_f * in_f)


def heterogeneous_ratios(groups: Mapping[str, Sequence[str]], shapes: Mapping[str, Shape],
                         spectra: Mapping[str, torch.Tensor], ratio: float, scale: float = 1.0
                         ) -> tuple[dict[str, float], list[str]]:
    """Algorithm 1: per matrix R_i = |G|·R·(1/log L_i)/Σ_j(1/log L_j) within each group, L_i the
    theoretical truncation loss at the uniform ratio R (times `scale`, see `plan_svd_llm_v2`).
    Returns (ratio per matrix, groups left uniform)."""
    out: dict[str, float] = {}
    uniform: list[str] = []
    for group, names in groups.items():
        if ratio == 0:
            out.update(dict.fromkeys(names, 0.0))
            continue
        losses = [scale * truncation_loss(spectra[n], rank_for_ratio(*shapes[n], ratio)) for n in names]
        if min(losses) <= 1.0:
            uniform.append(group)
            out.update(dict.fromkeys(names, ratio))
            continue
        inv = [1.0 / math.log(v) for v in losses]
        total = sum(inv)
        raw = {n: len(names) * ratio * w / total for n, w in zip(names, inv)}
        out.update(_clip_and_redistribute(raw, {n: max_ratio(shapes[n]) for n in names}))
    return out, uniform


def _clip_and_redistribute(raw: dict[str, float], cap: dict[str, float]) -> dict[str, float]:
    """Cap each ratio; the budget above a cap goes to the uncapped matrices in proportion to their share."""
    ratios, free = dict(raw), set(raw)
    for _ in range(len(raw)):
        over = {n for n in free if ratios[n] > cap[n]}
        if not over:
            break
        excess = sum(ratios[n] - cap[n] for n in over)
        for n in over:
            ratios[n] = cap[n]
        free -= over
        share = sum(ratios[n] for n in free)
        if not free or share <= 0:
            break
        for n in free:
            ratios[n] += excess * ratios[n] / share
    return ratios


def kind_of(name: str) -> str:
    """The group of a linear: its name inside the block, e.g. 'self_attn.q_proj'."""
    parts = name.split(".")
    return ".".join(parts[-2:])


class SVDLLMV2Plan(LowRankPlan):
    """Factors and spectra computed once; `ranks(ratio)` allocates, `truncation_losses(ratio)` reports."""

    def __init__(self, facts: dict[str, Factorization], spectra: dict[str, torch.Tensor],
                 shapes: dict[str, Shape], groups: dict[str, list[str]], heterogeneous: bool, scale: float = 1.0):
        self.spectra, self._shapes, self.groups, self.heterogeneous = spectra, shapes, groups, heterogeneous
        self.scale = scale
        super().__init__("svd_llm_v2", facts, self._allocate_ranks,
                         {"calibration": True, "heterogeneous": heterogeneous, "groups": groups,
                          "uniform_groups": {}, "matrix_ratios": {}, "loss_scale": scale})

    def _allocate_ranks(self, ratio: float) -> dict[str, int]:
        if not self.heterogeneous:
            per = dict.fromkeys(self._shapes, ratio)
        else:
            per, uniform = heterogeneous_ratios(self.groups, self._shapes, self.spectra, ratio, self.scale)
            self.info["uniform_groups"][ratio] = uniform
        self.info["matrix_ratios"][ratio] = per
        return {n: rank_for_ratio(*self._shapes[n], r) for n, r in per.items()}

    def truncation_losses(self, ratio: float) -> dict[str, float]:
        """‖(W − W′)X‖_F per matrix at `ratio`, from the spectra (X: the calibration inputs)."""
        return {n: truncation_loss(self.spectra[n], r) for n, r in self.ranks(ratio).items()}


@LOWRANK.register("svd_llm_v2", version=1, display="SVD-LLM V2", calibration=True, mode="II")
def plan_svd_llm_v2(model: nn.Module, calib_ids: torch.Tensor | None = None, *,
                    stats: dict[str, LayerStats] | None = None, device: str | torch.device | None = None,
                    layer_filter: Callable[[str], bool] | None = None, progress: bool = True,
                    heterogeneous: bool = True, loss_tokens: int | None = REFERENCE_TOKENS,
                    damp: float = 1e-10) -> LowRankPlan:
    """SVD-LLM V2 on the dense model's calibration Gram matrices (`stats`, else gathered from
    `calib_ids`). `heterogeneous=False` gives every matrix the target ratio (the paper's ablation
    "loss-optimized truncation only").

    `loss_tokens`: the allocation takes the log of a loss summed over the calibration tokens, so it
    depends on how many there are (L grows as √tokens). The losses are rescaled to `loss_tokens`
    tokens, by default the reference's calibration (256 windows of 2048 tokens, SVD-LLM's
    whitening set), so a profile with fewer windows allocates as the reference would on the same
    data; None uses the losses as measured. The truncation itself and the reported losses are
    unaffected."""
    from mpt_utils.models import pick_device

    dev = pick_device(device)
    if stats is None:
        if calib_ids is None:
            raise MPTError("SVD-LLM V2 needs calibration data", "pass calib_ids or stats from collect_stats")
        stats = collect_stats(model, calib_ids, device=dev, layer_filter=layer_filter, progress=progress)
    linears = target_linears(model, layer_filter)
    missing = [n for n in linears if n not in stats]
    if missing:
        raise MPTError(f"no calibration statistics for {missing[0]}", "collect stats on the same model")
    facts, spectra = {}, {}
    shared: list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = []  # q/k/v, gate/up: one X
    for n, lin in progress_bar(linears.items(), desc="svd_llm_v2 SVDs", disable=not progress, leave=False):
        gram = stats[n].gram
        roots = next((r for g, r in shared if g.shape == gram.shape and torch.equal(g, gram)), None)
        if roots is None:
            roots = gram_root(gram.to(dev), damp)
            shared = [*shared[-3:], (gram, roots)]  # the linears of one block come together
        facts[n], spectra[n] = loss_optimized_svd(lin, stats[n], dev, damp, roots)
    shapes = {n: (lin.out_features, lin.in_features) for n, lin in linears.items()}
    groups: dict[str, list[str]] = {}
    for n in linears:
        groups.setdefault(kind_of(n), []).append(n)
    if loss_tokens is not None and loss_tokens < 1:
        raise MPTError(f"loss_tokens={loss_tokens} must be a positive token count", "the reference: 256 × 2048")
    tokens = max(stats[next(iter(linears))].n, 1)
    scale = 1.0 if loss_tokens is None else math.sqrt(loss_tokens / tokens)
    return SVDLLMV2Plan(facts, spectra, shapes, groups, heterogeneous, scale)
