"""BESA: blockwise parameter-efficient sparsity allocation (learned per-row sparsity, Wanda ranking).

Xu, Shao, Chen, Tang, Wu, Qiao, Luo, "BESA: Pruning Large Language Models with Blockwise
Parameter-Efficient Sparsity Allocation", ICLR 2024, arXiv:2402.16880; code:
github.com/OpenGVLab/LLMPrune-BESA.

Block by block (block i's inputs come from the already pruned blocks 0..i−1), every linear ranks the
weights of each row by the Wanda score |W_ij|·‖X_j‖₂ and learns, per row (`scope="row"`, the paper's
BESA-row) or per layer (`scope="layer"`), a distribution over candidate sparsities
{1, 1−step, …, 0} (step 0.01): p = softmax(sigmoid(β)), β initialised to 0. The row prunes its
⌊s·cols⌋ lowest-ranked weights, s = Σ p_k c_k its expected sparsity; the probability that the weight
at rank j is kept, 1 − Σ_k p_k [j < ⌊c_k·cols⌋], carries the gradient to β (straight-through: the
forward uses the hard mask). The loss is the block's output reconstruction error, each hidden channel
divided by the norm of its reference output over the window, plus λ·((ŝ − S)/S)², with ŝ the block's
parameter-weighted expected sparsity and S the target. Reference output: the dense block applied to
the block's (pruned-model) inputs. Optimiser: Prodigy (lr 1, d_coef 5), one epoch over the 128
calibration windows, one window per step. Afterwards every row is pruned at its learned sparsity.

Defaults are the released row-wise LLaMA runs: epochs 1, step 0.01, λ (`sparsity_beta`) 5, loss
weight 1, Prodigy lr 1, d_coef 5 and initial step size d0 1e-6, sigmoid smoothing on.
Reduced budgets: a block takes epochs × (calibration windows) optimiser steps (the paper: 1 × 128).
Prodigy's step size grows from d0 over roughly its first 15 steps, so a budget of a few steps per
block learns almost nothing from d0 = 1e-6; raise `d0` with a short budget (the embedded profile:
4 windows, `epochs=3`, `d0=1e-3`, i.e. 12 steps per block).
Deviations: `exact=True` (default) shifts the learned row sparsities by one common offset and
rounds them so each block prunes exactly round(S·#weights) weights (the released code floors the
learned sparsities and lands within the penalty's tolerance of S; `exact=False` does that). Because softmax(sigmoid(β)) keeps every probability within a factor e of the others, the
expected sparsity of a row can only move within about [0.38, 0.62]; the shift is what reaches targets
outside that band. The released layer-wise runs also reconstruct the dense model's outputs
(`--prune-dense`, d_coef 0.05); `scope="layer"` here keeps the row-wise runs' reference and settings.
Computation runs in float32 (the released code uses fp16 autocast on the GPU).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.func import functional_call

from mpt_utils.calibration import BlockIO, LayerStats, linear_layers
from mpt_utils.errors import MPTError
from mpt_utils.prune import PRUNERS
from mpt_utils.prune.masks import Pattern, n_pruned
from mpt_utils.prune.wanda import wanda_scores

SCOPES = ("row", "layer")


class Prodigy(torch.optim.Optimizer):
    """Adam with Prodigy's parameter-free step size (Mishchenko & Defazio, "Prodigy: An Expeditiously
    Adaptive Parameter-Free Learner", arXiv:2306.06101; code: github.com/konstmish/prodigy), without
    weight decay or bias correction, as the BESA runs use it. The step size d starts at `d0` and rises
    to d_coef·(running Σ d·⟨g, x₀ − x⟩) / ‖running Σ d·g‖₁, never falling."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, d0: float = 1e-6, d_coef: float = 1.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        self.d, self.d_max, self.d0, self.d_coef, self.numerator = d0, d0, d0, d_coef, 0.0

    @torch.no_grad()
    def step(self, closure=None):
        group0 = self.param_groups[0]
        beta1, beta2 = group0["betas"]
        beta3 = math.sqrt(beta2)
        lr = max(g["lr"] for g in self.param_groups)
        d, dlr = self.d, self.d * lr
        self.numerator *= beta3
        denom = 0.0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st.update(s=torch.zeros_like(p), x0=p.detach().clone(), m=torch.zeros_like(p),
                              v=torch.zeros_like(p))
                g = p.grad
                self.numerator += (d / self.d0) * dlr * float((g * (st["x0"] - p)).sum())
                st["m"].mul_(beta1).add_(g, alpha=d * (1 - beta1))
                st["v"].mul_(beta2).addcmul_(g, g, value=d * d * (1 - beta2))
                st["s"].mul_(beta3).add_(g, alpha=(d / self.d0) * dlr)
                denom += float(st["s"].abs().sum())
        if denom > 0:
            d_hat = self.d_coef * self.numerator / denom
            if self.d == self.d0:
                self.d = max(self.d, d_hat)
            self.d_max = max(self.d_max, d_hat)
            self.d = self.d_max  # min(d_max, d·growth_rate) with the default unbounded growth rate
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                p.addcdiv_(st["m"], st["v"].sqrt().add_(self.d * group["eps"]), value=-dlr)


class _LayerAllocation:
    """One linear's learnable sparsity distribution over its rows (or the whole layer)."""

    def __init__(self, weight: torch.Tensor, stats: LayerStats, candidates: torch.Tensor, scope: str,
                 smooth: bool):
        self.weight = weight
        rows, cols = weight.shape
        order = torch.argsort(wanda_scores(weight, stats), dim=1, stable=True)  # ascending: pruned first
        self.rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(cols, device=order.device).expand(rows, cols).contiguous())
        self.candidates, self.smooth, self.cols = candidates, smooth, cols
        # the number of pruned weights of a row at candidate c_k (the released code truncates c_k·cols)
        self.cuts = torch.floor(candidates.double() * cols + 1e-6).long()
        self.logits = nn.Parameter(torch.zeros(rows if scope == "row" else 1, len(candidates), device=weight.device))

    def probabilities(self) -> torch.Tensor:
        return (self.logits.sigmoid() if self.smooth else self.logits).softmax(dim=-1)

    def row_sparsity(self) -> torch.Tensor:
        """Expected sparsity of each row ([rows] or [1] for a layer-wide distribution)."""
        return self.probabilities() @ self.candidates

    def mask(self) -> torch.Tensor:
        """Hard keep-mask at the expected sparsities, with the keep probabilities' gradient."""
        p = self.probabilities()
        hist = torch.zeros(p.shape[0], self.cols + 1, device=p.device).index_add(1, self.cuts, p)
        keep_sorted = hist.cumsum(dim=1)[:, : self.cols]  # P(rank j kept) = Σ_k p_k [cut_k <= j]
        soft = keep_sorted.expand(self.weight.shape[0], -1).gather(1, self.rank)
        n_cut = torch.floor(self.row_sparsity().detach().double() * self.cols).long().unsqueeze(1)
        hard = (self.rank >= n_cut).float()
        return hard + soft - soft.detach()


def _expected_sparsity(allocs: dict[str, _LayerAllocation]) -> torch.Tensor:
    total = sum(a.weight.numel() for a in allocs.values())
    return sum(a.row_sparsity().mean() * (a.weight.numel() / total) for a in allocs.values())


def _exact_counts(allocs: dict[str, _LayerAllocation], sparsity: float) -> dict[str, torch.Tensor]:
    """Pruned count per row: the learned row sparsities shifted by one offset τ and rounded (largest
    remainders) so that the block prunes exactly round(S·#weights) weights."""
    rows = {n: a.row_sparsity().detach().double().expand(a.weight.shape[0]) for n, a in allocs.items()}
    cols = {n: a.cols for n, a in allocs.items()}
    goal = n_pruned(sum(a.weight.numel() for a in allocs.values()), sparsity)

    def counts(tau: float) -> dict[str, torch.Tensor]:
        return {n: (s + tau).clamp(0, 1) * cols[n] for n, s in rows.items()}

    lo, hi = -1.0, 1.0
    for _ in range(60):  # Σ counts(τ) rises with τ
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(float(c.sum()) for c in counts(mid).values()) < goal else (lo, mid)
    real = counts(hi)
    flat = torch.cat(list(real.values()))
    cap = torch.cat([torch.full((len(s),), cols[n], dtype=torch.long, device=flat.device) for n, s in rows.items()])
    base = torch.floor(flat).long()
    frac = flat - base
    missing = goal - int(base.sum())
    if missing > 0:  # round up the rows closest to their next weight
        frac = frac.masked_fill(base >= cap, -1.0)
        base[torch.topk(frac, missing).indices] += 1
    elif missing < 0:
        frac = frac.masked_fill(base <= 0, 2.0)
        base[torch.topk(frac, -missing, largest=False).indices] -= 1
    out, start = {}, 0
    for n, s in rows.items():
        out[n] = base[start: start + len(s)]
        start += len(s)
    return out


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@PRUNERS.register("besa", version=1, display="BESA", calibration=True, supports_nm=False, block_level=True,
                  paper_name="BESA-row")
def besa(block: nn.Module, stats: dict[str, LayerStats], sparsity: float, pattern: Pattern | None = None, *,
         io: BlockIO | None = None, name: str = "", cache: dict | None = None, epochs: int = 1,
         sparsity_step: float = 0.01, sparsity_beta: float = 5.0, l2_alpha: float = 1.0, scope: str = "row",
         lr: float = 1.0, d_coef: float = 5.0, d0: float = 1e-6, sigmoid_smooth: bool = True,
         exact: bool = True) -> dict[str, float]:
    """Learn the sparsity of every row of the block's linears on its calibration inputs `io`, then
    prune each row at it (in place). Returns each linear's achieved sparsity."""
    if pattern is not None:
        raise MPTError("BESA learns unstructured per-row sparsities, not N:M patterns", "use unstructured sparsity")
    if io is None:
        raise MPTError("BESA trains on a block's calibration inputs and outputs",
                       "run it through mpt_utils.prune.prune_model(model, 'besa', s, calib_ids=...)")
    if scope not in SCOPES:
        raise MPTError(f"unknown BESA scope {scope!r}", f"use one of {SCOPES}")
    if not 0 < sparsity_step <= 0.5 or int(epochs) < 0:
        raise MPTError(f"invalid BESA settings (sparsity_step={sparsity_step}, epochs={epochs})",
                       "use 0 < sparsity_step <= 0.5 (the paper: 0.01) and epochs >= 0 (the paper: 1)")
    linears = linear_layers(block)
    if sparsity <= 0:
        return {n: 0.0 for n in linears}
    steps = round(1 / sparsity_step)
    dev = next(iter(linears.values())).weight.device
    candidates = torch.linspace(1.0, 0.0, steps + 1, device=dev)
    allocs = {n: _LayerAllocation(lin.weight.detach().float(), stats[n], candidates, scope, sigmoid_smooth)
              for n, lin in linears.items()}
    params = {n: a.logits for n, a in allocs.items()}
    optimizer = Prodigy(params.values(), lr=lr, d_coef=d_coef, d0=d0)
    with torch.enable_grad():
        for _ in range(int(epochs)):
            for x, ref in zip(io.inputs, io.outputs):
                weights = {f"{n}.weight": (a.weight * a.mask()).to(linears[n].weight.dtype)
                           for n, a in allocs.items()}
                out = _first(functional_call(block, weights, (x,), dict(io.kwargs))).float()
                ref = ref.float()
                scale = ref.reshape(-1, ref.shape[-1]).norm(dim=0).clamp_min(1e-12)  # per hidden channel
                l2 = (((ref - out) / scale) ** 2).sum() / ref.shape[-1]
                penalty = ((_expected_sparsity(allocs) - sparsity) / sparsity) ** 2
                loss = l2_alpha * l2 + sparsity_beta * penalty
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    with torch.no_grad():
        if exact:
            counts = _exact_counts(allocs, sparsity)
        else:
            counts = {n: torch.floor(a.row_sparsity().double() * a.cols).long().expand(a.weight.shape[0])
                      for n, a in allocs.items()}
        achieved = {}
        for n, lin in linears.items():
            prune = allocs[n].rank < counts[n].unsqueeze(1)
            lin.weight.data.masked_fill_(prune, 0)
            achieved[n] = float(prune.float().mean())
    return achieved
