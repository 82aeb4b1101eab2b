"""Causal activation patching between a dense model and a compressed copy of it.

restore: the compressed model runs with the dense output of one block's attention or MLP put back
(forward hook replacing the module's output), which measures how much of the lost answer
probability that one module accounts for. inject: the reverse, the compressed module's output put
into the dense model, which measures how much damage that module causes on its own.

Both directions re-run only the blocks from the patched one on (`runner.run_from`). Recovery is a
ratio of means over the prompts, (p̄_patched − p̄_comp) / (p̄_dense − p̄_comp), which stays finite
when single prompts have no gap; the KL version, 1 − KL(dense ‖ patched) / KL(dense ‖ comp), does
not need the model to know the answer at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pandas as pd
import torch
from torch import nn

from mpt_utils.calibration import decoder_layers
from mpt_utils.diagnostics.metrics import answer_prob, kl_recovery, kl_to, normalized_recovery
from mpt_utils.diagnostics.prompts import PromptBatch
from mpt_utils.diagnostics.runner import PARTS, Site, Trace, run_from, trace
from mpt_utils.errors import MPTError

DIRECTIONS = ("restore", "inject")


def patch_run(target: nn.Module, target_trace: Trace, source_trace: Trace, batch: PromptBatch,
              sites: Iterable[Site]) -> torch.Tensor:
    """Answer logits of `target` with the outputs of `sites` taken from `source_trace`."""
    sites = list(sites)
    if not sites:
        return target_trace.logits
    start = min(layer for layer, _ in sites)
    patches = {s: source_trace.parts[s] for s in sites}
    return run_from(target, batch, start, target_trace.block_inputs[start] if start else None, patches)


def _sites(model: nn.Module, layers: Sequence[int] | None, parts: Sequence[str]) -> list[Site]:
    n = len(decoder_layers(model))
    layers = range(n) if layers is None else layers
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise MPTError(f"unknown block part(s) {bad}", f"use {PARTS}")
    return [(int(i), p) for i in layers for p in parts]


def _stats(logits: torch.Tensor, td: Trace, batch: PromptBatch) -> tuple[float, float]:
    return float(answer_prob(logits, batch.answer_ids).mean()), float(kl_to(td.logits, logits).mean())


def activation_patching(dense: nn.Module, compressed: nn.Module, batch: PromptBatch, direction: str = "restore",
                        *, layers: Sequence[int] | None = None, parts: Sequence[str] = PARTS,
                        traces: tuple[Trace, Trace] | None = None) -> pd.DataFrame:
    """One row per (layer, part). direction="restore": dense output patched into the compressed
    model, columns `recovery` / `kl_recovery` (1 = dense behaviour back). direction="inject":
    compressed output patched into the dense model, columns `damage_share` / `kl_damage_share`
    (1 = this module alone does all the damage of the compressed model)."""
    if direction not in DIRECTIONS:
        raise MPTError(f"unknown patching direction {direction!r}", f"use one of {DIRECTIONS}")
    td, tc = traces or (trace(dense, batch), trace(compressed, batch))
    p_dense, _ = _stats(td.logits, td, batch)
    p_comp, kl_comp = _stats(tc.logits, td, batch)
    target, t_trace, s_trace = (compressed, tc, td) if direction == "restore" else (dense, td, tc)
    rows = []
    for site in _sites(dense, layers, parts):
        p, kl = _stats(patch_run(target, t_trace, s_trace, batch, [site]), td, batch)
        row = {"direction": direction, "layer": site[0], "part": site[1], "answer_prob": p, "kl_to_dense": kl}
        if direction == "restore":
            row.update(recovery=normalized_recovery(p, p_comp, p_dense), kl_recovery=kl_recovery(kl, kl_comp))
        else:
            row.update(damage_share=normalized_recovery(p, p_dense, p_comp),
                       kl_damage_share=kl / kl_comp if kl_comp > 1e-9 else float("nan"))
        rows.append(row)
    return pd.DataFrame(rows)


def restore_sites(dense: nn.Module, compressed: nn.Module, batch: PromptBatch, sites: Iterable[Site],
                  traces: tuple[Trace, Trace] | None = None) -> dict:
    """Restore several modules at once in the compressed model: answer prob, KL and both recoveries."""
    td, tc = traces or (trace(dense, batch), trace(compressed, batch))
    sites = sorted(set(sites))
    p_dense, _ = _stats(td.logits, td, batch)
    p_comp, kl_comp = _stats(tc.logits, td, batch)
    p, kl = _stats(patch_run(compressed, tc, td, batch, sites), td, batch)
    return {"sites": ",".join(f"{layer}.{part}" for layer, part in sites), "n_sites": len(sites),
            "answer_prob": p, "kl_to_dense": kl, "recovery": normalized_recovery(p, p_comp, p_dense),
            "kl_recovery": kl_recovery(kl, kl_comp)}


def top_sites(restore: pd.DataFrame, k: int, by: str = "kl_recovery") -> list[Site]:
    """The k (layer, part) sites whose single restoration recovers the most."""
    best = restore.dropna(subset=[by]).sort_values(by, ascending=False).head(k)
    return [(int(r.layer), str(r.part)) for r in best.itertuples()]


def heatmap_frame(df: pd.DataFrame, value: str = "recovery") -> pd.DataFrame:
    """layer × part table of one patching column, for a heat map."""
    return df.pivot_table(index="layer", columns="part", values=value, aggfunc="first")
