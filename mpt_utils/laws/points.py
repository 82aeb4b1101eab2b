"""Tidy law points from the sweep's rows: one row per (model, method, metric kind, corpus or task,
ratio, D) with the dense value L0 of the same model and corpus/task beside it.

  intrinsic   L = test cross-entropy (nats/token) on a corpus; L0 = the dense model's on that corpus
  extrinsic   L = accuracy on a downstream task (lm-eval `acc`); L0 = the dense model's on that task

Dense points define L0 and are not law points themselves. RFT points carry the tokens actually
trained on as D; points without recovery have D = 0.
"""

from __future__ import annotations

import pandas as pd

from mpt_utils.errors import MPTError

KINDS = ("intrinsic", "extrinsic")
COLUMNS = ["model", "method", "kind", "item", "ratio", "tokens", "value", "L0", "chance", "param_reduction"]


def _select(rows: pd.DataFrame, kind: str) -> pd.DataFrame:
    if kind not in KINDS:
        raise MPTError(f"unknown law kind {kind!r}", f"use one of {KINDS}")
    want, metric, item = ("ce", "ce", "data") if kind == "intrinsic" else ("downstream", "acc", "task")
    out = rows[(rows["kind"] == want) & (rows["metric"] == metric)].copy()
    out["item"] = out[item] if item in out else None
    if "chance" not in out or kind == "intrinsic":
        out["chance"] = float("nan")
    return out


def law_points(rows: pd.DataFrame, kinds: tuple[str, ...] = KINDS) -> pd.DataFrame:
    """The law's points (columns `COLUMNS`) from `law_sweep`'s rows."""
    if rows.empty:
        return pd.DataFrame(columns=COLUMNS)
    frames = []
    for kind in kinds:
        sel = _select(rows, kind)
        if sel.empty:
            continue
        dense = sel[sel["method"] == "dense"].groupby(["model", "item"])["value"].first().rename("L0")
        comp = sel[sel["method"] != "dense"].join(dense, on=["model", "item"])
        comp["kind"] = kind
        comp["tokens"] = comp["tokens"].fillna(0).astype(int)
        frames.append(comp.reindex(columns=COLUMNS))
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    out = pd.concat(frames, ignore_index=True)
    return out.sort_values(["kind", "method", "model", "item", "tokens", "ratio"]).reset_index(drop=True)


def curves(points: pd.DataFrame, kind: str, tokens: int = 0, with_dense: bool = True) -> pd.DataFrame:
    """Metric-vs-ratio curves of one kind at one RFT budget, each starting at r = 0 (the dense L0)."""
    sel = points[(points["kind"] == kind) & (points["tokens"] == tokens)]
    if with_dense and not sel.empty:
        dense = sel.groupby(["model", "method", "kind", "item"], as_index=False)["L0"].first()
        dense["value"], dense["ratio"], dense["tokens"] = dense["L0"], 0.0, tokens
        sel = pd.concat([dense, sel], ignore_index=True)
    return sel.sort_values(["model", "method", "item", "ratio"]).reset_index(drop=True)
