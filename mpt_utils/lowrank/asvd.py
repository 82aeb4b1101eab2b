"""ASVD: activation-aware SVD with sensitivity-based rank allocation.

Reference: "ASVD: Activation-aware Singular Value Decomposition for Compressing Large Language
Models", Yuan, Shang, Song, Wu, Yan and Sun, arXiv:2312.05821, github.com/hahnyuan/ASVD4LLM.

1. Scaling (`act_aware_utils.py`, `scaling_method="abs_mean"`): input channels that carry large
   activations matter more, so the SVD is taken of W·S with S = diag(mean|x_j|)^α (α = 0.5) and undone
   after truncation: W′ = U_r Σ_r V_rᵀ S⁻¹. The scaling only re-weights columns of W; it still
   reconstructs the weight (the "weight-dominant", Mode I family of the Perspective), unlike SVD-LLM's
   whitening.
2. Allocation (`sensitivity.py` `calib_sensitivity_ppl`, `binary_search.py`): every layer (or group of
   layers) is compressed alone at each candidate reduction and the calibration perplexity measured;
   one perplexity threshold then picks, per layer, the largest reduction it tolerates, binary-searched
   until the whole model reaches the target (`ranks.allocate_by_sensitivity`).

Candidates: the reference tries `param_ratio_candidates = [0.4, ..., 0.9]`, the fraction of a layer's
parameters *kept*, i.e. reductions 0.1-0.6 here (`DEFAULT_CANDIDATES`); no layer ever keeps less than
40% (`min_kept=0.4`). A search down to 10% kept is available by passing larger candidates together
with a lower `min_kept`; it lets the allocation gut a few insensitive layers, which the reference
never does.

The sensitivity search is the cost: groups × candidates forward passes. Each pass starts at the
block being perturbed (earlier blocks are skipped, their cached dense outputs fed in), and
`granularity="part"` (attention / MLP of a block share one reduction; the reference is "linear")
keeps it cheap on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from mpt_utils.calibration import LayerStats, collect_stats, decoder_layers
from mpt_utils.errors import MPTError
from mpt_utils.eval.perplexity import nll_from_logits
from mpt_utils.lowrank import LOWRANK
from mpt_utils.lowrank.factorized import Factorization, LowRankPlan, get_module, set_module, target_linears
from mpt_utils.lowrank.ranks import allocate_by_sensitivity, rank_for_ratio
from mpt_utils.lowrank.svd import scaled_svd
from mpt_utils.progress import progress_bar

GRANULARITIES = ("linear", "part", "block")
# reductions; the reference's param_ratio_candidates [0.4, ..., 0.9] are the kept fractions 1 - these
DEFAULT_CANDIDATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
MIN_KEPT = 0.4  # the reference's floor: a layer keeps at least 40% of its parameters


def activation_scale(stats: LayerStats, alpha: float = 0.5) -> torch.Tensor:
    """S_jj = mean|x_j|^α; channels that never fire get a small floor so S stays invertible."""
    mean_abs = stats.abs_mean.double()
    floor = max(float(mean_abs.max()) * 1e-6, 1e-12)
    return mean_abs.clamp_min(floor) ** alpha


def group_of(name: str, block_names: Sequence[str], granularity: str) -> str:
    """The sensitivity group of a linear: itself, its attention/MLP part, or its whole block."""
    if granularity == "linear":
        return name
    if granularity == "part":
        return name.rpartition(".")[0]
    if granularity == "block":
        return next(b for b in block_names if name.startswith(f"{b}."))
    raise MPTError(f"unknown granularity {granularity!r}", f"use one of {GRANULARITIES}")


class _Skip(nn.Module):
    """Stands in for a decoder block that is not re-run: passes the hidden states through."""

    def __init__(self, original: nn.Module, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple
        if hasattr(original, "attention_type"):
            self.attention_type = original.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.as_tuple else hidden_states


class TailEvaluator:
    """Calibration perplexity of the model after perturbing block `start` and later, re-running only
    blocks start.. on the cached dense inputs of block `start` (blocks before it are unchanged)."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, windows: torch.Tensor):
        self.model, self.layers = model, decoder_layers(model)
        self.device = next(model.parameters()).device
        self.windows = windows.to(self.device)
        self.inputs: list[torch.Tensor | None] = [None] * len(self.layers)
        self.as_tuple = False

        def grab(i):
            def hook(_m, args, kwargs):
                self.inputs[i] = (args[0] if args else kwargs["hidden_states"]).detach()
            return hook

        def kind(_m, _args, output):
            self.as_tuple = isinstance(output, (tuple, list))

        handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
        handles.append(self.layers[0].register_forward_hook(kind))
        try:
            self.base = self._ppl(self.model(input_ids=self.windows, use_cache=False).logits)
        finally:
            for h in handles:
                h.remove()

    def _ppl(self, logits: torch.Tensor) -> float:
        nll = float(nll_from_logits(logits, self.windows).sum()) / (self.windows.numel() - self.windows.shape[0])
        return math.exp(nll) if math.isfinite(nll) and nll < 700 else math.inf

    @torch.no_grad()
    def ppl(self, start: int) -> float:
        cached = self.inputs[start]

        def feed(_m, args, kwargs):
            if args:
                return (cached, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": cached}

        skipped = [self.layers[i] for i in range(start)]
        for i in range(start):
            self.layers[i] = _Skip(skipped[i], self.as_tuple)
        handle = self.layers[start].register_forward_pre_hook(feed, with_kwargs=True)
        try:
            return self._ppl(self.model(input_ids=self.windows, use_cache=False).logits)
        finally:
            handle.remove()
            for i, layer in enumerate(skipped):
                self.layers[i] = layer


@contextmanager
def _compressed(model: nn.Module, facts: Mapping[str, Factorization], names: Sequence[str], reduction: float):
    """The linears `names` replaced by their factorization at `reduction`, restored afterwards."""
    saved = {}
    try:
        for n in names:
            old = get_module(model, n)
            rank = rank_for_ratio(old.out_features, old.in_features, reduction)
            saved[n] = set_module(model, n, facts[n].module(rank, old.weight.device, old.weight.dtype))
        yield
    finally:
        for n, old in saved.items():
            set_module(model, n, old)


def sensitivity(model: nn.Module, facts: Mapping[str, Factorization], groups: Mapping[str, Sequence[str]],
                windows: torch.Tensor, candidates: Sequence[float], progress: bool = True
                ) -> tuple[dict[str, dict[float, float]], float]:
    """Calibration PPL with each group alone compressed at each candidate reduction; plus the dense PPL."""
    tail = TailEvaluator(model, windows)
    position = {id(b): i for i, b in enumerate(tail.layers)}
    block_index = {name: position[id(b)] for name, b in model.named_modules() if id(b) in position}

    def first_block(names: Sequence[str]) -> int:  # re-run from the earliest block the group touches
        return min(i for n in names for b, i in block_index.items() if n.startswith(f"{b}."))

    starts = {g: first_block(names) for g, names in groups.items()}
    table: dict[str, dict[float, float]] = {}
    jobs = [(g, c) for g in groups for c in candidates]
    for g, c in progress_bar(jobs, desc="ASVD sensitivity", disable=not progress, leave=False):
        with _compressed(model, facts, groups[g], c):
            table.setdefault(g, {})[float(c)] = tail.ppl(starts[g])
    return table, tail.base


@LOWRANK.register("asvd", version=2, display="ASVD", calibration=True, mode="I",
                  sources=("mpt_utils.lowrank.ranks",))
def plan_asvd(model: nn.Module, calib_ids: torch.Tensor | None = None, *,
              stats: dict[str, LayerStats] | None = None, device: str | torch.device | None = None,
              layer_filter=None, progress: bool = True, alpha: float = 0.5,
              candidates: Sequence[float] = DEFAULT_CANDIDATES, min_kept: float = MIN_KEPT,
              granularity: str = "linear", sens_windows: int = 8, sens_seqlen: int | None = None,
              sensitivity_table: Mapping[str, Mapping[float, float]] | None = None) -> LowRankPlan:
    """ASVD: activation-scaled SVDs, then the sensitivity table (measured on the first `sens_windows`
    calibration windows cut to `sens_seqlen` tokens, or reused from `sensitivity_table`), then
    `plan.ranks(ratio)` allocates by sensitivity. Needs calib_ids (or stats plus a given table).

    `candidates` are per-group parameter reductions; none may keep less than `min_kept` of a layer
    (the reference's floor, 0.4). Targets beyond what the candidates reach are an MPTError."""
    from mpt_utils.models import pick_device

    if not 0 < alpha <= 2:
        raise MPTError(f"alpha={alpha} is outside (0, 2]", "ASVD uses alpha=0.5")
    if granularity not in GRANULARITIES:
        raise MPTError(f"unknown granularity {granularity!r}", f"use one of {GRANULARITIES}")
    cands = sorted({float(c) for c in candidates})
    if not cands or cands[0] <= 0 or cands[-1] >= 1:
        raise MPTError(f"candidate reductions {list(candidates)} must lie in (0, 1)", "e.g. 0.1, 0.2, ..., 0.6")
    if not 0 < min_kept <= 1:
        raise MPTError(f"min_kept={min_kept} is outside (0, 1]", f"the reference keeps at least {MIN_KEPT}")
    if 1 - cands[-1] < min_kept - 1e-9:
        raise MPTError(f"candidate reduction {cands[-1]} keeps {1 - cands[-1]:.0%} of a layer, below the floor "
                       f"min_kept={min_kept}",
                       f"drop candidates above {1 - min_kept:.2f}, or lower min_kept (the reference: {MIN_KEPT})")
    dev = pick_device(device)
    if stats is None:
        if calib_ids is None:
            raise MPTError("ASVD needs calibration data", "pass calib_ids or stats from collect_stats")
        stats = collect_stats(model, calib_ids, device=dev, layer_filter=layer_filter, progress=progress)
    linears = target_linears(model, layer_filter)
    missing = [n for n in linears if n not in stats]
    if missing:
        raise MPTError(f"no calibration statistics for {missing[0]} (and {len(missing) - 1} more)",
                       "collect stats on the same model")
    facts = {n: scaled_svd(lin.weight, lin.bias, diag=activation_scale(stats[n], alpha), device=dev)
             for n, lin in progress_bar(linears.items(), desc="asvd SVDs", disable=not progress, leave=False)}
    block_names = [n for n, b in model.named_modules() if any(b is m for m in decoder_layers(model))]
    groups: dict[str, list[str]] = {}
    for n in linears:
        groups.setdefault(group_of(n, block_names, granularity), []).append(n)

    base = math.nan
    if sensitivity_table is None:
        if calib_ids is None:
            raise MPTError("the ASVD sensitivity search needs calibration windows", "pass calib_ids")
        windows = calib_ids[:sens_windows, :sens_seqlen] if sens_seqlen else calib_ids[:sens_windows]
        moved = next(model.parameters()).device
        model.to(dev)
        try:
            table, base = sensitivity(model, facts, groups, windows, cands, progress)
        finally:
            model.to(moved)
    else:
        table = {g: {float(c): float(v) for c, v in row.items()} for g, row in sensitivity_table.items()}
        if set(table) != set(groups):
            raise MPTError("the given sensitivity table does not match this model's layer groups",
                           f"recompute it with granularity={granularity!r}")
        # a stored table may hold candidates below the floor: they are never allocated
        table = {g: {c: v for c, v in row.items() if 1 - c >= min_kept - 1e-9} for g, row in table.items()}
    shapes = {n: (lin.out_features, lin.in_features) for n, lin in linears.items()}

    def allocate(ratio: float) -> dict[str, int]:
        picks = allocate_by_sensitivity(groups, shapes, table, ratio)
        return {n: rank_for_ratio(*shapes[n], picks[g]) for g, names in groups.items() for n in names}

    return LowRankPlan("asvd", facts, allocate,
                       {"calibration": True, "alpha": alpha, "granularity": granularity, "candidates": cands,
                        "min_kept": min_kept,
                        "sensitivity": table, "sensitivity_base_ppl": base, "groups": groups})
