"""Paper-style figures shared by the notebooks: compression curves, eq. 5 fits, a star at each PTP."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from mpt_utils.ptp import PTPFit


def set_paper_style(context: str = "paper", font_scale: float = 1.1) -> None:
    """One look for every notebook: white grid, readable fonts, no top/right spines."""
    sns.set_theme(context=context, style="whitegrid", font_scale=font_scale,
                  rc={"axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False,
                      "figure.dpi": 110, "savefig.dpi": 150, "savefig.bbox": "tight"})


def _finite(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y) & (y > 0)
    return x[keep], y[keep]


def plot_ptp_curves(ax: plt.Axes, curves: Iterable[tuple[str, Sequence[float], Sequence[float]]],
                    fits: Mapping[str, PTPFit] | None = None, *, logy: bool = True,
                    palette: str | Sequence | None = None, title: str | None = None,
                    xlabel: str | None = None, ylabel: str = "perplexity", legend: bool = True,
                    invert_bits: bool = True) -> plt.Axes:
    """Scatter each (label, x, y) curve, draw its fit, star its PTP (only where a PTP was found).

    x is on the curve's own axis (sparsity, or bits for a bit-axis fit). A solid line is eq. 5 with a
    PTP; a dashed line is the simple law that won instead. Bit axes run from many bits to few, so
    compression grows to the right as on the sparsity axes.
    """
    curves = list(curves)
    fits = fits or {}
    colors = sns.color_palette(palette, n_colors=max(len(curves), 1))
    bit_axis = False
    for color, (label, x, y) in zip(colors, curves):
        xs, ys = _finite(x, y)
        ax.scatter(xs, ys, color=color, s=18, zorder=3)
        fit = fits.get(label)
        if fit is None or fit.model == "none":
            ax.plot([], [], color=color, label=label)
            continue
        bit_axis |= fit.axis == "bits"
        cx, cy = fit.curve(native=True)
        ax.plot(cx, cy, color=color, lw=1.4, ls="-" if fit.has_ptp else "--",
                label=label + ("" if fit.has_ptp else " (no PTP)"))
        if fit.has_ptp:
            ax.scatter(fit.to_native(fit.s0), fit.predict(fit.s0), marker="*", s=160, color=color,
                       edgecolor="black", linewidth=0.6, zorder=4)
    if logy:
        ax.set_yscale("log")
    if bit_axis and invert_bits and not ax.xaxis_inverted():
        ax.invert_xaxis()
    ax.set(xlabel=xlabel or ("bits per weight" if bit_axis else "compression ratio (sparsity)"), ylabel=ylabel)
    if title:
        ax.set_title(title)
    if legend and curves:
        ax.legend(fontsize="x-small", ncol=1 if len(curves) < 8 else 2)
    return ax


def save_figure(fig: plt.Figure, figures_dir: str | os.PathLike, name: str) -> Path:
    """Write `name`.png into figures_dir (created if needed) and return the path."""
    out = Path(figures_dir) / (name if name.endswith(".png") else f"{name}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150, bbox_inches="tight")
    return out
