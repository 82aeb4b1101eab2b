"""DSnoT (Zhang et al. 2024, "Dynamic Sparse No Training"): training-free mask refinement.

Start from a Wanda (w.DSnoT) or SparseGPT-saliency (s.DSnoT) mask; no weight is updated. For each
output row, the reconstruction error of the pruned part is e = Σ_pruned W_ij·s_j, where s_j is input
j summed over one calibration window and averaged over the windows (the released code's statistic,
`sum_metric_row`, i.e. mean activation × window length). Each cycle regrows one pruned weight whose
contribution W_ij·s_j (divided by Var[x_j], so steady inputs are preferred) most reduces e in the
direction of its sign, and prunes one kept weight of opposite-sign contribution with the lowest Wanda
score, so the row's sparsity never changes. A row stops once |e| <= `threshold` (0.1 on that
per-window scale) or after `max_cycles`. For N:M the pruned weight is the kept weight of the regrown
weight's group with the lowest initial score, keeping the pattern.

Defaults follow the released code (main.py, lib/prune.py): 50 cycles, threshold 0.1, variance power
1, MLP layers keep their initial mask (`skip=()` refines all), and the sign rule (take a swap only if
e keeps its sign, so |e| shrinks monotonically) only for N:M: the released code skips it for
unstructured masks (`--without_same_sign` defaults to True); `same_sign=True/False` forces it.
Deliberate difference: Var[x_j] is the variance over all calibration tokens, where the released code
averages per-window variances; the two differ by the spread of the window means, which only reorders
regrowth candidates of similar score. Scale note: on the per-window scale one swap moves e by far
more than 0.1, so rows usually run all 50 cycles; at 50 % sparsity 50 swaps touch ~2 % of the pruned
weights of a 4096-wide LLaMA row but ~17 % of a 576-wide one, so on small models DSnoT changes a far
larger share of each mask than in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mpt_utils.calibration import LayerStats
from mpt_utils.errors import MPTError
from mpt_utils.prune import PRUNERS
from mpt_utils.prune.masks import Pattern, apply_mask, nm_mask, row_mask
from mpt_utils.prune.sparsegpt import obs_saliency
from mpt_utils.prune.wanda import wanda_scores

BASES = ("wanda", "sparsegpt")


def _ends(order: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, from_high: torch.Tensor) -> torch.Tensor:
    """Per row, the entry of `order` at the high pointer where `from_high`, else at the low one."""
    pos = torch.where(from_high, hi, lo).clamp(0, order.shape[1] - 1)
    return order.gather(1, pos.unsqueeze(1)).squeeze(1)


def refine_rows(mask: torch.Tensor, contrib: torch.Tensor, regrow_key: torch.Tensor, importance: torch.Tensor,
                max_cycles: int, threshold: float, same_sign: bool) -> torch.Tensor:
    """Unstructured prune-and-grow on a row mask with equal pruned counts per row (True = pruned)."""
    rows, cols = mask.shape
    k = int(mask[0].sum())
    if k == 0 or k == cols:
        return mask
    mask = mask.clone()
    r = torch.arange(rows, device=mask.device)
    pruned_idx = mask.float().topk(k, dim=1).indices  # every row has exactly k pruned entries
    kept_idx = (~mask).float().topk(cols - k, dim=1).indices
    regrow_order = pruned_idx.gather(1, regrow_key.gather(1, pruned_idx).argsort(dim=1, stable=True))
    # kept weights: negative contributions by rising importance, then positive ones by falling importance,
    # so the low end offers the cheapest negative and the high end the cheapest positive candidate
    kept_rank = importance.gather(1, kept_idx).argsort(dim=1, stable=True).argsort(dim=1)
    negative = contrib.gather(1, kept_idx) < 0
    key = torch.where(negative, kept_rank, 2 * cols - kept_rank)
    prune_order = kept_idx.gather(1, key.argsort(dim=1, stable=True))

    e = (contrib * mask).sum(dim=1)
    sign0 = torch.sign(e)
    g_lo, g_hi = torch.zeros(rows, dtype=torch.long, device=mask.device), torch.full((rows,), k - 1, device=mask.device)
    p_lo, p_hi = torch.zeros_like(g_lo), torch.full((rows,), cols - k - 1, device=mask.device)
    active = torch.ones(rows, dtype=torch.bool, device=mask.device)
    for _ in range(max_cycles):
        grow = _ends(regrow_order, g_lo, g_hi, e > 0)
        prune = _ends(prune_order, p_lo, p_hi, e < 0)
        after = e + contrib[r, prune] - contrib[r, grow]
        active &= (e.abs() > threshold) & (g_lo <= g_hi) & (p_lo <= p_hi)
        if same_sign:
            active &= torch.sign(after) == sign0
        if not bool(active.any()):
            break
        g_hi, g_lo = g_hi - (e > 0).long(), g_lo + (e <= 0).long()
        p_hi, p_lo = p_hi - (e < 0).long(), p_lo + (e >= 0).long()
        mask[r[active], prune[active]] = True
        mask[r[active], grow[active]] = False
        e = torch.where(active, after, e)
    return mask


def refine_nm(mask: torch.Tensor, contrib: torch.Tensor, regrow_key: torch.Tensor, importance: torch.Tensor,
              pattern: Pattern, max_cycles: int, threshold: float, same_sign: bool) -> torch.Tensor:
    """N:M prune-and-grow: each swap stays inside one group of M, so the pattern is kept."""
    n, m = pattern
    rows, cols = mask.shape
    k = cols // m * n
    mask = mask.clone()
    r = torch.arange(rows, device=mask.device)
    pruned_idx = mask.float().topk(k, dim=1).indices
    regrow_order = pruned_idx.gather(1, regrow_key.gather(1, pruned_idx).argsort(dim=1, stable=True))
    locked = mask.clone()  # weights pruned at the start or regrown later may not be pruned by a swap
    e = (contrib * mask).sum(dim=1)
    sign0 = torch.sign(e)
    g_lo, g_hi = torch.zeros(rows, dtype=torch.long, device=mask.device), torch.full((rows,), k - 1, device=mask.device)
    active = torch.ones(rows, dtype=torch.bool, device=mask.device)
    offsets = torch.arange(m, device=mask.device)
    for _ in range(max_cycles):
        grow = _ends(regrow_order, g_lo, g_hi, e > 0)
        group = (grow - grow % m).unsqueeze(1) + offsets  # [rows, m] columns of the regrown weight's group
        score = importance.gather(1, group).masked_fill(locked.gather(1, group), float("inf"))
        best = score.argmin(dim=1)
        prune = group[r, best]
        after = e + contrib[r, prune] - contrib[r, grow]
        active &= (e.abs() > threshold) & (g_lo <= g_hi) & torch.isfinite(score[r, best])
        if same_sign:
            active &= torch.sign(after) == sign0
        if not bool(active.any()):
            break
        g_hi, g_lo = g_hi - (e > 0).long(), g_lo + (e <= 0).long()
        mask[r[active], prune[active]] = True
        mask[r[active], grow[active]] = False
        locked[r[active], prune[active]] = True
        e = torch.where(active, after, e)
    return mask


@PRUNERS.register("dsnot", version=2, display="DSnoT", calibration=True,
                  paper_name={"wanda": "w.DSnoT", "sparsegpt": "s.DSnoT"})
@torch.no_grad()
def dsnot(weight: torch.Tensor, stats: LayerStats, sparsity: float, pattern: Pattern | None = None,
          *, base: str = "wanda", max_cycles: int = 50, threshold: float = 0.1, var_power: float = 1.0,
          same_sign: bool | None = None, skip: Sequence[str] = ("mlp",), window_tokens: int | None = None,
          name: str = "", cache: dict | None = None) -> torch.Tensor:
    """Refine the base method's mask of `weight` [out, in]; returns the masked (not updated) weight.

    `window_tokens`: tokens per calibration window, the span the error is summed over (the engine
    passes its windows' length; None counts all of `stats`' tokens as one window). `same_sign`: None
    applies the sign rule to N:M only, as the released code does."""
    if base not in BASES:
        raise MPTError(f"DSnoT refines {BASES} masks, not {base!r}", "pass base='wanda' or base='sparsegpt'")
    if window_tokens is not None and int(window_tokens) < 1:
        raise MPTError(f"window_tokens must be a positive token count, got {window_tokens!r}",
                       "pass the calibration windows' length, or leave it to the engine (None)")
    W = weight.float()
    importance = wanda_scores(W, stats)
    initial = importance if base == "wanda" else obs_saliency(W, stats, cache=cache)
    mask = nm_mask(initial, pattern) if pattern is not None else row_mask(initial, sparsity)
    if name.split(".")[0] in skip:
        return apply_mask(weight, mask)
    # per-window input sums: the threshold is calibrated on this scale, not on the per-token mean
    window_sum = stats.mean.to(W.device) * float(window_tokens or stats.n)
    contrib = W * window_sum.unsqueeze(0)
    var = stats.var.to(W.device).clamp_min(1e-12)
    regrow_key = contrib / var.pow(var_power).unsqueeze(0) if var_power else contrib
    if pattern is None:
        mask = refine_rows(mask, contrib, regrow_key, importance, max_cycles, threshold, bool(same_sign))
    else:
        mask = refine_nm(mask, contrib, regrow_key, initial, pattern, max_cycles, threshold,
                         same_sign is None or same_sign)
    return apply_mask(weight, mask)
