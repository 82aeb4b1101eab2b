"""Paper-style figures shared by the notebooks: compression curves, eq. 5 fits, a star at each PTP.

A collapsed point (PPL inf, NaN or an overflow, see `mpt_utils.ptp.collapsed`) cannot sit on a log
axis, yet it is the clearest sign of a transition: the helpers here draw it as an upward triangle at
the top edge of the axes (legend "collapsed (PPL = inf)") instead of failing or dropping it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D

from mpt_utils.display import set_table_display
from mpt_utils.ptp import COLLAPSE_PPL, NearLossless, PTPFit, collapsed

COLLAPSED_LABEL = "collapsed (PPL = inf)"
LIMIT_LABEL = "near-lossless limit"  # legend entry of the limit markers (the PTP keeps its star)
LIMIT_MARKER = "D"
COLLAPSED_Y = 0.97  # height of the collapse markers, as a fraction of the axes (the top edge)
HEADROOM = 3.0  # with collapsed points, the y axis ends this × above the largest finite value (log)


def set_paper_style(context: str = "paper", font_scale: float = 1.1) -> None:
    """One look for every notebook: white grid, readable fonts, no top/right spines; tables print
    their numbers for reading (`mpt_utils.display.set_table_display`)."""
    set_table_display()
    sns.set_theme(context=context, style="whitegrid", font_scale=font_scale,
                  rc={"axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False,
                      "figure.dpi": 110, "savefig.dpi": 150, "savefig.bbox": "tight"})


def split_collapsed(x, y, collapse_ppl: float = COLLAPSE_PPL
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y) of the points that can be drawn, and the x of the collapsed ones (y inf, NaN or
    ≥ `collapse_ppl`). Points without a finite x, or with y ≤ 0 (nowhere on a log axis), are left out."""
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    gone = collapsed(y, collapse_ppl)
    with np.errstate(invalid="ignore"):
        keep = np.isfinite(x) & ~gone & (y > 0)
    return x[keep], y[keep], x[np.isfinite(x) & gone]


def drawable(y, collapse_ppl: float = COLLAPSE_PPL) -> np.ndarray:
    """`y` with collapsed values as NaN, which matplotlib and seaborn skip: an overflow such as 1e30
    would otherwise stretch a log axis by decades. Mark what was removed with `mark_collapsed`."""
    y = np.asarray(y, dtype=float)
    return np.where(collapsed(y, collapse_ppl), np.nan, y)


def mark_collapsed(ax: plt.Axes, x, y=None, color=None, size: float = 7.0,
                   collapse_ppl: float = COLLAPSE_PPL) -> None:
    """Upward triangles at the top edge of `ax` at abscissae `x` (only those whose `y` collapsed,
    when `y` is given), where a curve collapsed.

    The height is in axes coordinates, so the markers stay at the top whatever the y limits (and
    whatever the y scale); the legend gets one neutral "collapsed (PPL = inf)" entry per axes."""
    x = np.asarray(x, dtype=float).ravel()
    if y is not None:
        x = x[collapsed(np.asarray(y, dtype=float).ravel(), collapse_ppl)]
    x = x[np.isfinite(x)]
    if x.size == 0:
        return
    ax.plot(x, np.full(x.size, COLLAPSED_Y), transform=ax.get_xaxis_transform(), ls="none", marker="^",
            ms=size, color=color, mec="black", mew=0.6, clip_on=False, zorder=5, label="_nolegend_")
    if COLLAPSED_LABEL not in ax.get_legend_handles_labels()[1]:
        ax.add_line(Line2D([], [], ls="none", marker="^", ms=size, color="0.85", mec="black", mew=0.6,
                           label=COLLAPSED_LABEL))


def cap_top(ax: plt.Axes, y_max: float, logy: bool = True) -> None:
    """End the y axis a little above `y_max`, the largest finite value drawn: a fit's collapse branch
    runs on through the collapsed points and would otherwise stretch the axis by decades."""
    if not np.isfinite(y_max) or y_max <= 0:
        return
    lo, hi = ax.get_ylim()
    top = y_max * HEADROOM if logy else y_max + 0.15 * max(y_max - lo, abs(y_max))
    if hi > top:
        ax.set_ylim(top=top)


def plot_line(ax: plt.Axes, x, y, fmt: str | None = None, *, collapse_ppl: float = COLLAPSE_PPL,
              **kwargs) -> Line2D:
    """`ax.plot(x, y, fmt, **kwargs)` for a curve that may collapse: the finite points are drawn as
    usual, the collapsed ones as triangles at the top edge (`mark_collapsed`) in the line's color."""
    xs, ys, xc = split_collapsed(x, y, collapse_ppl)
    (line,) = ax.plot(xs, ys, *([fmt] if fmt else []), **kwargs)
    mark_collapsed(ax, xc, color=line.get_color())
    return line


def scatter_points(ax: plt.Axes, x, y, *, collapse_ppl: float = COLLAPSE_PPL, **kwargs) -> None:
    """`ax.scatter(x, y, **kwargs)` with collapsed points as triangles at the top edge."""
    xs, ys, xc = split_collapsed(x, y, collapse_ppl)
    ax.scatter(xs, ys, **kwargs)
    # a hollow marker (facecolors="none") carries its color in edgecolors
    color = next((kwargs[k] for k in ("color", "c", "edgecolors") if k in kwargs and
                  not (isinstance(kwargs[k], str) and kwargs[k] == "none")), None)
    mark_collapsed(ax, xc, color=color)


def annotate_points(ax: plt.Axes, x, y, labels: Sequence[str], *, collapse_ppl: float = COLLAPSE_PPL,
                    **kwargs) -> None:
    """Label each point; a collapsed point's label goes to its marker at the top edge."""
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    top = collapsed(y, collapse_ppl)
    for xi, yi, gone, text in zip(x, y, top, labels):
        if not np.isfinite(xi) or (not gone and yi <= 0):
            continue
        xy, coords = ((xi, COLLAPSED_Y), ax.get_xaxis_transform()) if gone else ((xi, yi), "data")
        ax.annotate(str(text), xy, xycoords=coords, **kwargs)


def barplot(ax: plt.Axes, data: pd.DataFrame, *, y: str, logy: bool = False,
            collapse_ppl: float = COLLAPSE_PPL, **kwargs) -> plt.Axes:
    """`sns.barplot(data=data, y=y, ax=ax, **kwargs)` where a collapsed value gets a hatched bar up to
    the top of the axis and a triangle, instead of no bar at all (seaborn skips inf and NaN)."""
    values = data[y].to_numpy(dtype=float)
    gone = collapsed(values, collapse_ppl)
    finite = values[~gone & (values > 0)]
    top = (float(finite.max()) if finite.size else 1.0) * (HEADROOM if logy else 1.15)
    sns.barplot(data=data.assign(**{y: np.where(gone, top, values)}), y=y, ax=ax, **kwargs)
    if logy:
        ax.set_yscale("log")
    if gone.any():
        for bar in ax.patches:
            if bar.get_height() == top:  # the value set above, bit for bit
                bar.set_hatch("///")
                mark_collapsed(ax, [bar.get_x() + bar.get_width() / 2], color=bar.get_facecolor())
        ax.set_ylim(top=top)
    return ax


def mark_limit(ax: plt.Axes, limit: NearLossless, color: str | Sequence[float] | None = None,
               size: float = 6.0) -> None:
    """The near-lossless limit of one curve: a dotted vertical line at the limit, a hollow diamond
    where the curve meets the threshold, and a horizontal bar over its SE interval (when it has one).
    Distinct from the PTP's filled star, so knee and limit can be told apart where they disagree.
    A curve still within the tolerance at its last point gets a hollow triangle there instead,
    pointing toward more compression: the limit lies at least that far (call this after the x axis
    has its final direction)."""
    if not np.isfinite(limit.limit):
        return
    x = float(limit.to_native(limit.limit))
    y = limit.dense * limit.relative(limit.limit)  # the threshold where the curve crosses it
    if not np.isfinite(y):
        y = limit.threshold
    marker = LIMIT_MARKER
    if limit.high_open and limit.limit == limit.high:
        rightward = ax.xaxis_inverted() == (limit.axis == "bits")  # where compression grows on screen
        marker = ">" if rightward else "<"
    ax.axvline(x, color=color, ls=":", lw=1.0, alpha=0.7, zorder=2, label="_nolegend_")
    lo, hi = (float(v) for v in limit.to_native([limit.low, limit.high]))
    xerr = [[abs(x - lo)], [abs(hi - x)]] if limit.low < limit.high else None
    ax.errorbar([x], [y], xerr=xerr, fmt=marker, ms=size, mfc="white", mec=color or "black",
                mew=1.2, ecolor=color, elinewidth=1.0, capsize=2, zorder=4, label="_nolegend_")
    if LIMIT_LABEL not in ax.get_legend_handles_labels()[1]:
        ax.add_line(Line2D([], [], ls=":", marker=LIMIT_MARKER, ms=size, color="0.4", mfc="white", label=LIMIT_LABEL))


def plot_ptp_curves(ax: plt.Axes, curves: Iterable[tuple],
                    fits: Mapping[str, PTPFit] | None = None, *,
                    limits: Mapping[str, NearLossless] | None = None, logy: bool = True,
                    palette: str | Sequence | None = None, title: str | None = None,
                    xlabel: str | None = None, ylabel: str = "perplexity", legend: bool = True,
                    invert_bits: bool = True) -> plt.Axes:
    """Scatter each (label, x, y) or (label, x, y, y_se) curve, draw its fit, star its PTP (only where
    a PTP was found) and, given `limits` (e.g. from `mpt_utils.ptp.limits_all`), mark its near-lossless
    limit (`mark_limit`: dotted line and hollow diamond, or a hollow triangle where the curve never
    leaves the tolerance; one legend entry). With y_se, the points get ±SE error bars.

    x is on the curve's own axis (sparsity, or bits for a bit-axis fit). A solid line is eq. 5 with a
    PTP; a dashed line is the simple law that won instead. Bit axes run from many bits to few, so
    compression grows to the right as on the sparsity axes. Collapsed points (PPL inf, NaN or an
    overflow), which the fit keeps as censored, are triangles at the top edge; the y axis then ends
    a little above the largest finite value, since the fit's collapse branch runs on through them.
    """
    curves = list(curves)
    fits, limits = fits or {}, limits or {}
    colors = sns.color_palette(palette, n_colors=max(len(curves), 1))
    bit_axis, y_max, any_collapsed = False, -np.inf, False
    for color, (label, x, y, *rest) in zip(colors, curves):
        se = rest[0] if rest and rest[0] is not None else None
        if se is not None:
            xe, ye, see = (np.asarray(v, dtype=float).ravel() for v in (x, y, se))
            ok = np.isfinite(xe) & ~collapsed(ye) & np.isfinite(see)
            ax.errorbar(xe[ok], ye[ok], yerr=see[ok], fmt="none", ecolor=color, elinewidth=0.8, zorder=2,
                        label="_nolegend_")
        xs, ys, xc = split_collapsed(x, y)
        ax.scatter(xs, ys, color=color, s=18, zorder=3)
        mark_collapsed(ax, xc, color=color)
        y_max = max(y_max, float(ys.max()) if ys.size else -np.inf)
        any_collapsed |= xc.size > 0
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
    bit_axis |= any(limits[c[0]].axis == "bits" for c in curves if c[0] in limits)
    if logy:
        ax.set_yscale("log")
    if bit_axis and invert_bits and not ax.xaxis_inverted():
        ax.invert_xaxis()
    for color, (label, *_) in zip(colors, curves):
        if label in limits:
            mark_limit(ax, limits[label], color=color)
    if any_collapsed:
        cap_top(ax, y_max, logy)
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
