"""Plot helpers on curves that collapse: inf / NaN / overflow points become triangles at the top edge
of a log axis (one legend entry), nothing fails and nothing is dropped silently; the near-lossless
limit gets its own marker beside the PTP's star."""

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402

from mpt_utils.plots import (  # noqa: E402
    COLLAPSED_LABEL,
    COLLAPSED_Y,
    LIMIT_LABEL,
    LIMIT_MARKER,
    annotate_points,
    barplot,
    drawable,
    mark_collapsed,
    plot_line,
    plot_ptp_curves,
    scatter_points,
    split_collapsed,
)
from mpt_utils.ptp import fit_ptp, near_lossless_limit  # noqa: E402

X = np.linspace(0.1, 0.8, 8)


def _curve(s0=0.35):
    y = np.where(X <= s0, 3 * X**2 + 5, (3 * s0**2 + 5) * np.exp(6 * (X - s0) + 20 * (X - s0) ** 2))
    return y * np.exp(np.random.default_rng(0).normal(0, 0.01, X.size))


def _triangles(ax):
    """Collapse markers actually drawn (the legend proxy has no data)."""
    return [ln for ln in ax.get_lines() if ln.get_marker() == "^" and len(ln.get_xdata())]


def _render(fig):
    fig.savefig(io.BytesIO(), format="png")  # raises if anything cannot be drawn
    plt.close(fig)


@pytest.fixture
def ax():
    fig, ax = plt.subplots()
    yield ax
    _render(fig)


def test_split_collapsed_keeps_every_collapsed_point():
    xs, ys, xc = split_collapsed([0.1, 0.2, 0.3, 0.4, np.nan], [5.0, np.inf, np.nan, 1e30, 6.0])
    assert xs.tolist() == [0.1] and ys.tolist() == [5.0]
    assert xc.tolist() == [0.2, 0.3, 0.4]


def test_ptp_plot_marks_collapsed_points_at_the_top(ax):
    y = _curve()
    y[-2:] = [np.inf, np.nan]
    other = _curve(0.55)
    other[-1] = 1e30
    curves = [("a", X, y), ("b", X, other)]
    fits = {label: fit_ptp(x, yy) for label, x, yy in curves}
    plot_ptp_curves(ax, curves, fits)
    marks = _triangles(ax)
    assert sorted(np.concatenate([m.get_xdata() for m in marks]).tolist()) == pytest.approx([0.7, 0.8, 0.8])
    assert all(np.allclose(m.get_ydata(), COLLAPSED_Y) for m in marks)  # axes fraction: the top edge
    assert all(m.get_transform() == ax.get_xaxis_transform() for m in marks)
    labels = ax.get_legend_handles_labels()[1]
    assert labels.count(COLLAPSED_LABEL) == 1
    # the axis ends just above the largest finite value, not where the collapse branch runs off to
    finite_max = max(np.nanmax(np.where(np.isfinite(c[2]) & (c[2] < 1e6), c[2], np.nan)) for c in curves)
    assert ax.get_yscale() == "log" and finite_max < ax.get_ylim()[1] <= 3 * finite_max * (1 + 1e-9)


def test_ptp_plot_without_collapse_is_unchanged(ax):
    plot_ptp_curves(ax, [("a", X, _curve())], {"a": fit_ptp(X, _curve())})
    assert not _triangles(ax) and COLLAPSED_LABEL not in ax.get_legend_handles_labels()[1]


def test_line_scatter_and_labels_survive_inf_on_log_axes(ax):
    y = _curve()
    y[-1] = np.inf
    line = plot_line(ax, X, y / y[0], "--", color="C3", label="normalised")
    scatter_points(ax, X, y, facecolors="none", edgecolors="C1")
    annotate_points(ax, X, y, [f"p{i}" for i in range(X.size)], fontsize="x-small")
    ax.set_yscale("log")
    assert len(line.get_xdata()) == X.size - 1
    marks = _triangles(ax)
    assert len(marks) == 2 and all(m.get_xdata().tolist() == [0.8] for m in marks)
    assert ax.get_legend_handles_labels()[1].count(COLLAPSED_LABEL) == 1
    top = [t for t in ax.texts if t.get_text() == "p7"][0]
    assert top.xy == (0.8, COLLAPSED_Y)
    assert np.isfinite(ax.get_ylim()).all()


@pytest.mark.parametrize("logy", [False, True])
def test_bars_of_collapsed_values_reach_the_top_instead_of_vanishing(ax, logy):
    data = pd.DataFrame({"method": ["a", "a", "b", "b", "c", "c"], "kind": ["u", "w"] * 3,
                         "value": [5.0, 6.0, np.inf, 7.0, np.nan, 1e30]})
    barplot(ax, data, x="method", y="value", hue="kind", hue_order=["u", "w"], order=["a", "b", "c"], logy=logy)
    bars = [b for b in ax.patches if b.get_height() > 0]  # seaborn adds empty legend proxies
    assert len(bars) == 6  # seaborn alone draws no bar for inf or NaN
    hatched = [b for b in bars if b.get_hatch()]
    assert len(hatched) == 3 and all(b.get_height() == ax.get_ylim()[1] for b in hatched)
    assert ax.get_ylim()[1] < 100  # not stretched to 1e30
    assert sum(len(m.get_xdata()) for m in _triangles(ax)) == 3
    assert ax.get_yscale() == ("log" if logy else "linear")


def test_drawable_and_marks_for_seaborn_plots(ax):
    y = np.array([5.0, np.inf, 1e30, 7.0])
    assert np.isnan(drawable(y)).tolist() == [False, True, True, False]
    mark_collapsed(ax, [1, 2, 3, 4], y=y, color="C0")
    assert _triangles(ax)[0].get_xdata().tolist() == [2.0, 3.0]


def _limit_markers(ax):
    """(x, y, marker) of the drawn limit markers (hollow: white face)."""
    return [(ln.get_xdata()[0], ln.get_ydata()[0], ln.get_marker()) for ln in ax.get_lines()
            if ln.get_marker() in (LIMIT_MARKER, ">", "<") and len(ln.get_xdata()) and ln.get_markerfacecolor() == "white"]


def test_near_lossless_limit_is_a_vertical_marker_distinct_from_the_star(ax):
    early = np.where(X <= 0.5, 40 * X**1.5 + 5, (40 * 0.5**1.5 + 5) * np.exp(8 * (X - 0.5)))  # bends late
    curves = [("a", X, _curve()), ("b", X, early, 0.02 * early)]
    fits = {c[0]: fit_ptp(c[1], c[2]) for c in curves}
    limits = {"a": near_lossless_limit(X, curves[0][2], 5.0),
              "b": near_lossless_limit(X, early, 5.0, y_se=0.02 * early)}
    plot_ptp_curves(ax, curves, fits, limits=limits)
    marks = _limit_markers(ax)
    assert sorted(m[0] for m in marks) == pytest.approx(sorted(lim.limit for lim in limits.values()))
    assert all(m[2] == LIMIT_MARKER for m in marks)
    for lim in limits.values():  # the diamond sits on the threshold, a dotted line runs through it
        assert any(m[0] == pytest.approx(lim.limit) and m[1] == pytest.approx(lim.threshold) for m in marks)
        assert any(ln.get_linestyle() == ":" and np.allclose(ln.get_xdata(), lim.limit) for ln in ax.get_lines())
    stars = [c for c in ax.collections if isinstance(c, PathCollection) and c.get_sizes()[0] == 160]  # PTP stars
    assert len(stars) == 2 and {round(s.get_offsets()[0][0], 6) for s in stars}.isdisjoint(
        {round(m[0], 6) for m in marks})  # knees and limits are separate markers at separate places
    assert ax.get_legend_handles_labels()[1].count(LIMIT_LABEL) == 1
    assert limits["b"].limit < fits["b"].s0  # the case the marker exists for: limit before the knee


def test_open_ended_limit_points_toward_more_compression_on_a_bit_axis(ax):
    bits = np.array([16, 8, 6, 5, 4, 3, 2])
    y = np.array([13.64, 13.7, 13.7, 13.93, 13.98, 14.25, 14.82])  # never 27% above dense
    lim = near_lossless_limit(bits, y, axis="bits")
    plot_ptp_curves(ax, [("q", bits, y)], {"q": fit_ptp(bits, y, axis="bits")}, limits={"q": lim})
    assert ax.xaxis_inverted()
    (x, yy, marker), = _limit_markers(ax)
    assert x == pytest.approx(2.0) and yy == pytest.approx(14.82) and marker == ">"
