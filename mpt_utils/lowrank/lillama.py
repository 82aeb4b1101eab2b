"""Lillama: low-rank feature distillation.

Reference: "Lillama: Large Language Models Compression via Low-Rank Feature Distillation", Yaya Sy,
Christophe Cerisara and Irina Illina, arXiv:2412.16719, github.com/yaya-sy/lillama.

1. Ranks (`search_ranks.py`, strategy "bottom", the default): starting at the first block, the
   linears' ranks are lowered step by step (largest candidate first, in steps of 256 down to a
   minimum rank of 1024 for 4096-wide 7B models) until the parameter target is reached, so the
   lowest blocks are compressed to the minimum rank and the top ones stay dense. The candidates
   scale with the model here: minimum rank `min_rank_fraction` (1024/4096) and step
   `rank_step_fraction` (256/4096) of the hidden size. `allocation="uniform"`: every linear at
   the ratio. The ratio is the reduction of the decoder linears (the reference counts the whole
   model).
2. Initialisation (`lowrank_llm.py`, `init_method="svd"`): the truncated SVD of each weight, √s on
   both factors.
3. Distillation (`distiller.py`, `train.py`): every compressed block is a student of its dense
   block; the loss is local, L1 + (−log σ(cos)) between the student's and the teacher's block
   outputs (`distillation_loss="teacher+student"`: once with the teacher's inputs to the block and
   once with the student chain's own inputs, both against the teacher's output), one AdamW per block
   (lr 8.6e-5, torch defaults otherwise, no schedule), batches of 8 sequences, every block updated
   at every step, and each block keeps the parameters of its lowest student-input loss seen
   (`keep_best`). The whole student block trains (factors and norms); norms are trained on copies
   so `report.restore` brings back the dense model.

Budget: the reference makes one pass over its training set; the paper compresses Phi-2 by 40% with
13 million calibration tokens (its abstract), `steps=None` here (13M tokens / (batch_size × seqlen) steps over the calibration windows, cycled).
A CPU point cannot afford that: pass `steps`; the plan records steps and tokens used in
`plan.info["train_log"]`. Reduced budget for the embedded smollm2-135m (8 calibration windows of 256
tokens): `steps=8`, i.e. 8 × 8 × 256 = 16,384 tokens (0.13% of the reference), about 3 minutes a
point on 2 CPU cores; at ratio 0.2 the bottom search compresses the first blocks to rank 144 and
8 steps at the reference learning rate recover little of the SVD damage (PPL in the tens of
thousands), so that point measures the budget, not the method.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from mpt_utils.calibration import LayerStats, decoder_layers
from mpt_utils.errors import MPTError
from mpt_utils.lowrank import LOWRANK
from mpt_utils.lowrank._training import (
    TrainedCache,
    block_inputs,
    block_names,
    first,
    swap_in_trainable_copies,
)
from mpt_utils.lowrank.factorized import (
    LowRankPlan,
    LowRankReport,
    breakeven_rank,
    factorized_params,
    target_linears,
)
from mpt_utils.lowrank.ranks import check_lowrank_ratio, uniform_ranks
from mpt_utils.lowrank.svd import scaled_svd
from mpt_utils.progress import progress_bar

LOSSES = ("teacher", "student", "teacher+student")
ALLOCATIONS = ("bottom", "uniform")
REFERENCE_TOKENS = 13_000_000  # the paper's calibration budget (abstract: Phi-2 at 40%)
REFERENCE = {"lr": 8.6e-5, "batch_size": 8, "min_rank_fraction": 1024 / 4096, "rank_step_fraction": 256 / 4096}


def l1_cos_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Lillama's feature loss: mean |a − y| over features minus log σ(cos(a, y)), averaged over tokens."""
    l1 = (student - teacher).abs().mean(-1)
    return (l1 - F.logsigmoid(F.cosine_similarity(student, teacher, dim=-1))).mean()


def bottom_ranks(shapes: dict[str, tuple[int, int]], order: list[str], target: float, hidden: int,
                 min_rank_fraction: float, rank_step_fraction: float) -> dict[str, int]:
    """The reference's "bottom" search: blocks in order, each block's linears lowered through the
    candidate ranks (largest first, all linears of a block together) until the decoder linears'
    parameters are reduced by `target`. 0 = left dense."""
    target = check_lowrank_ratio(target)
    dense = sum(o * i for o, i in shapes.values())
    if target == 0:
        return dict.fromkeys(shapes, 0)
    min_rank = max(1, round(min_rank_fraction * hidden))
    step = max(1, round(rank_step_fraction * hidden))
    params = {n: o * i for n, (o, i) in shapes.items()}
    ranks = dict.fromkeys(shapes, 0)
    budget = (1 - target) * dense
    for block in order:
        names = [n for n in shapes if n.startswith(f"{block}.")]
        cands = []
        for n in names:
            o, i = shapes[n]
            r = min_rank
            while r < min(o, i):
                if factorized_params(o, i, r) < o * i and r <= breakeven_rank(o, i):
                    cands.append((-r, names.index(n), n, r))
                r += step
        for _, _, n, r in sorted(cands):
            if sum(params.values()) <= budget:
                return ranks
            new = factorized_params(*shapes[n], r)
            if new < params[n]:
                params[n], ranks[n] = new, r
    if sum(params.values()) > budget:
        reached = 1 - sum(params.values()) / dense
        raise MPTError(f"Lillama's bottom search reaches at most {reached:.1%} reduction, below {target:.1%}",
                       "lower the ratio, lower min_rank_fraction, or use allocation='uniform'")
    return ranks


class LillamaPlan(TrainedCache, LowRankPlan):
    """SVD factors once; `apply(ratio)` factorizes with the ratio's ranks and distills every compressed block."""

    def __init__(self, facts, allocate, calib_ids: torch.Tensor, device: torch.device, progress: bool,
                 budget: dict, info: dict):
        super().__init__("lillama", facts, allocate, info)
        self.calib_ids, self.device, self.progress, self.budget = calib_ids, device, progress, budget

    def apply(self, model: nn.Module, ratio: float) -> LowRankReport:
        start = time.perf_counter()
        again = self._recall(model, ratio, list(self.factorizations), self.method)
        if again is not None:
            return again
        names = block_names(model)
        layers = decoder_layers(model)
        ranks = self.ranks(ratio)
        hit = [i for i, b in enumerate(names) if any(ranks.get(n, 0) > 0 and n.startswith(f"{b}.") for n in ranks)]
        teachers = {i: copy.deepcopy(layers[i]) for i in hit}  # the dense blocks, before factorizing
        report = super().apply(model, ratio)
        if hit:
            self.info["train_log"][ratio] = distill(model, teachers, self.calib_ids, report.originals, self.budget,
                                                    self.device, self.progress)
        report.n_params_after = sum(p.numel() for p in model.parameters())
        report.seconds = time.perf_counter() - start
        self._remember(model, ratio, report.originals)
        return report


def distill(model: nn.Module, teachers: dict[int, nn.Module], calib_ids: torch.Tensor,
            originals: dict[str, nn.Module], budget: dict, device: torch.device, progress: bool = True) -> dict:
    """Train each factorized block `i` of `model` to reproduce `teachers[i]`'s outputs (module docstring)."""
    layers = decoder_layers(model)
    names = block_names(model)
    last = max(teachers)
    home = next(model.parameters()).device
    ids = calib_ids[:, : budget["seqlen"]] if budget.get("seqlen") else calib_ids
    hidden, kwargs = block_inputs(model, ids, device)
    n, seqlen = int(ids.shape[0]), int(ids.shape[1])
    batch = min(budget["batch_size"], n)
    steps = budget["steps"] or math.ceil(REFERENCE_TOKENS / (batch * seqlen))
    mode = budget["loss"]
    opts, params_of = {}, {}
    for i in teachers:
        block = layers[i].to(device)
        teachers[i].to(device).eval().requires_grad_(False)
        params = swap_in_trainable_copies(model, block, names[i], originals)
        for p in block.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        params_of[i] = params
        opts[i] = torch.optim.AdamW(params, lr=budget["lr"])
    for i in range(last + 1):
        layers[i].to(device)
    best = {i: math.inf for i in teachers}
    saved: dict[int, list[torch.Tensor]] = {}
    first_loss, last_loss = {}, {}
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(n, generator=gen)
    t0 = time.perf_counter()
    try:
        for step in progress_bar(range(steps), desc="Lillama distillation", disable=not progress, leave=False):
            pick = order[[(step * batch + k) % n for k in range(batch)]]
            x_t = x_s = hidden[pick].to(device)
            for i in range(last + 1):
                with torch.no_grad():
                    y = first((teachers[i] if i in teachers else layers[i])(x_t, **kwargs))
                if i not in teachers:
                    with torch.no_grad():
                        x_s = first(layers[i](x_s, **kwargs))
                    x_t = y
                    continue
                loss_total = 0.0
                if "teacher" in mode.split("+"):
                    loss_t = l1_cos_loss(first(layers[i](x_t, **kwargs)), y)
                    loss_t.backward()
                    loss_total += float(loss_t.detach())
                if "student" in mode.split("+"):
                    out_s = first(layers[i](x_s.detach(), **kwargs))
                    loss_s = l1_cos_loss(out_s, y)
                    score = float(loss_s.detach())
                    loss_s.backward()
                    loss_total += score
                    x_s = out_s.detach()
                else:
                    score = loss_total
                    with torch.no_grad():
                        x_s = first(layers[i](x_s, **kwargs))
                if budget["keep_best"] and score < best[i]:  # the parameters that produced this loss
                    best[i] = score
                    saved[i] = [p.detach().clone() for p in params_of[i]]
                opts[i].step()
                opts[i].zero_grad(set_to_none=True)
                first_loss.setdefault(i, loss_total)
                last_loss[i] = loss_total
                x_t = y
    finally:
        with torch.no_grad():
            for i, values in saved.items():
                for p, v in zip(params_of[i], values):
                    p.copy_(v)
        for i in teachers:
            for p in params_of[i]:
                p.requires_grad_(False)
        for i in range(last + 1):
            layers[i].to(home)
        for t in teachers.values():
            t.to("cpu")
    return {"steps": steps, "batch_size": batch, "seqlen": seqlen, "tokens": steps * batch * seqlen,
            "lr": budget["lr"], "loss": mode, "seconds": time.perf_counter() - t0,
            "loss_first": sum(first_loss.values()) / max(len(first_loss), 1),
            "loss_last": sum(last_loss.values()) / max(len(last_loss), 1), "blocks": sorted(teachers)}


@LOWRANK.register("lillama", version=1, display="Lillama", calibration=True, mode="II")
def plan_lillama(model: nn.Module, calib_ids: torch.Tensor | None = None, *,
                 stats: dict[str, LayerStats] | None = None, device: str | torch.device | None = None,
                 layer_filter: Callable[[str], bool] | None = None, progress: bool = True,
                 steps: int | None = None, batch_size: int = REFERENCE["batch_size"], lr: float = REFERENCE["lr"],
                 seqlen: int | None = None, loss: str = "teacher+student", allocation: str = "bottom",
                 min_rank_fraction: float = REFERENCE["min_rank_fraction"],
                 rank_step_fraction: float = REFERENCE["rank_step_fraction"], keep_best: bool = True) -> LowRankPlan:
    """Lillama (module docstring). The distillation runs at `plan.apply` on `calib_ids`; `steps=None`
    is the reference's 13M-token budget, far beyond a CPU (pass a reduced `steps`)."""
    from mpt_utils.models import pick_device

    if calib_ids is None:
        raise MPTError("Lillama distils on calibration windows", "pass calib_ids=calibration_windows(...)")
    if loss not in LOSSES:
        raise MPTError(f"unknown Lillama distillation loss {loss!r}", f"use one of {LOSSES}")
    if allocation not in ALLOCATIONS:
        raise MPTError(f"unknown Lillama allocation {allocation!r}", f"use one of {ALLOCATIONS}")
    if (steps is not None and steps < 1) or batch_size < 1 or lr <= 0 or (seqlen is not None and seqlen < 2):
        raise MPTError(f"invalid Lillama budget (steps={steps}, batch_size={batch_size}, lr={lr}, seqlen={seqlen})",
                       "use steps >= 1 (None: the reference's 13M tokens), batch_size >= 1, lr > 0")
    if not 0 < min_rank_fraction < 1 or not 0 < rank_step_fraction < 1:
        raise MPTError("min_rank_fraction and rank_step_fraction must lie in (0, 1)",
                       "the reference: 1024/4096 and 256/4096")
    dev = pick_device(device)
    linears = target_linears(model, layer_filter)
    facts = {n: scaled_svd(lin.weight, lin.bias, device=dev)
             for n, lin in progress_bar(linears.items(), desc="lillama SVDs", disable=not progress, leave=False)}
    shapes = {n: (lin.out_features, lin.in_features) for n, lin in linears.items()}
    order = block_names(model)
    hidden = int(model.config.hidden_size)
    if allocation == "bottom":
        def allocate(ratio: float) -> dict[str, int]:
            return bottom_ranks(shapes, order, ratio, hidden, min_rank_fraction, rank_step_fraction)
    else:
        def allocate(ratio: float) -> dict[str, int]:
            return uniform_ranks(shapes, ratio)
    budget = {"steps": steps, "batch_size": batch_size, "lr": lr, "seqlen": seqlen, "loss": loss,
              "keep_best": keep_best}
    return LillamaPlan(facts, allocate, calib_ids, dev, progress, budget,
                       {"calibration": True, "allocation": allocation, "budget": budget, "train_log": {}})

