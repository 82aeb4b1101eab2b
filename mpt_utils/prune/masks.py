"""Mask selection shared by every pruning method: validation, per-row / per-layer / N:M top-k.

Convention: a mask is a bool tensor shaped like the weight, True where the weight is pruned.
N:M means N weights pruned in every group of M consecutive input weights of a row (2:4, 4:8).
"""

from __future__ import annotations

import torch

from mpt_utils.errors import MPTError, check_ratio

Pattern = tuple[int, int]
MASK_SCOPES = ("row", "layer")


def parse_pattern(pattern: str | tuple[int, int] | list[int] | None) -> Pattern | None:
    """None/'unstructured' -> None; '2:4' or (2, 4) -> (2, 4). N pruned of every M, so 0 < N < M."""
    if pattern is None or (isinstance(pattern, str) and pattern.strip().lower() in ("", "unstructured")):
        return None
    fix = "pass an N:M pattern with 0 < N < M, e.g. '2:4' or '4:8' (N of every M weights pruned)"
    try:
        if isinstance(pattern, str):
            n_str, m_str = pattern.split(":")
            n, m = int(n_str), int(m_str)
        else:
            n, m = (int(v) for v in pattern)
    except (ValueError, TypeError):
        raise MPTError(f"cannot read N:M pattern {pattern!r}", fix) from None
    if not 0 < n < m:
        raise MPTError(f"N:M pattern {n}:{m} is invalid (N must be in 1..M-1)", fix)
    return n, m


def pattern_name(pattern: Pattern | None) -> str:
    return "unstructured" if pattern is None else f"{pattern[0]}:{pattern[1]}"


def resolve_sparsity(sparsity: float | None, pattern: Pattern | None) -> float:
    """The sparsity a point asks for: N/M for a pattern (a different explicit value is an error)."""
    if pattern is not None:
        target = pattern[0] / pattern[1]
        if sparsity is not None and abs(float(sparsity) - target) > 1e-9:
            raise MPTError(f"sparsity={sparsity} contradicts pattern {pattern_name(pattern)} (= {target:g})",
                           "omit sparsity for N:M points, or pass sparsity=N/M")
        return target
    if sparsity is None:
        raise MPTError("no sparsity given", "pass sparsity in [0, 1), or an N:M pattern like '2:4'")
    return check_ratio(sparsity, "sparsity")


def n_pruned(count: int, sparsity: float) -> int:
    """How many of `count` weights a sparsity removes: rounded to nearest (the measured value is stored)."""
    return min(count, int(round(count * sparsity)))


def _kth_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value along the last dim (k >= 1). numpy's partition is O(n) and ~30x
    faster than torch.topk on CPU for large k; on other devices torch.kthvalue does the job."""
    if scores.device.type == "cpu":
        import numpy as np

        arr = scores.detach().float().numpy()
        return torch.from_numpy(np.partition(arr, k - 1, axis=-1)[..., k - 1].copy())
    return torch.kthvalue(scores.float(), k, dim=-1).values


def _lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of exactly k lowest entries per row of a 2-D tensor; ties at the threshold go by position."""
    thr = _kth_smallest(scores, k).to(scores.device).unsqueeze(-1)
    below = scores < thr
    ties = scores == thr
    missing = k - below.sum(dim=-1, keepdim=True)
    return below | (ties & (ties.cumsum(dim=-1) <= missing))


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest-scoring `sparsity` fraction of every output row (Wanda's comparison group)."""
    k = n_pruned(scores.shape[1], sparsity)
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    return _lowest_k(scores, k)


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest-scoring `sparsity` fraction of the whole matrix (exact count)."""
    k = n_pruned(scores.numel(), sparsity)
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    return _lowest_k(scores.reshape(1, -1), k).view_as(scores)


def check_nm_shape(in_features: int, pattern: Pattern) -> None:
    n, m = pattern
    if in_features % m:
        raise MPTError(f"a layer with {in_features} inputs cannot hold the {n}:{m} pattern",
                       f"use an M that divides every layer's input size (e.g. 2:4 or 4:8 for {in_features})")


def nm_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Prune the N lowest scores in every group of M consecutive inputs of each row."""
    n, m = pattern
    rows, cols = scores.shape
    check_nm_shape(cols, pattern)
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=2, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.view(rows, cols)


def select_mask(scores: torch.Tensor, sparsity: float, pattern: Pattern | None, scope: str = "row"
                ) -> torch.Tensor:
    """The pruning mask for `scores` (higher = more important) at `sparsity` or N:M `pattern`."""
    if pattern is not None:
        return nm_mask(scores, pattern)
    if scope == "row":
        return row_mask(scores, sparsity)
    if scope == "layer":
        return layer_mask(scores, sparsity)
    raise MPTError(f"unknown mask scope {scope!r}", f"use one of {MASK_SCOPES}")


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A copy of `weight` with the masked entries set to zero, in the weight's dtype."""
    return weight.masked_fill(mask.to(weight.device), 0)
