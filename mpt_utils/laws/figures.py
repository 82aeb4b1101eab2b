"""Figures of the compression-law notebook (matplotlib; the notebook saves them with
`mpt_utils.plots.save_figure`)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from mpt_utils.catalogue import load_all
from mpt_utils.laws.points import curves
from mpt_utils.laws.shape import _fit_shape, predict_shape
from mpt_utils.laws.sweep import METHODS

YLABEL = {"intrinsic": "test cross-entropy (nats/token)", "extrinsic": "accuracy"}


def title(method: str) -> str:
    """A panel's title: the method's display name and whether it calibrates (the grid's contrast)."""
    info = load_all().get(method)
    return method if info is None else f"{info.display} (calibration-{'based' if info.calibration else 'free'})"


def fig_curves(points: pd.DataFrame, kind: str, shape: str | None = None) -> plt.Figure:
    """Metric vs ratio per method (panels), one line per model × corpus/task, without RFT (solid) and
    at the largest RFT budget (dashed); `shape` overlays that fitted shape on the no-RFT points."""
    methods = [m for m in METHODS if m in set(points["method"])]
    fig, axes = plt.subplots(1, max(1, len(methods)), figsize=(5.2 * max(1, len(methods)), 3.8), squeeze=False)
    sel = points[points["kind"] == kind]
    d_max = int(sel["tokens"].max()) if not sel.empty else 0
    for ax, method in zip(axes[0], methods):
        base = curves(sel[sel["method"] == method], kind, 0)
        rft = curves(sel[sel["method"] == method], kind, d_max) if d_max else pd.DataFrame()
        for i, ((model, item), grp) in enumerate(base.groupby(["model", "item"])):
            color = f"C{i % 10}"
            ax.plot(grp["ratio"], grp["value"], "o-", color=color, ms=4, lw=1.2, label=f"{model} · {item}")
            if shape is not None and grp["ratio"].nunique() >= 4:
                coef, _ = _fit_shape(shape, grp["ratio"].to_numpy(float), grp["value"].to_numpy(float))
                grid = np.linspace(0, grp["ratio"].max(), 100)
                ax.plot(grid, predict_shape(shape, coef, grid), ":", color=color, lw=1)
            if not rft.empty:
                g2 = rft[(rft["model"] == model) & (rft["item"] == item)]
                ax.plot(g2["ratio"], g2["value"], "s--", color=color, ms=3, lw=1)
        if kind == "extrinsic" and "chance" in sel and sel["chance"].notna().any():
            ax.axhline(float(sel["chance"].dropna().mean()), color="grey", lw=0.8, ls="-.", label="chance")
        ax.set_title(title(method), fontsize=10)
        ax.set_xlabel("compression ratio r")
        ax.set_ylabel(YLABEL[kind])
    axes[0][0].legend(fontsize=6, loc="best")
    note = f"solid: no RFT; dashed: LoRA RFT on D={d_max:,} tokens" + (f"; dotted: {shape} fit" if shape else "")
    fig.suptitle(note, fontsize=8, y=1.0)
    fig.tight_layout()
    return fig


def fig_law(points: pd.DataFrame, fits: dict) -> plt.Figure:
    """Observed vs law-predicted L for every fit (log axes), coloured by RFT budget."""
    keys = list(fits)
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(3.6 * max(1, len(keys)), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        method, kind = key
        fit = fits[key]
        sel = points[(points["method"] == method) & (points["kind"] == kind) & (points["value"] > 0)]
        pred = fit.predict(sel["L0"], sel["ratio"], sel["tokens"])
        for j, (d, grp) in enumerate(sel.groupby("tokens")):
            mask = sel["tokens"].to_numpy() == d
            ax.scatter(grp["value"], pred[mask], s=12, color=f"C{j}", label=f"D={d:,}")
        lo = float(min(sel["value"].min(), pred.min()))
        hi = float(max(sel["value"].max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{method} · {kind}\nα={fit.coef['alpha']:.2f} β={fit.coef['beta']:.2f} "
                     f"γ={fit.coef['gamma']:.2f}  R²={fit.r2:.2f}", fontsize=8)
        ax.set_xlabel("measured")
        ax.set_ylabel("law")
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def fig_rft(points: pd.DataFrame) -> plt.Figure:
    """Cross-entropy vs RFT budget D (log axis; D = 0 drawn at the left edge) per method and ratio."""
    sel = points[points["kind"] == "intrinsic"]
    rft_keys = sel[sel["tokens"] > 0][["model", "method", "item", "ratio"]].drop_duplicates()
    methods = sorted(rft_keys["method"].unique())
    fig, axes = plt.subplots(1, max(1, len(methods)), figsize=(5 * max(1, len(methods)), 3.6), squeeze=False)
    for ax, method in zip(axes[0], methods):
        keys = rft_keys[rft_keys["method"] == method]
        d_pos = sorted(sel.loc[sel["tokens"] > 0, "tokens"].unique())
        left = d_pos[0] / 10 if d_pos else 1
        for i, k in enumerate(keys.itertuples(index=False)):
            g = sel[(sel["model"] == k.model) & (sel["method"] == method) & (sel["item"] == k.item)
                    & (sel["ratio"] == k.ratio)].sort_values("tokens")
            x = g["tokens"].replace(0, left)
            ax.plot(x, g["value"], "o-", ms=3, lw=1, color=f"C{i % 10}", label=f"{k.model} {k.item} r={k.ratio:g}")
            ax.axhline(g["L0"].iloc[0], color=f"C{i % 10}", lw=0.5, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("RFT tokens D (leftmost: none)")
        ax.set_ylabel(YLABEL["intrinsic"])
        ax.set_title(title(method), fontsize=10)
        ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    return fig


def fig_speed(speed: pd.DataFrame) -> plt.Figure:
    """Prefill speed-up over the dense model vs ratio (one timed run per model and method)."""
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    for i, ((model, method), grp) in enumerate(speed.groupby(["model", "method"])):
        grp = grp.sort_values("ratio")
        ax.plot(grp["ratio"], grp["value"], "o-", color=f"C{i}", label=f"{model} · {method}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("compression ratio r")
    ax.set_ylabel("speed-up vs dense (prefill tokens/s)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
