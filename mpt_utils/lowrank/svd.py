"""Plain truncated SVD (the weight-only baseline) and the scaled SVD every low-rank method shares.

Eckart–Young: the best rank-r approximation of W in Frobenius norm keeps its r largest singular
triplets. It ignores the inputs entirely, so it is the purest "weight-dominant" (Mode I) method: LLM
weights are close to full rank, and truncating them collapses the model early.
"""

from __future__ import annotations

import torch
from torch import nn

from mpt_utils.errors import MPTError
from mpt_utils.lowrank import LOWRANK
from mpt_utils.lowrank.factorized import Factorization, LowRankPlan, breakeven_rank, target_linears
from mpt_utils.lowrank.ranks import uniform_ranks


@torch.no_grad()
def top_singular(a: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `keep` leading singular triplets of `a` (float64) from the eigendecomposition of the smaller
    Gram matrix: ~10-20× faster than a full SVD on CPU, and exact where it matters: u·s is formed as
    a·v (or v·s as aᵀ·u), so the truncated product u·diag(s)·vᵀ is a·v·vᵀ up to rounding even for tiny s."""
    tall = a.shape[0] >= a.shape[1]
    evals, vecs = torch.linalg.eigh(a.T @ a if tall else a @ a.T)  # ascending
    evals, vecs = evals.flip(0)[:keep], vecs.flip(1)[:, :keep]
    s = evals.clamp_min(0).sqrt()
    # components ~1e-12 below the top one carry nothing; zero them instead of dividing by ~0
    live = s > (s[:1] * 1e-12).clamp_min(torch.finfo(a.dtype).tiny)
    s = torch.where(live, s, torch.zeros_like(s))
    inv = torch.where(live, 1.0 / s.clamp_min(torch.finfo(a.dtype).tiny), torch.zeros_like(s))
    if tall:
        return (a @ vecs) * inv, s, vecs.T
    return vecs, s, ((a.T @ vecs) * inv).T


@torch.no_grad()
def scaled_svd(weight: torch.Tensor, bias: torch.Tensor | None = None, *, diag: torch.Tensor | None = None,
               lower: torch.Tensor | None = None, keep: int | None = None,
               device: torch.device | str | None = None) -> Factorization:
    """Factor W [out, in] through the SVD of W·S, S = diag(`diag`) or the lower-triangular `lower`
    (neither: S = I). Computed in float64, so whitening by an ill-conditioned S stays accurate.
    `keep` components are stored (default: the break-even rank, the most any ratio uses)."""
    if diag is not None and lower is not None:
        raise MPTError("pass either a diagonal or a triangular scaling, not both", "choose one scaling")
    out_f, in_f = weight.shape
    keep = breakeven_rank(out_f, in_f) if keep is None else min(int(keep), min(out_f, in_f))
    dev = torch.device(device) if device is not None else weight.device
    w = weight.detach().to(dev, torch.float64)
    if diag is not None:
        d = diag.to(dev, torch.float64)
        scaled = w * d[None, :]
    elif lower is not None:
        scaled = w @ lower.to(dev, torch.float64)
    else:
        scaled = w
    u, s, vh = top_singular(scaled, keep)
    if diag is not None:
        vh = vh / d[None, :]  # Vᵀ·S⁻¹ for a diagonal S
    elif lower is not None:  # Vᵀ·L⁻¹ without forming the inverse: solve X·L = Vᵀ
        vh = torch.linalg.solve_triangular(lower.to(dev, torch.float64), vh, upper=False, left=False)
    store = weight.dtype if weight.dtype.is_floating_point else torch.float32
    return Factorization(u=u.to("cpu", store), s=s.float().cpu(), vt=vh.to("cpu", store),
                         bias=None if bias is None else bias.detach().cpu().clone())


def uniform_plan(method: str, model: nn.Module, factorize, *, layer_filter=None, progress: bool = True,
                 info: dict | None = None) -> LowRankPlan:
    """A plan whose ratio is the same parameter reduction in every decomposed linear."""
    from mpt_utils.progress import progress_bar

    linears = target_linears(model, layer_filter)
    facts = {name: factorize(name, lin) for name, lin in
             progress_bar(linears.items(), desc=f"{method} SVDs", disable=not progress, leave=False)}
    shapes = {n: (lin.out_features, lin.in_features) for n, lin in linears.items()}
    return LowRankPlan(method, facts, lambda ratio: uniform_ranks(shapes, ratio), info)


@LOWRANK.register("svd", version=1, display="SVD", calibration=False, mode="I")
def plan_svd(model: nn.Module, calib_ids: torch.Tensor | None = None, *, stats=None,
             device: str | torch.device | None = None, layer_filter=None, progress: bool = True) -> LowRankPlan:
    """Plain SVD of every decoder linear; needs no calibration data (calib_ids/stats are ignored)."""
    from mpt_utils.models import pick_device

    dev = pick_device(device)
    return uniform_plan("svd", model, lambda _n, lin: scaled_svd(lin.weight, lin.bias, device=dev),
                        layer_filter=layer_filter, progress=progress, info={"calibration": False})
