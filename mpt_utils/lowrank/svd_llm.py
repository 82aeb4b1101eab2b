"""SVD-LLM: truncation-aware data whitening, then the parameter update of the truncated factors.

Reference: "SVD-LLM: Truncation-aware Singular Value Decomposition for Large Language Model
Compression", Wang, Zheng, Wan and Zhang, arXiv:2403.07378 (ICLR 2025),
github.com/AIoT-MLSys-Lab/SVD-LLM.

Whitening (`SVDLLM.py`, `whitening`). With XᵀX = L·Lᵀ (Cholesky of the calibration Gram matrix of
the layer's inputs), the output error of a rank-r approximation is ‖(W − W′)X‖_F = ‖(W − W′)L‖_F.
Truncating the SVD of W·L therefore minimises the output error directly: each dropped singular value
of W·L is exactly the error it adds. W′ = U_r Σ_r V_rᵀ L⁻¹, stored as up = U_r Σ_r^½ and
down = Σ_r^½ V_rᵀ L⁻¹. This is the "activation-centric" (Mode II) family: it exploits the low-rank
geometry of the inputs, not of the weights. Whitening alone is the paper's "SVD-LLM (W)".

Update (`update=`), run by `plan.apply` because it depends on the ratio:
- "lora" (default): the paper's "parameter update with sequential low-rank approximation", the
  reference pipeline of `compress_llama.sh` / README step 2 (`utils/LoRA.py`): LoRA fine-tuning of
  every up factor U with the down factors V frozen, merged, then of every V with U frozen, merged.
  Budget per phase: the reference's (r=8, alpha 16, 2 epochs, batch 64, lr 1e-4 as in its README,
  the configuration borrowed from LLM-Pruner, see `prune.structured.recovery`; `compress_llama.sh`
  runs 3 epochs), trained on the calibration windows
  because Alpaca-cleaned, the reference's data, is not available offline: with 16 windows that is
  2 steps per phase. `update_steps` / `update_batch_size` / `update_lr` / `update_seqlen` set a
  reduced or larger budget explicitly (CPU runs state theirs in the profile).
- "closed_form": the first version of the paper (arXiv:2403.07378v1) and `SVDLLM.py --step 2`
  (`whitening_local_update`): block by block, the inputs of each block come from the already
  compressed blocks before it, and U is re-fitted by least squares to the dense layer's outputs on
  those inputs with V kept; computed from the Gram matrix of the shifted inputs, so it is exact and
  costs one calibration pass per ratio.
- "none": whitening only, "SVD-LLM (W)".

`sequential=True` is not in the reference: every block is whitened with the Gram matrix of inputs that
already went through the compressed blocks 0..i−1, which re-fits U and V together on the shifted
inputs (so it subsumes "closed_form"). It is ratio-specific, so each ratio costs a pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from mpt_utils.calibration import LayerStats, collect_stats, decoder_layers, layerwise
from mpt_utils.errors import MPTError
from mpt_utils.lowrank import LOWRANK
from mpt_utils.lowrank.factorized import (
    Factorization,
    LowRankLinear,
    LowRankPlan,
    LowRankReport,
    apply_ranks,
    count_params,
    get_module,
    layer_reduction,
    set_module,
    target_linears,
)
from mpt_utils.lowrank.ranks import uniform_ranks
from mpt_utils.lowrank.svd import scaled_svd
from mpt_utils.progress import progress_bar

UPDATES = ("lora", "closed_form", "none")


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
                 damp: float = 1e-6, keep: int | None = None) -> Factorization:
    """Truncation-aware factorization of `linear` through the Cholesky factor of its input Gram matrix."""
    if stats.n == 0:
        raise MPTError("no calibration rows reached this layer", "check the calibration windows")
    lower, _ = whitening(stats.gram.to(device) if device is not None else stats.gram, damp)
    return scaled_svd(linear.weight, linear.bias, lower=lower, keep=keep, device=device)


@torch.no_grad()
def refit_up(weight: torch.Tensor, down: torch.Tensor, gram: torch.Tensor, damp: float = 1e-10) -> torch.Tensor:
    """Least-squares U for a fixed V (`down`, [r, in]): argmin_U ‖X·Wᵀ − X·Vᵀ·Uᵀ‖ with XᵀX = `gram`,
    i.e. U = W·G·Vᵀ·(V·G·Vᵀ)⁻¹ (float64; a `damp`·mean(diag) ridge keeps the r×r system solvable)."""
    w, v, g = (t.detach().to(torch.float64) for t in (weight, down, gram.to(weight.device)))
    gv = g @ v.T
    a = v @ gv
    a = a + damp * torch.diagonal(a).mean().clamp_min(1e-300) * torch.eye(a.shape[0], dtype=a.dtype,
                                                                           device=a.device)
    return torch.linalg.solve(a, (w @ gv).T).T


def _check_update(update: str, steps: int | None, batch_size: int, lr: float, seqlen: int | None) -> None:
    if update not in UPDATES:
        raise MPTError(f"unknown SVD-LLM update {update!r}", f"use one of {UPDATES} (the reference: 'lora')")
    if (steps is not None and steps < 1) or batch_size < 1 or lr <= 0 or (seqlen is not None and seqlen < 2):
        raise MPTError(f"invalid SVD-LLM update budget (update_steps={steps}, update_batch_size={batch_size}, "
                       f"update_lr={lr}, update_seqlen={seqlen})",
                       "use update_steps >= 1 (None: 2 epochs), update_batch_size >= 1, update_lr > 0")


@LOWRANK.register("svd_llm", version=2, display="SVD-LLM", calibration=True, mode="II",
                  sources=("mpt_utils.prune.structured.recovery",))
def plan_svd_llm(model: nn.Module, calib_ids: torch.Tensor | None = None, *,
                 stats: dict[str, LayerStats] | None = None, device: str | torch.device | None = None,
                 layer_filter: Callable[[str], bool] | None = None, progress: bool = True,
                 update: str = "lora", update_steps: int | None = None, update_batch_size: int = 64,
                 update_lr: float = 1e-4, update_seqlen: int | None = None, sequential: bool = False,
                 damp: float = 1e-6) -> LowRankPlan:
    """SVD-LLM. Whitening uses the dense model's Gram matrices (`stats` from `collect_stats`, else
    gathered from `calib_ids`); `update` picks the parameter-update stage (module docstring; the
    default "lora" is the reference's, "none" is whitening only). The update runs at `plan.apply`
    on `calib_ids`, so "lora" and "closed_form" need them. `sequential=True`: whiten each block with
    the Gram matrices of the compressed model's inputs (not in the reference)."""
    from mpt_utils.models import pick_device

    _check_update(update, update_steps, update_batch_size, update_lr, update_seqlen)
    if update != "none" and calib_ids is None:
        raise MPTError(f"the SVD-LLM update {update!r} trains on calibration windows", "pass calib_ids")
    if sequential and update == "closed_form":
        raise MPTError("sequential=True already re-fits both factors on the compressed model's inputs",
                       "use update='closed_form' with sequential=False (the reference), or update='none'")
    dev = pick_device(device)
    budget = {"steps": update_steps, "batch_size": update_batch_size, "lr": update_lr, "seqlen": update_seqlen}
    if sequential:
        if calib_ids is None:
            raise MPTError("sequential SVD-LLM needs calibration windows", "pass calib_ids")
        return SequentialSVDLLM(model, calib_ids, dev, layer_filter, progress, damp, update, budget)
    if stats is None:
        if calib_ids is None:
            raise MPTError("SVD-LLM needs calibration data", "pass calib_ids or stats from collect_stats")
        stats = collect_stats(model, calib_ids, device=dev, layer_filter=layer_filter, progress=progress)
    linears = target_linears(model, layer_filter)
    missing = [n for n in linears if n not in stats]
    if missing:
        raise MPTError(f"no calibration statistics for {missing[0]}", "collect stats on the same model")
    facts = {n: whitened_svd(lin, stats[n], dev, damp)
             for n, lin in progress_bar(linears.items(), desc="svd_llm SVDs", disable=not progress, leave=False)}
    shapes = {n: (lin.out_features, lin.in_features) for n, lin in linears.items()}
    return SVDLLMPlan(facts, lambda ratio: uniform_ranks(shapes, ratio), calib_ids, dev, layer_filter, progress,
                      update, budget)


def _block_prefixes(model: nn.Module) -> dict[int, str]:
    blocks = {id(b) for b in decoder_layers(model)}
    return {id(b): n for n, b in model.named_modules() if id(b) in blocks}


class _RatioCache:
    """The factors of the last ratio applied, kept on the CPU: the sweep applies one ratio several
    times in a row (one point per corpus, the speed twin), and the update would be recomputed each
    time for the same result."""

    _last: tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None

    def _remember(self, model: nn.Module, report: LowRankReport) -> None:
        kept = {}
        for layer in report.layers:
            if layer.rank > 0:
                mod = get_module(model, layer.name)
                kept[layer.name] = (mod.up.weight.detach().cpu().clone(), mod.down.weight.detach().cpu().clone())
        self._last = (report.ratio, kept)

    def _recall(self, model: nn.Module, ratio: float, names: list[str]) -> LowRankReport | None:
        if self._last is None or self._last[0] != ratio:
            return None
        before = count_params(model)
        originals: dict[str, nn.Module] = {}
        for name, (up, down) in self._last[1].items():
            old = get_module(model, name)
            dev = old.weight.device
            new = LowRankLinear.from_factors(up.to(dev), down.to(dev), old.bias, dtype=old.weight.dtype)
            originals[name] = set_module(model, name, new)
        layers = [layer_reduction(n, get_module(model, n)) for n in names]
        return LowRankReport("svd_llm", ratio, layers, before, count_params(model), 0.0, originals)


def lora_update(model: nn.Module, names: list[str], calib_ids: torch.Tensor, budget: dict,
                device: torch.device | str | None = None, progress: bool = True) -> dict:
    """The reference's sequential low-rank approximation: LoRA on every U (`up`) of the factorized
    linears `names` with V frozen, merged; then on every V (`down`) with U frozen, merged."""
    from mpt_utils.prune.structured.recovery import train_lora

    ids = calib_ids[:, : budget["seqlen"]] if budget.get("seqlen") else calib_ids
    kw = {"steps": budget.get("steps"), "batch_size": budget.get("batch_size", 64), "lr": budget.get("lr", 1e-4),
          "device": device, "progress": progress}
    first = train_lora(model, ids, [f"{n}.up" for n in names], seed=0, desc="SVD-LLM update of U", **kw)
    second = train_lora(model, ids, [f"{n}.down" for n in names], seed=1, desc="SVD-LLM update of V", **kw)
    return {"update": "lora", "steps_per_phase": first["steps"], "batch_size": first["batch_size"],
            "lr": first["lr"], "seqlen": first["seqlen"], "loss_u_first": first["loss_first"],
            "loss_u_last": first["loss_last"], "loss_v_first": second["loss_first"],
            "loss_v_last": second["loss_last"], "seconds": first["seconds"] + second["seconds"]}


class SVDLLMPlan(_RatioCache, LowRankPlan):
    """Whitened factors of the dense model, computed once; `apply` adds the ratio-specific update."""

    def __init__(self, facts: dict[str, Factorization], allocate: Callable[[float], dict[str, int]],
                 calib_ids: torch.Tensor | None, device: torch.device, layer_filter, progress: bool, update: str,
                 budget: dict):
        super().__init__("svd_llm", facts, allocate, {"calibration": True, "sequential": False, "update": update,
                                                      "update_log": {}})
        self.calib_ids, self.device, self.layer_filter = calib_ids, device, layer_filter
        self.progress, self.update, self.budget = progress, update, budget

    def apply(self, model: nn.Module, ratio: float) -> LowRankReport:
        start = time.perf_counter()
        if self.update == "none":
            return super().apply(model, ratio)
        report = self._recall(model, ratio, list(self.factorizations))
        if report is None:
            if self.update == "closed_form":
                report = self._closed_form(model, ratio)
            else:
                report = super().apply(model, ratio)
                if report.n_factorized:
                    names = [layer.name for layer in report.layers if layer.rank > 0]
                    self.info["update_log"][ratio] = lora_update(model, names, self.calib_ids, self.budget,
                                                                 self.device, self.progress)
            self._remember(model, report)
        report.seconds = time.perf_counter() - start
        return report

    def _closed_form(self, model: nn.Module, ratio: float) -> LowRankReport:
        """SVDLLM.py --step 2: V from the dense whitening, U re-fitted on the compressed prefix's inputs."""
        ranks = self.ranks(ratio)
        if not any(r > 0 for r in ranks.values()):
            return super().apply(model, ratio)
        before = count_params(model)
        prefix = _block_prefixes(model)
        home = next(model.parameters()).device  # the dense layers wait there, not on the accelerator
        originals: dict[str, nn.Module] = {}

        def on_block(_i: int, block: nn.Module, stats: dict[str, LayerStats]) -> None:
            for name, st in stats.items():  # inputs of the still-dense block, fed by compressed blocks
                full = f"{prefix[id(block)]}.{name}"
                if ranks.get(full, 0) <= 0:
                    continue
                lin = get_module(block, name)
                fact = self.factorizations[full]
                _, down = fact.factors(ranks[full])
                up = refit_up(lin.weight, down.to(st.gram.device), st.gram)
                new = LowRankLinear.from_factors(up.to(lin.weight.device), down.to(lin.weight.device), fact.bias,
                                                 dtype=lin.weight.dtype)
                originals[full] = set_module(block, name, new).to(home)

        layerwise(model, self.calib_ids, on_block, sequential=True, device=self.device,
                  layer_filter=self.layer_filter, progress=self.progress, desc="svd_llm closed-form update")
        layers = [layer_reduction(n, get_module(model, n)) for n in self.factorizations]
        return LowRankReport(self.method, ratio, layers, before, count_params(model), 0.0, originals)


class SequentialSVDLLM(_RatioCache, LowRankPlan):
    """SVD-LLM whitened on the compressed model's inputs; the factors depend on the ratio, so nothing
    is cached. The LoRA update, when asked for, follows as in `SVDLLMPlan`."""

    def __init__(self, model: nn.Module, calib_ids: torch.Tensor, device: torch.device, layer_filter,
                 progress: bool, damp: float, update: str = "none", budget: dict | None = None):
        linears = target_linears(model, layer_filter)
        self._shapes = {n: (lin.out_features, lin.in_features) for n, lin in linears.items()}
        super().__init__("svd_llm", {}, lambda ratio: uniform_ranks(self._shapes, ratio),
                         {"calibration": True, "sequential": True, "update": update, "update_log": {}})
        self.calib_ids, self.device, self.layer_filter = calib_ids, device, layer_filter
        self.progress, self.damp, self.update, self.budget = progress, damp, update, budget or {}

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self._shapes)

    def apply(self, model: nn.Module, ratio: float) -> LowRankReport:
        start = time.perf_counter()
        report = self._recall(model, ratio, list(self._shapes))
        if report is None:
            report = self._compute(model, ratio)
            self._remember(model, report)
        report.seconds = time.perf_counter() - start
        return report

    def _compute(self, model: nn.Module, ratio: float) -> LowRankReport:
        before = count_params(model)
        ranks = self.ranks(ratio)
        prefix = _block_prefixes(model)
        home = next(model.parameters()).device
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
            originals.update({f"{prefix[id(block)]}.{n}": m.to(home) for n, m in done.originals.items()})

        if any(r > 0 for r in ranks.values()):
            layerwise(model, self.calib_ids, on_block, sequential=True, device=self.device,
                      layer_filter=self.layer_filter, progress=self.progress, desc="svd_llm sequential")
        layers = [layer_reduction(n, get_module(model, n)) for n in self._shapes]
        report = LowRankReport(self.method, ratio, layers, before, count_params(model), 0.0, originals)
        if self.update == "lora" and report.n_factorized:
            names = [layer.name for layer in layers if layer.rank > 0]
            self.info["update_log"][ratio] = lora_update(model, names, self.calib_ids, self.budget, self.device,
                                                         self.progress)
        return report
