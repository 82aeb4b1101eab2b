"""Pruning speed, side by side in one run on the same model and calibration windows:
- an 8-point sparsity sweep with reuse (dense statistics collected once, SparseGPT's inverse-Hessian
  factors cached per layer) against 8 independent runs that each gather their own statistics
  (one-shot from dense in both cases, so the pruned weights are identical: checked);
- one sequential SparseGPT pass against one sequential Wanda pass (the published protocol).
Only pruning is timed (no evaluation). Ratios are printed and stored (family="bench").
"""

from __future__ import annotations

import time

import torch

from mpt_utils.calibration import collect_stats
from mpt_utils.data import calibration_windows
from mpt_utils.models import load_model
from mpt_utils.prune import prune_model
from mpt_utils.prune.measure import block_linears
from mpt_utils.reproduce import load_profile
from mpt_utils.store import ResultsStore

SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
# calibration per profile: the embedded bench uses fewer, shorter windows to stay a few minutes long
CALIB = {"embedded": (8, 256)}


def _snapshot(model) -> list[dict[str, torch.Tensor]]:
    return [{n: lin.weight.detach().clone() for n, lin in linears.items()} for linears in block_linears(model)]


@torch.no_grad()
def _restore(model, dense) -> None:
    for linears, saved in zip(block_linears(model), dense):
        for n, lin in linears.items():
            lin.weight.copy_(saved[n])


def _checksum(model) -> float:
    return float(sum(lin.weight.double().abs().sum() for linears in block_linears(model) for lin in linears.values()))


def _sweep(model, dense, method: str, calib, device, reuse: bool) -> tuple[float, list[float]]:
    start = time.perf_counter()
    sums = []
    stats = collect_stats(model, calib, device=device, progress=False) if reuse else None
    cache: dict = {}
    for s in SPARSITIES:
        _restore(model, dense)
        if reuse:
            prune_model(model, method, s, stats=stats, cache=cache)
        else:
            prune_model(model, method, s, calib_ids=calib, sequential=False, device=device)
        sums.append(_checksum(model))
    return time.perf_counter() - start, sums


def main(profile: str, store: ResultsStore) -> None:
    common = load_profile(profile)["common"]
    model_name, device = common["model"], common.get("device")
    n_calib, seqlen = CALIB.get(profile, (common["n_calib"], common["seqlen"]))
    cfg = {"model": model_name, "method": "pruning_speed", "family": "bench", "ratio": None, "bits": None,
           "seed": common.get("seed", 0), "calib_data": common["calib_data"], "n_calib": n_calib,
           "seqlen": seqlen, "sparsities": list(SPARSITIES), "device": device}

    def compute():
        loaded = load_model(model_name, device=device)
        model = loaded.model
        calib = calibration_windows(loaded.tokenizer, common["calib_data"], n_calib, seqlen, cfg["seed"])
        dense = _snapshot(model)
        rows = []
        for method in ("wanda", "sparsegpt"):
            t_reuse, sums_reuse = _sweep(model, dense, method, calib, device, reuse=True)
            t_indep, sums_indep = _sweep(model, dense, method, calib, device, reuse=False)
            same = all(abs(a - b) <= 1e-6 * max(abs(a), 1.0) for a, b in zip(sums_reuse, sums_indep))
            rows.append({"metric": "sweep_speedup", "value": t_indep / t_reuse, "prune_method": method,
                         "seconds_reuse": t_reuse, "seconds_independent": t_indep, "n_points": len(SPARSITIES),
                         "same_weights": same})
        times = {}
        for method in ("wanda", "sparsegpt", "wanda", "sparsegpt"):  # interleaved: load changes hit both
            _restore(model, dense)
            report = prune_model(model, method, 0.5, calib_ids=calib, sequential=True, device=device)
            times.setdefault(method, []).append(report.seconds)
        wanda, sgpt = min(times["wanda"]), min(times["sparsegpt"])
        rows.append({"metric": "sparsegpt_over_wanda", "value": sgpt / wanda, "seconds_sparsegpt": sgpt,
                     "seconds_wanda": wanda, "sparsity": 0.5, "mode": "sequential"})
        _restore(model, dense)
        return rows

    for row in store.get_or_compute(cfg, compute):
        if row["metric"] == "sweep_speedup":
            print(f"  {row['prune_method']:9s} 8-point sweep: reuse {row['seconds_reuse']:.1f} s vs independent "
                  f"{row['seconds_independent']:.1f} s -> x{row['value']:.2f} (identical weights: {row['same_weights']})")
        else:
            print(f"  one sequential pass at 0.5: SparseGPT {row['seconds_sparsegpt']:.1f} s vs Wanda "
                  f"{row['seconds_wanda']:.1f} s -> SparseGPT/Wanda = {row['value']:.2f}")
