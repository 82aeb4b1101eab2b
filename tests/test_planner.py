import numpy as np
import pytest

from mpt_utils.errors import MPTError
from mpt_utils.planner import Dimension, plan, plan_vs_published, published_ptp_point, trajectory
from mpt_utils.published import load_published


def _curve(s0, slope, rate, base=5.0):
    """Flat-ish up to s0, exponential collapse after: a known-PTP curve."""
    def f(s):
        s = np.asarray(s, float)
        return np.where(s <= s0, base + slope * s, (base + slope * s0) * np.exp(rate * (s - s0)))
    return f


DIMS = [Dimension("quant", _curve(0.8, 0.5, 30), 0.8, grid=[1 - b / 16 for b in (16, 8, 6, 5, 4, 3, 2)]),
        Dimension("prune", _curve(0.6, 2.0, 20), 0.6),
        Dimension("lowrank", _curve(0.2, 6.0, 25), 0.2)]


def test_plan_stays_inside_the_safe_zone_and_tolerance():
    for eps in (0.0, 0.3, 1.0, 3.0, 100.0):
        p = plan(DIMS, eps)
        assert p.ratios["quant"] < 0.8 and p.ratios["prune"] < 0.6 and p.ratios["lowrank"] < 0.2
        assert p.predicted - p.base <= eps + 1e-9
    assert plan(DIMS, 0.0).size == pytest.approx(1.0)  # no tolerance: stay dense


def test_plan_size_shrinks_as_tolerance_grows_and_exploits_robust_axis_first():
    sizes = [plan(DIMS, eps).size for eps in (0.1, 0.5, 1.0, 2.0, 4.0)]
    assert all(a >= b for a, b in zip(sizes, sizes[1:]))
    small = plan(DIMS, 0.5)
    # quantization is the flattest curve: it is used before the fragile low-rank axis
    assert small.ratios["quant"] > 0 and small.ratios["lowrank"] <= small.ratios["quant"]
    assert small.order == ("lowrank", "prune", "quant")


def test_trajectory_is_monotone_in_budget():
    traj = trajectory(DIMS, [1.0, 0.5, 0.25, 0.12, 0.05, 0.01])
    feasible = traj[traj.feasible]
    assert (feasible["size"] <= feasible["size_budget"] + 1e-12).all()
    assert feasible["predicted"].is_monotonic_increasing
    assert not traj[traj.size_budget == 0.01].feasible.iloc[0]  # beyond every PTP: infeasible


def test_bad_planner_input():
    with pytest.raises(MPTError, match="negative"):
        plan(DIMS, -1)
    with pytest.raises(MPTError, match="repeat"):
        plan([DIMS[0], DIMS[0]], 1.0)


def test_additivity_check_is_exact_on_an_additive_grid():
    import pandas as pd

    from mpt_utils.planner import additivity_check

    rows = [{"ratio": r, "scheme": q, "value": 5 + 10 * r**2 + dq}
            for r in (0.0, 0.3, 0.6) for q, dq in (("FP16", 0.0), ("Q4", 0.2), ("Q2", 1.5))]
    out = additivity_check(pd.DataFrame(rows))
    assert len(out) == 9 and out["rel_error"].abs().max() < 1e-12
    rows[-1]["value"] += 3.0  # an interaction term shows up as error exactly there
    out = additivity_check(pd.DataFrame(rows))
    assert out["rel_error"].abs().idxmax() == out.index[(out.ratio == 0.6) & (out.scheme == "Q2")][0]


def test_dimension_from_fit_stops_before_a_collapsed_point():
    from mpt_utils.planner import dimension_from_fit
    from mpt_utils.ptp import fit_ptp

    # too few points for eq. 5, so no PTP: the bound is the largest ratio measured without collapse
    fit = fit_ptp([0.1, 0.3, 0.5, 0.7, 0.8], [5.0, 5.2, 5.5, 6.0, np.inf])
    assert not fit.has_ptp and fit.n_censored == 1
    assert dimension_from_fit("prune", fit).ptp == pytest.approx(0.7)
    # a collapse before the last finite point caps the safe zone there
    odd = fit_ptp([0.1, 0.3, 0.5, 0.7, 0.8], [5.0, 5.2, np.nan, 6.0, 7.0])
    assert dimension_from_fit("prune", odd).ptp == pytest.approx(0.5)
    # with a PTP, the PTP is the bound
    x = np.linspace(0.1, 0.8, 8)
    y = np.where(x <= 0.35, 3 * x**2 + 5, (3 * 0.35**2 + 5) * np.exp(6 * (x - 0.35) + 20 * (x - 0.35) ** 2))
    y[-2:] = np.inf
    full = fit_ptp(x, y)
    assert full.has_ptp and dimension_from_fit("prune", full).ptp == pytest.approx(full.s0)


def test_published_ptp_point_reads_the_perspectives_table3():
    point = published_ptp_point(load_published("perspective_table3"))
    assert point["model"] == "LLaMA2-7B-chat-PTP" and point["ppl"] == 6.92 and point["size_gb"] == 1.89
    assert point["kept"] == pytest.approx(0.15)
    assert point["ratios"] == pytest.approx({"quant": 0.76, "prune": 0.35, "lowrank": 0.05})
    assert published_ptp_point(load_published("perspective_table3").iloc[0:0]) is None


def test_plan_vs_published_plans_at_the_published_gap_and_explains_a_smaller_ratio():
    base = float(DIMS[0].predict(np.array([0.0]))[0])
    point = {"model": "M", "config": "c", "ppl": base + 0.5, "kept": 0.2,
             "ratios": {"quant": 0.85, "prune": 0.3, "lowrank": 0.05}}
    lines = plan_vs_published(DIMS, base, point)
    best = plan(DIMS, 0.5, base=base)
    assert lines[0].startswith(f"at ε = 0.50 PPL (the published point's {point['ppl']:g} − dense {base:.2f})")
    assert f"our plan keeps {best.size:.1%}" in lines[0] and "keeps 20.0%" in lines[0]
    assert any(line.startswith("quant: the plan uses") and "safe bound 0.800 lies at or before" in line
               for line in lines[1:])  # Q-ratio 0.85 is past the quant PTP 0.8
    assert plan_vs_published(DIMS, base, None) == ["no published PTP-guided point to compare with"]
    assert "below dense" in plan_vs_published(DIMS, base, {**point, "ppl": base - 1})[0]
