"""LoSparse: low-rank plus structured-sparse approximation, pruned while fine-tuning.

Reference: "LoSparse: Structured Compression of Large Language Models based on Low-Rank and Sparse
Approximation", Yixiao Li, Yifan Yu, Qingru Zhang, Chen Liang, Pengcheng He, Weizhu Chen and Tuo
Zhao, ICML 2023, arXiv:2306.11222, github.com/yxli2123/LoSparse (`utils.py`, `run_glue.py`,
`train_glue.sh`).

Each decoder linear becomes W ≈ U·V + S (`utils.substitute_layer_weights`): U, V from the truncated
SVD of W with U·V holding `low_rank_ratio` of the layer's parameters (rank ⌈ratio·out·in/(out+in)⌉,
0.05 in the reference), S = W − U·V initially dense. Then the model is fine-tuned while S is pruned
(`Pruner`, PLATON): the importance of S's entries is |S ⊙ ∂L/∂S| averaged over windows of `delta_t`
steps and smoothed by an exponential moving average (β1 = 0.85; β2 = 1 in the reference run, which
disables the uncertainty term), reduced to one score per row (structured, "mean" over the row), and
the rows under a global threshold are zeroed. The fraction of S kept follows the cubic schedule
1 → final: full during the first `initial_warmup` share of the steps, final during the last
`final_warmup` share, r(t) = final + (1 − final)(1 − progress)³ in between, re-masked every
`delta_t` steps (every step in the final phase). At the end the zero rows are dropped from
storage, so a layer stores r·(out+in) + (kept rows)·in numbers, and the report counts both
(`plan.info["parts"]` splits them).

The suite's ratio fixes the final fraction of S: U·V keeps `low_rank_ratio` of the decoder linears'
parameters and S's kept rows fill the rest of 1 − ratio (the reference's MNLI run: 0.05 low rank +
0.15 of S). The reference fine-tunes on a downstream task (GLUE, SQuAD, summarisation) with its
task loss; here the task is language modelling on the calibration windows. Its MNLI run
(`train_glue.sh`): AdamW at lr 9e-5 (no weight decay), batches of 256 (32 × 8 accumulation), 8
epochs, 480 warm-up steps of a linear schedule (3.9% of its 12,272 steps), pruning warm-ups of 675
and 5·675 steps (5.5% and 27.5% of the run, the shares used here), ΔT = 10. The whole network
trains in the reference; here the decomposed linears and the block norms train (on copies, so
`report.restore` gives back the dense model) while the (tied) embeddings stay frozen. `steps=None`
is 8 epochs over the calibration windows. Reduced budget for the embedded smollm2-135m: `steps=8`,
`batch_size=2`, `delta_t=1` (8 × 2 × 256 = 4,096 tokens; masking every step so the cubic schedule
still has steps to act on), about 3 minutes a point on 2 CPU cores.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn

from mpt_utils.calibration import LayerStats, decoder_layers
from mpt_utils.errors import MPTError
from mpt_utils.lowrank import LOWRANK
from mpt_utils.lowrank._structured import LowRankSparseLinear
from mpt_utils.lowrank._training import TrainedCache, block_names, swap_in_trainable_copies
from mpt_utils.lowrank.factorized import (
    LowRankPlan,
    LowRankReport,
    count_params,
    get_module,
    layer_reduction,
    set_module,
    target_linears,
)
from mpt_utils.lowrank.ranks import check_lowrank_ratio
from mpt_utils.lowrank.svd import top_singular
from mpt_utils.progress import progress_bar

# train_glue.sh (MNLI): 12,272 optimizer steps, warm-up 480, pruning warm-ups 1·675 and 5·675
REFERENCE = {"low_rank_ratio": 0.05, "lr": 9e-5, "batch_size": 256, "epochs": 8, "beta1": 0.85, "beta2": 1.0,
             "delta_t": 10, "warmup": 480 / 12_272, "initial_warmup": 675 / 12_272,
             "final_warmup": 5 * 675 / 12_272}


def losparse_rank(out_features: int, in_features: int, low_rank_ratio: float) -> int:
    """The reference's rank: ⌈ratio · out·in / (out + in)⌉."""
    return max(1, math.ceil(low_rank_ratio * out_features * in_features / (out_features + in_features)))


@torch.no_grad()
def losparse_init(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U [out, r], V [r, in], S = W − U·V) from the truncated SVD, √s on both factors."""
    w = weight.detach().double()
    u, s, vh = top_singular(w, rank)
    root = s.sqrt()
    up, down = u * root, root[:, None] * vh
    return up.to(weight.dtype), down.to(weight.dtype), (w - up @ down).to(weight.dtype)


def cubic_keep(step: int, total: int, final: float, initial_warmup: float, final_warmup: float,
               delta_t: int) -> tuple[float, bool]:
    """(fraction of S kept, whether to mask now) at optimizer step `step` of `total` (the reference's
    `schedule_threshold_comb`, with its warm-ups as shares of the run)."""
    start = initial_warmup * total
    end = final_warmup * total
    if step <= start:
        return 1.0, False
    if step > total - end:
        return final, True
    progress = (step - start) / max(total - start - end, 1e-9)
    return final + (1.0 - final) * (1.0 - progress) ** 3, step % delta_t == 0


def select_rows(scores: dict[str, torch.Tensor], widths: dict[str, int], budget: float) -> dict[str, torch.Tensor]:
    """Keep the highest-scoring rows of all S matrices together while their elements fit `budget`
    (the reference's global threshold on row-averaged importance, counted in elements)."""
    names = list(scores)
    flat = torch.cat([scores[n].double().cpu() for n in names])
    width = torch.cat([torch.full((scores[n].numel(),), float(widths[n]), dtype=torch.float64) for n in names])
    order = torch.argsort(flat, descending=True, stable=True)
    fits = torch.cumsum(width[order], 0) <= budget + 1e-6
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order[fits]] = True
    out, at = {}, 0
    for n in names:
        k = scores[n].numel()
        out[n] = keep[at:at + k]
        at += k
    return out


class _Importance:
    """PLATON's smoothed sensitivity |S ⊙ ∇S|, one tensor per S (reference `update_ipt_with_local_window`)."""

    def __init__(self, beta1: float, beta2: float, delta_t: int):
        self.beta1, self.beta2, self.delta_t = beta1, beta2, delta_t
        self.ipt: dict[str, torch.Tensor] = {}
        self.avg: dict[str, torch.Tensor] = {}
        self.unc: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, name: str, p: torch.Tensor, step: int) -> None:
        if p.grad is None:
            return
        sens = (p * p.grad).abs()
        if name not in self.ipt:
            self.ipt[name], self.avg[name] = torch.zeros_like(p), torch.zeros_like(p)
            self.unc[name] = torch.zeros_like(p)
        local = step % self.delta_t
        if local == 0:
            self.avg[name].mul_(self.beta1).add_(self.ipt[name], alpha=1 - self.beta1)
            if 0 < self.beta2 < 1:
                self.unc[name].mul_(self.beta2).add_((self.ipt[name] - self.avg[name]).abs(), alpha=1 - self.beta2)
            self.ipt[name] = sens
        else:
            self.ipt[name] = (self.ipt[name] * local + sens) / (local + 1)

    def row_scores(self, name: str, like: torch.Tensor) -> torch.Tensor:
        if name not in self.avg:  # never saw a gradient: magnitude decides
            return like.detach().abs().mean(1)
        score = self.avg[name] * self.unc[name] if 0 < self.beta2 < 1 else self.avg[name]
        return score.mean(1)


class LoSparsePlan(TrainedCache, LowRankPlan):
    """Nothing ratio-independent but the shapes; `apply` decomposes, fine-tunes and prunes."""

    def __init__(self, model: nn.Module, names: list[str], calib_ids: torch.Tensor, device: torch.device,
                 progress: bool, cfg: dict):
        self._shapes = {n: (get_module(model, n).out_features, get_module(model, n).in_features) for n in names}
        super().__init__("losparse", {}, lambda ratio: {n: 0 for n in names},
                         {"calibration": True, "config": cfg, "train_log": {}, "parts": {}})
        self.names, self.calib_ids, self.device, self.progress, self.cfg = names, calib_ids, device, progress, cfg

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self._shapes)

    def budgets(self, ratio: float) -> tuple[dict[str, int], float]:
        """Ranks of U·V and the number of S elements the kept rows may hold at `ratio`."""
        ratio = check_lowrank_ratio(ratio)
        ranks = {n: losparse_rank(o, i, self.cfg["low_rank_ratio"]) for n, (o, i) in self._shapes.items()}
        dense = sum(o * i for o, i in self._shapes.values())
        low = sum(r * sum(self._shapes[n]) for n, r in ranks.items())
        budget = (1 - ratio) * dense - low
        if budget < 0:
            raise MPTError(f"ratio {ratio} leaves fewer parameters than the low-rank part alone "
                           f"({low / dense:.1%} of the layers)", "lower the ratio or low_rank_ratio")
        return ranks, budget

    def apply(self, model: nn.Module, ratio: float, train: bool = True) -> LowRankReport:
        """Decompose, fine-tune while pruning S, compact. `train=False`: the same layer shapes with S's
        rows chosen by magnitude and no training (for timing: `apply_shapes`)."""
        start = time.perf_counter()
        ratio = check_lowrank_ratio(ratio)
        before = count_params(model)
        if ratio == 0:
            layers = [layer_reduction(n, get_module(model, n)) for n in self.names]
            return LowRankReport(self.method, ratio, layers, before, before, 0.0, {})
        if train:
            again = self._recall(model, ratio, self.names, self.method)
            if again is not None:
                return again
        ranks, budget = self.budgets(ratio)
        originals: dict[str, nn.Module] = {}
        for n in self.names:
            lin = get_module(model, n)
            up, down, sparse = losparse_init(lin.weight, ranks[n])
            originals[n] = set_module(model, n, LowRankSparseLinear(up, down, sparse, lin.bias))
        if train:
            self.info["train_log"][ratio] = self._train(model, budget, originals)
        else:
            mods = {name: get_module(model, name) for name in self.names}
            self._mask(mods, _Importance(0.0, 1.0, 1), {k: m.in_features for k, m in mods.items()}, budget)
            for m in mods.values():
                m.compact()
        layers = [layer_reduction(n, get_module(model, n)) for n in self.names]
        low = sum(get_module(model, n).up.numel() + get_module(model, n).down.numel() for n in self.names)
        sparse = sum(get_module(model, n).sparse.numel() for n in self.names)
        self.info["parts"][ratio] = {"low_rank_params": low, "sparse_params": sparse,
                                     "dense_params": sum(o * i for o, i in self._shapes.values())}
        report = LowRankReport(self.method, ratio, layers, before, count_params(model), time.perf_counter() - start,
                               originals)
        if train:
            self._remember(model, ratio, originals)
        return report

    def _train(self, model: nn.Module, budget: float, originals: dict[str, nn.Module]) -> dict:
        cfg = self.cfg
        ids = self.calib_ids[:, : cfg["seqlen"]] if cfg["seqlen"] else self.calib_ids
        n = int(ids.shape[0])
        batch = min(cfg["batch_size"], n)
        total = cfg["steps"] or int(math.ceil(cfg["epochs"] * math.ceil(n / batch)))
        mods = {name: get_module(model, name) for name in self.names}
        widths = {name: m.in_features for name, m in mods.items()}
        final = budget / sum(m.sparse.numel() for m in mods.values())
        home = next(model.parameters()).device
        params: list[nn.Parameter] = []
        for b, block in zip(block_names(model), decoder_layers(model)):
            params.extend(swap_in_trainable_copies(model, block, b, originals))
        trainable = {id(p) for p in params}
        frozen = [p for p in model.parameters() if id(p) not in trainable and p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
        warm = max(1, round(cfg["warmup"] * total))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(total - warm, 1)))
        imp = _Importance(cfg["beta1"], cfg["beta2"], cfg["delta_t"])
        gen = torch.Generator().manual_seed(0)
        order = torch.randperm(n, generator=gen)
        micro = max(1, min(cfg["micro_batch_size"], batch))
        was = model.training
        model.to(self.device).train()
        losses, t0, masks = [], time.perf_counter(), 0
        try:
            for step in progress_bar(range(total), desc="LoSparse fine-tuning", disable=not self.progress, leave=False):
                pick = order[[(step * batch + k) % n for k in range(batch)]]
                rows = ids[pick].to(self.device)
                loss_sum = 0.0
                for s in range(0, batch, micro):
                    chunk = rows[s:s + micro]
                    loss = model(input_ids=chunk, labels=chunk, use_cache=False).loss * (chunk.shape[0] / batch)
                    loss.backward()
                    loss_sum += float(loss.detach())
                losses.append(loss_sum)
                opt.step()
                sched.step()
                for name, m in mods.items():
                    imp.update(name, m.sparse, step)
                opt.zero_grad(set_to_none=True)
                keep, mask_now = cubic_keep(step, total, final, cfg["initial_warmup"], cfg["final_warmup"],
                                            cfg["delta_t"])
                if mask_now:
                    self._mask(mods, imp, widths, keep * sum(m.sparse.numel() for m in mods.values()))
                    masks += 1
        finally:
            # the target holds whatever the schedule reached: a last mask at the final fraction
            self._mask(mods, imp, widths, budget)
            for p in params:
                p.requires_grad_(False)
            for p in frozen:
                p.requires_grad_(True)
            model.to(home).train(was)
        for m in mods.values():
            m.compact()
        return {"steps": total, "batch_size": batch, "seqlen": int(ids.shape[1]),
                "tokens": total * batch * int(ids.shape[1]), "lr": cfg["lr"], "final_keep": final,
                "masks": masks + 1, "loss_first": losses[0] if losses else math.nan,
                "loss_last": losses[-1] if losses else math.nan, "seconds": time.perf_counter() - t0}

    def apply_shapes(self, model: nn.Module, ratio: float) -> LowRankReport:
        return self.apply(model, ratio, train=False)

    @staticmethod
    @torch.no_grad()
    def _mask(mods: dict[str, LowRankSparseLinear], imp: _Importance, widths: dict[str, int], budget: float) -> None:
        scores = {name: imp.row_scores(name, m.sparse) for name, m in mods.items()}
        # rows already zero stay pruned (a zero row has zero sensitivity, so they rank last anyway)
        keep = select_rows(scores, widths, budget)
        for name, m in mods.items():
            m.sparse[~keep[name].to(m.sparse.device)] = 0


@LOWRANK.register("losparse", version=1, display="LoSparse", calibration=True, mode="I")
def plan_losparse(model: nn.Module, calib_ids: torch.Tensor | None = None, *,
                  stats: dict[str, LayerStats] | None = None, device: str | torch.device | None = None,
                  layer_filter: Callable[[str], bool] | None = None, progress: bool = True,
                  low_rank_ratio: float = REFERENCE["low_rank_ratio"], steps: int | None = None,
                  epochs: float = REFERENCE["epochs"], batch_size: int = REFERENCE["batch_size"],
                  micro_batch_size: int = 4, lr: float = REFERENCE["lr"], seqlen: int | None = None,
                  beta1: float = REFERENCE["beta1"], beta2: float = REFERENCE["beta2"],
                  delta_t: int = REFERENCE["delta_t"], warmup: float = REFERENCE["warmup"],
                  initial_warmup: float = REFERENCE["initial_warmup"],
                  final_warmup: float = REFERENCE["final_warmup"]) -> LowRankPlan:
    """LoSparse (module docstring). Fine-tunes with the language-modelling loss on `calib_ids` at
    `plan.apply`; `micro_batch_size` only splits a batch for memory (same gradient)."""
    from mpt_utils.models import pick_device

    if calib_ids is None:
        raise MPTError("LoSparse fine-tunes on calibration windows", "pass calib_ids=calibration_windows(...)")
    if not 0 < low_rank_ratio < 1:
        raise MPTError(f"low_rank_ratio={low_rank_ratio} is outside (0, 1)", "the reference uses 0.05")
    if (steps is not None and steps < 1) or epochs <= 0 or batch_size < 1 or micro_batch_size < 1 or lr < 0 \
            or delta_t < 1 or (seqlen is not None and seqlen < 2):
        raise MPTError(f"invalid LoSparse budget (steps={steps}, epochs={epochs}, batch_size={batch_size}, lr={lr}, "
                       f"delta_t={delta_t}, seqlen={seqlen})", "use steps >= 1 (None: 8 epochs), batch_size >= 1, "
                       "lr >= 0, delta_t >= 1")
    if not (0 <= beta1 < 1 and 0 < beta2 <= 1) or not (0 <= initial_warmup and 0 <= final_warmup
                                                       and initial_warmup + final_warmup < 1) or not 0 <= warmup < 1:
        raise MPTError("invalid LoSparse schedule (beta1 in [0, 1), beta2 in (0, 1], warm-up shares in [0, 1) "
                       "summing below 1)", "the reference: beta1=0.85, beta2=1, shares 0.055 and 0.275")
    names = list(target_linears(model, layer_filter))
    cfg = {"low_rank_ratio": low_rank_ratio, "steps": steps, "epochs": epochs, "batch_size": batch_size,
           "micro_batch_size": micro_batch_size, "lr": lr, "seqlen": seqlen, "beta1": beta1, "beta2": beta2,
           "delta_t": delta_t, "warmup": warmup, "initial_warmup": initial_warmup, "final_warmup": final_warmup}
    return LoSparsePlan(model, names, calib_ids, pick_device(device), progress, cfg)
