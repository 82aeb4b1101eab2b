"""Rank accounting: from a parameter-reduction ratio to ranks, and back to the reduction achieved.

The ratio axis is Table 7's: the fraction of the decomposed linears' weight parameters removed.
A layer at reduction ρ keeps rank r = ⌊(1 − ρ)·out·in / (out + in)⌋, so it never grows. Ranks are
integers, so the achieved reduction is a little above the request; it is always measured, never
assumed. ASVD's allocation (a different reduction per layer, chosen by calibration sensitivity)
lives here too, as a pure function of the measured sensitivity table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from mpt_utils.errors import MPTError
from mpt_utils.lowrank.factorized import breakeven_rank, factorized_params

Shape = tuple[int, int]  # (out_features, in_features)
AXES = ("params", "rank")


def check_lowrank_ratio(ratio: float, name: str = "ratio") -> float:
    """A parameter reduction in [0, 1); a negative one would add parameters, which is an error."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise MPTError(f"{name}={ratio!r} is not a number", f"pass a {name} in [0, 1), e.g. 0.2") from None
    if value < 0:
        raise MPTError(f"{name}={value} would increase the parameters of the decomposed layers",
                       f"pass a parameter reduction {name} in [0, 1): 0 keeps the model dense")
    if value >= 1 or not math.isfinite(value):
        raise MPTError(f"{name}={value} would remove every parameter", f"pass a {name} in [0, 1), e.g. 0.2")
    return value


def rank_for_ratio(out_features: int, in_features: int, ratio: float, axis: str = "params") -> int:
    """Rank of an [out, in] weight at `ratio`; 0 means "keep dense" (ratio 0).

    axis="params": `ratio` is the fraction of the layer's parameters removed (Table 7's axis).
    axis="rank": `ratio` is the fraction of the rank min(out, in) removed, as some papers state it; a
    rank that does not save parameters (e.g. 20% rank removal on a square matrix) is an MPTError.
    """
    ratio = check_lowrank_ratio(ratio)
    if ratio == 0:
        return 0
    dense = out_features * in_features
    if axis == "params":
        rank = int(math.floor((1.0 - ratio) * dense / (out_features + in_features) + 1e-9))
    elif axis == "rank":
        rank = int(round((1.0 - ratio) * min(out_features, in_features)))
        limit = breakeven_rank(out_features, in_features)
        if rank > limit:
            raise MPTError(
                f"removing {ratio:.0%} of the rank of a {out_features}×{in_features} weight keeps rank {rank}, "
                f"whose two factors hold {factorized_params(out_features, in_features, rank):,} parameters, "
                f"more than the dense {dense:,}",
                f"remove more than {1 - limit / min(out_features, in_features):.0%} of the rank, "
                "or state the ratio as a parameter reduction (axis='params')")
    else:
        raise MPTError(f"unknown ratio axis {axis!r}", f"use one of {AXES}")
    if rank < 1:
        raise MPTError(f"ratio={ratio} leaves rank 0 for a {out_features}×{in_features} weight",
                       "use a smaller ratio")
    return rank


def uniform_ranks(shapes: Mapping[str, Shape], ratio: float, axis: str = "params") -> dict[str, int]:
    """The same reduction for every layer (plain SVD and SVD-LLM)."""
    return {name: rank_for_ratio(o, i, ratio, axis) for name, (o, i) in shapes.items()}


def achieved_reduction(shapes: Mapping[str, Shape], ranks: Mapping[str, int]) -> float:
    """Fraction of the decomposed layers' weight parameters removed by `ranks` (0 = dense)."""
    dense = sum(o * i for o, i in shapes.values())
    kept = sum(factorized_params(o, i, ranks[n]) if ranks.get(n, 0) > 0 else o * i for n, (o, i) in shapes.items())
    return 1.0 - kept / dense


def allocate_by_sensitivity(groups: Mapping[str, Sequence[str]], shapes: Mapping[str, Shape],
                            sensitivity: Mapping[str, Mapping[float, float]], target: float
                            ) -> dict[str, float]:
    """ASVD's allocation: one threshold τ on the single-group calibration PPL; each group takes the
    largest candidate reduction whose PPL stays ≤ τ (none: dense). τ is the smallest value whose
    total reduction reaches `target` (binary search: the reduction only grows with τ).

    `sensitivity[group][reduction]` = calibration PPL with only that group compressed.
    Returns the reduction chosen per group (0.0 = dense).
    """
    target = check_lowrank_ratio(target, "target")
    if target == 0:
        return dict.fromkeys(groups, 0.0)
    sizes = {g: {c: _group_kept(groups[g], shapes, c) for c in sensitivity[g]} for g in groups}
    dense = sum(o * i for o, i in shapes.values())
    full = {g: sum(shapes[n][0] * shapes[n][1] for n in groups[g]) for g in groups}

    def choice(tau: float) -> dict[str, float]:
        out = {}
        for g in groups:
            ok = [c for c, ppl in sensitivity[g].items() if ppl <= tau]
            out[g] = max(ok) if ok else 0.0
        return out

    def reduction(pick: Mapping[str, float]) -> float:
        kept = sum(sizes[g][c] if c > 0 else full[g] for g, c in pick.items())
        return 1.0 - kept / dense

    taus = sorted({ppl for g in groups for ppl in sensitivity[g].values() if math.isfinite(ppl)})
    if not taus or reduction(choice(taus[-1])) < target:
        best = max(reduction(choice(math.inf)), 0.0)
        raise MPTError(f"the sensitivity candidates reach at most {best:.1%} reduction, below target {target:.1%}",
                       "lower the target, or add larger candidate reductions to the ASVD sensitivity search "
                       "(beyond 0.6, i.e. below the reference's 40% kept, also lower min_kept)")
    lo, hi = 0, len(taus) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if reduction(choice(taus[mid])) >= target:
            hi = mid
        else:
            lo = mid + 1
    return choice(taus[lo])


def _group_kept(names: Sequence[str], shapes: Mapping[str, Shape], reduction: float) -> int:
    return sum(factorized_params(*shapes[n], rank_for_ratio(*shapes[n], reduction)) for n in names)
