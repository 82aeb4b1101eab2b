"""Curves, per-point tables and conclusion sentences from hand-made tidy rows (mpt_utils.curves)."""

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from mpt_utils.curves import (  # noqa: E402
    decisive_point,
    measured_curves,
    metric_table,
    metric_values,
    order_agreement,
    paired_note,
    plot_metric_curves,
    ptp_later,
    ptp_shift,
    ptp_summary,
    ranking_at,
    speedup_claim,
    widest_interval,
)
from mpt_utils.errors import MPTError  # noqa: E402
from mpt_utils.ptp import PTPFit, fit_ptp  # noqa: E402


def point(method, ratio, ppl, ppl_se, kl=None, kl_se=None, top=None, data="wiki", size=None, tag=""):
    key = f"{method}-{ratio}-{data}{tag}"
    base = {"method": method, "ratio": ratio, "sparsity": ratio + 0.001, "data": data, "config_hash": key}
    out = [{**base, "metric": "ppl", "value": ppl, "stderr": ppl_se}]
    if kl is not None:
        out.append({**base, "metric": "kl_mean", "value": kl, "stderr": kl_se})
        out.append({**base, "metric": "same_top", "value": top, "stderr": 0.01})
    if size is not None:
        out.append({**base, "metric": "param_reduction", "value": size, "stderr": math.nan, "data": None})
    return out


@pytest.fixture
def rows():
    out = []
    for i, r in enumerate([0.1, 0.3, 0.5]):
        out += point("b", r, 10 + 5 * i, 0.5 + i, kl=0.1 * (i + 1), kl_se=0.01, top=0.9 - 0.1 * i, size=r + 0.02)
        out += point("a", r, 9 + 2 * i, 0.4, kl=0.05 * (i + 1), kl_se=0.02, top=0.95 - 0.1 * i, size=r + 0.01)
    out += point("a", 0.3, 12.0, 0.3, kl=0.1, kl_se=0.01, top=0.8, data="news")  # another corpus
    out += point("c", 0.1, 11.0, 0.2)  # stored by older code: no paired rows
    out += point("c", 0.5, math.inf, math.nan)  # ... and collapsed
    out += point("d", 0.3, 12.0, 0.1, kl=0.15, kl_se=0.01, top=0.7)  # a single point: no curve
    return pd.DataFrame(out)


def test_measured_curves_carry_the_standard_errors(rows):
    curves = measured_curves(rows, "method", "ratio", where={"data": "wiki"})
    assert [c[0] for c in curves] == ["b", "a", "c"]  # appearance order; d has one point
    label, x, y, se = curves[1]
    assert np.allclose(x, [0.1, 0.3, 0.5]) and np.allclose(y, [9, 11, 13]) and np.allclose(se, 0.4)
    c = curves[2]
    assert math.isinf(c[2][1]) and math.isnan(c[3][1])  # the collapse stays in (censored by the fit)
    fit = fit_ptp(x, y, y_se=se)
    assert fit.weighted


def test_order_rename_anchor_and_metric_axis(rows):
    curves = measured_curves(rows, "method", "param_reduction", where={"data": "wiki"}, order=["a", "b", "x"],
                             rename={"a": "A"}, anchor=(0.0, 8.0, 0.1))
    assert [c[0] for c in curves] == ["A", "b"]
    label, x, y, se = curves[0]
    assert np.allclose(x, [0.0, 0.11, 0.31, 0.51]) and y[0] == 8.0 and se[0] == 0.1
    partly = rows.assign(param_reduction=np.where(rows.method == "a", 0.9, np.nan))  # a column, empty for b
    x_b = measured_curves(partly, "method", "param_reduction", order=["b"], where={"data": "wiki"})[0][1]
    assert np.allclose(x_b, [0.12, 0.32, 0.52])  # completed from the metric rows
    kl = measured_curves(rows, "method", "sparsity", metric="kl_mean", where={"data": "wiki"},
                         rename=lambda m: m.upper())
    assert [c[0] for c in kl] == ["B", "A"] and np.allclose(kl[0][2], [0.1, 0.2, 0.3])
    assert measured_curves(rows, "method", "ratio", metric="nll_diff") == []  # an absent metric: no curves
    assert measured_curves(rows, "method", "ratio", where={"method": lambda s: s != "b"}, min_points=3)[0][0] == "a"
    with pytest.raises(MPTError):
        measured_curves(rows, "method", "no_such_thing")


def test_replicates_and_duplicates(rows):
    twice = pd.concat([rows, rows], ignore_index=True)  # the same stored points loaded twice
    assert len(measured_curves(twice, "method", "ratio", where={"data": "wiki"})[0][1]) == 3
    extra = pd.DataFrame(point("b", 0.3, 16.0, 1.0, tag="-replicate"))
    x = measured_curves(pd.concat([rows, extra]), "method", "ratio", where={"data": "wiki"})[0][1]
    assert np.allclose(x, [0.1, 0.3, 0.3, 0.5])  # a replicate point at one ratio stays
    shared = rows[(rows.method == "a") & (rows.data == "wiki")].assign(method="e")  # one point, two curves
    both = measured_curves(pd.concat([rows, shared]), "method", "ratio", where={"data": "wiki"}, order=["a", "e"])
    assert [len(c[1]) for c in both] == [3, 3]
    table = metric_values(pd.concat([rows, shared]), ["method", "ratio"], order=["a", "e"])
    assert table.loc[("e", 0.1), "kl_mean"] == pytest.approx(0.05)


def test_metric_values_and_table(rows):
    values = metric_values(rows, ["method", "ratio"], where={"data": "wiki"}, order=["a", "b", "c"])
    assert list(values.index.get_level_values(0))[:3] == ["a", "a", "a"]
    assert values.loc[("a", 0.3), "kl_mean"] == pytest.approx(0.1)
    assert values.loc[("a", 0.3), "ppl_se"] == pytest.approx(0.4)
    assert math.isnan(values.loc[("c", 0.1), "kl_mean"])
    table = metric_table(rows, ["method", "ratio"], where={"data": "wiki"}, order=["a", "b", "c", "d"])
    assert list(table.columns) == ["PPL ± SE", "KL ± SE", "same-top-1 %"]
    assert table.loc[("a", 0.1), "PPL ± SE"] == "9.00 ± 0.40"
    assert table.loc[("a", 0.1), "KL ± SE"] == "0.05 ± 0.02"
    assert table.loc[("a", 0.1), "same-top-1 %"] == "95.0 ± 1.0"
    assert table.loc[("c", 0.1), "KL ± SE"] == "–"
    assert table.loc[("c", 0.5), "PPL ± SE"].startswith("inf")
    assert list(table.index)[-1] == ("d", 0.3)
    wide = metric_table(rows, "method", columns="ratio", where={"data": "wiki"})
    assert list(wide.index) == ["b", "a", "c", "d"]
    assert wide.loc["a", (0.5, "KL ± SE")] == "0.15 ± 0.02"
    assert wide.loc["d", (0.1, "PPL ± SE")] == "–"
    no_kl = rows[~rows.metric.isin(["kl_mean", "same_top"])]
    assert (metric_table(no_kl, "method")["KL ± SE"] == "–").all()


def test_paired_note(rows):
    note = paired_note(rows)
    assert note is not None and note.startswith("note: 2 of 10 points")
    assert paired_note(rows, where={"method": ["a", "b"]}) is None


def make_fit(s0, lo, hi, axis="sparsity"):
    return PTPFit(params={}, s0=s0, s0_ci=(lo, hi), has_ptp=True, verdict="PTP", rss=0.0, r2=1.0, aic={}, bic={},
                  n_points=8, n_censored=0, axis=axis, weighted=True)


def test_decisive_point_and_widest_interval():
    fits = {"a": make_fit(0.42, 0.3, 0.5), "b": make_fit(0.48, 0.4, 0.7), "c": make_fit(0.6, 0.5, 0.65)}
    assert decisive_point(fits, [0.1, 0.3, 0.5, 0.7]) == 0.5
    assert decisive_point({"a": make_fit(0.8, 0.7, 0.9)}, [0.1, 0.5]) is None
    bits = {"q": make_fit(0.8, 0.75, 0.85, axis="bits")}  # 3.2 bits
    assert decisive_point(bits, [2, 3, 4, 8], axis="bits") == 3.0
    text = widest_interval(fits)
    assert "b's" in text and "0.400–0.700" in text and "3 of 3 fits" in text
    assert widest_interval({}) .startswith("No measured curve has a PTP")
    assert "bits" in widest_interval(bits)


def test_order_agreement(rows):
    text = order_agreement(rows, "method", "ratio", where={"data": "wiki"})  # where most curves have both
    assert text.startswith("At ratio 0.3") and "agrees" in text and "a, d, b" in text
    text = order_agreement(rows, "method", "ratio", where={"data": "wiki", "method": ["a", "b", "c"]})
    assert text.startswith("At ratio 0.5") and "agrees" in text and "(best first: a, b)" in text
    flipped = rows.copy()
    flipped.loc[(flipped.method == "a") & (flipped.metric == "kl_mean"), "value"] = 1.0
    text = order_agreement(flipped, "method", "ratio", at=0.3, where={"data": "wiki"}, rename={"a": "A"},
                           at_text="{:g} bits")
    assert text.startswith("At 0.3 bits") and "differs" in text and "Kendall" in text and "best first: d, b, A" in text
    no_kl = rows[rows.metric != "kl_mean"]
    assert "not compared" in order_agreement(no_kl, "method", "ratio")
    assert "not compared" in order_agreement(rows, "method", "ratio", at=0.9)


def test_plot_metric_curves(rows):
    curves = measured_curves(rows, "method", "ratio", metric="kl_mean", where={"data": "wiki"},
                             anchor=(0.0, 0.0, 0.0))
    fig, ax = plt.subplots()
    plot_metric_curves(ax, curves, ylabel="KL", title="t", invert_x=True)
    assert ax.get_yscale() == "log" and ax.xaxis_inverted()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["b", "a", "d"]
    plt.close(fig)


def test_paired_standard_error_replaces_the_window_spread_where_stored():
    rows = point("wanda", 0.2, 30.0, 6.0) + point("wanda", 0.5, 60.0, 12.0) + point("sparsegpt", 0.5, 50.0, 10.0)
    rows.append({"method": "wanda", "ratio": 0.2, "sparsity": 0.201, "data": "wiki", "config_hash": "wanda-0.2-wiki",
                 "metric": "nll_diff", "value": 0.4, "stderr": 0.01})
    rows.append({"method": "wanda", "ratio": 0.5, "sparsity": 0.501, "data": "wiki", "config_hash": "wanda-0.5-wiki",
                 "metric": "nll_diff", "value": 1.1, "stderr": 0.02})
    frame = pd.DataFrame(rows)
    curves = {c[0]: c for c in measured_curves(frame, "method", "ratio", anchor=(0.0, 20.0, 4.0))}
    # PPL x SE of the paired NLL difference; the dense anchor is the reference itself (SE 0)
    assert np.allclose(curves["wanda"][3], [0.0, 30.0 * 0.01, 60.0 * 0.02])
    # no paired rows: the spread over windows, and the anchor's own SE
    assert np.allclose(curves["sparsegpt"][3], [4.0, 10.0])
    unpaired = {c[0]: c for c in measured_curves(frame, "method", "ratio", paired=False)}
    assert np.allclose(unpaired["wanda"][3], [6.0, 12.0])


def ptp_rows(curves):
    """A `ptp_table`-like frame: (curve, has_ptp, s0, agreement[, axis])."""
    return pd.DataFrame([{"curve": c, "has_ptp": h, "s0": s, "agreement": a, "axis": ax, "claim": "0.55–0.65"}
                         for c, h, s, a, ax in curves])


def test_ptp_summary_counts_verdicts_and_names_few_curves():
    table = ptp_rows([("a", True, 0.6, "agrees", "sparsity"), ("b", True, 0.5, "disagrees: PTP earlier", "sparsity"),
                      ("c", False, math.nan, "untestable: too few points", "sparsity")])
    text = ptp_summary(table, "ours")
    assert text.startswith("ours: PTP in 2 of 3 curves, at 0.500–0.600; claimed 0.55–0.65")
    assert "agrees 1 (a); disagrees 1 (b); untestable 1 (c)." in text
    assert "(a)" not in ptp_summary(table, "ours", max_names=0)
    assert "no curve was fitted" in ptp_summary(table.iloc[0:0], "ours") and "no curve" in ptp_summary(None, "x")
    bits = ptp_rows([("q", True, 1 - 3.2 / 16, "consistent: CI overlaps claim", "bits")])
    assert "at 3.20 bits" in ptp_summary(bits, "gguf")


def test_ptp_shift_and_ptp_later():
    ours = ptp_rows([("a", True, 0.4, "agrees", "sparsity"), ("b", True, 0.5, "agrees", "sparsity")])
    pub = ptp_rows([("A", True, 0.6, "agrees", "sparsity")])
    text = ptp_shift(ours, pub, "ours", "paper")
    assert "ours 0.450 (2 curve(s)) vs paper 0.600 (1 curve(s))" in text and "earlier (less compression), by 0.150" in text
    assert "later (more compression)" in ptp_shift(pub, ours, "paper", "ours")
    none = ptp_rows([("a", False, math.nan, "disagrees: no PTP found", "sparsity")])
    assert ptp_shift(none, pub, "ours", "paper") == "Median PTP not compared: no PTP was found for ours."
    modes = ours.assign(mode=["I", "II"])
    assert "II transitions later" in ptp_later(modes, "mode", "I", "II", "m")
    assert "not later" in ptp_later(modes.assign(mode=["II", "I"]), "mode", "I", "II")
    assert "no curve of II has a PTP" in ptp_later(modes.assign(mode=["I", "I"]), "mode", "I", "II")
    assert "no fitted curves" in ptp_later(None, "mode", "I", "II")


def test_speedup_claim():
    speed = pd.DataFrame({"label": ["a", "a", "b"], "ratio": [0.2, 0.6, 0.4], "value": [1.3, 2.5, 1.8]})
    text = speedup_claim(speed)
    assert "×1.80 (b at 0.4): under ×2, as the Perspective claims" in text and "2 timed point(s)" in text
    assert "not under ×1.5, against the Perspective claim" in speedup_claim(speed, limit=1.5)
    assert "No speed point below 10%" in speedup_claim(speed, below=0.1)
    assert "No speed point was timed" in speedup_claim(speed.iloc[0:0])


def test_ranking_at_the_largest_ratio_every_curve_reached():
    table = pd.DataFrame({0.2: [12.0, 11.0, 13.0], 0.4: [30.0, math.inf, 20.0], 0.6: [90.0, np.nan, np.nan]},
                         index=["a", "b", "c"])
    text = ranking_at(table, 10.0)
    assert text == "At ratio 0.4 (3 of 3 curves measured there; best first): c ×2.00 of dense, a ×3.00 of dense, b collapsed."
    assert "a PPL 90" in ranking_at(table, at=0.6) and "1 of 3" in ranking_at(table, at=0.6)
    assert "No curve was measured at ratio 0.8" in ranking_at(table, at=0.8)
    assert ranking_at(table.iloc[0:0]) == "No measured point to rank."
    assert ranking_at(table[[0.6]].iloc[1:]) == "No curve has a measured value at ratio 0.6."
