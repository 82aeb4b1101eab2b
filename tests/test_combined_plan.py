"""The planner on a model's own curves: synthetic separable eq. 5 curves with known PTPs."""

from __future__ import annotations

import numpy as np
import pytest

from mpt_utils.combined.plan import (
    block_size_model,
    dimensions_from_curves,
    gguf_ratio_grid,
    plan_for,
    plan_to_recipe,
    scheme_for_bits,
)
from mpt_utils.errors import MPTError
from mpt_utils.planner import Plan

DENSE = 5.0
BITS = np.array([16, 12, 10, 8, 7, 6, 5, 4.5, 4, 3.5, 3, 2.5, 2])
# per dimension: (s0, A, alpha) of eq. 5's gradual branch, the collapse rate after s0, and measured ratios
TRUE = {"quant": (0.75, 0.5, 2.0), "prune": (0.5, 2.0, 2.0), "lowrank": (0.2, 20.0, 1.5)}
RATIOS = {"quant": 1 - BITS / 16, "prune": np.linspace(0, 0.8, 17), "lowrank": np.linspace(0, 0.5, 11)}


def eq5(s, s0, a, alpha, beta=8.0, gamma=30.0):
    """The continuous eq. 5: A·s^α + B up to s0, then (A·s0^α + B)·exp(β(s−s0) + γ(s−s0)²)."""
    s = np.asarray(s, float)
    at = a * s0**alpha + DENSE
    return np.where(s <= s0, a * s**alpha + DENSE, at * np.exp(beta * (s - s0) + gamma * (s - s0) ** 2))


def _curves(bits_axis: bool = False):
    out = {}
    for name, (s0, a, alpha) in TRUE.items():
        x = RATIOS[name]
        y = eq5(x, s0, a, alpha)
        out[name] = (BITS if bits_axis and name == "quant" else x, y, 0.01 * y)  # 1 % SEs, as a PPL evaluator gives
    return out


@pytest.fixture(scope="module")
def dims():
    return dimensions_from_curves(_curves(), DENSE)


def true_damage(ratios):
    return sum(eq5(ratios[n], *TRUE[n]) - DENSE for n in TRUE)


def test_each_bound_is_the_low_end_of_the_ptp_interval(dims):
    for d in dims:
        s0 = TRUE[d.name][0]
        assert d.fit.has_ptp and d.fit.s0 == pytest.approx(s0, abs=0.01)
        assert d.bound == "s0_ci_low" and d.ptp == d.fit.s0_ci[0]
        assert s0 - 0.03 < d.ptp <= s0  # conservative: never past the true knee
        assert d.predict(np.array([0.0]))[0] == pytest.approx(DENSE)  # anchored at the measured dense PPL
    loose = {d.name: d for d in dimensions_from_curves(_curves(), DENSE, conservative=False)}
    assert all(loose[d.name].ptp == loose[d.name].fit.s0 >= d.ptp for d in dims)
    # a quant curve given in bits per weight is read on the bit axis: the same dimension
    bits = {d.name: d for d in dimensions_from_curves(_curves(bits_axis=True), DENSE)}
    assert bits["quant"].ptp == pytest.approx(dims[-1].ptp, abs=1e-6) and dims[-1].name == "quant"


def test_with_room_to_spare_every_dimension_goes_to_its_bound(dims):
    p = plan_for(dims, epsilon=100.0)
    bounds = {d.name: d.ptp for d in dims}
    assert p.ratios["quant"] == pytest.approx(1 - 5 / 16)  # 4 bits is the PTP itself: 5 bits is the last safe width
    for name in ("prune", "lowrank"):  # the last grid step below the bound (41 steps from 0 to the bound)
        assert p.ratios[name] == pytest.approx(bounds[name] * 39 / 40)
        assert p.ratios[name] < TRUE[name][0]


@pytest.mark.parametrize("epsilon", [0.3, 1.0])
def test_the_plan_is_the_known_optimum_of_the_true_curves(dims, epsilon):
    p = plan_for(dims, epsilon=epsilon)
    assert true_damage(p.ratios) <= epsilon + 1e-6
    assert all(p.ratios[d.name] < d.ptp <= TRUE[d.name][0] for d in dims if p.ratios[d.name] > 0)
    # brute force on the TRUE curves, finely, over the same safe zone: the plan is as small, within a grid step
    grids = {"quant": np.array([r for r in gguf_ratio_grid() if r < TRUE["quant"][0]]),
             "prune": np.linspace(0, TRUE["prune"][0], 201)[:-1], "lowrank": np.linspace(0, TRUE["lowrank"][0], 201)[:-1]}
    q, r, lr = np.meshgrid(grids["quant"], grids["prune"], grids["lowrank"], indexing="ij")
    damage = true_damage({"quant": q, "prune": r, "lowrank": lr})
    kept = np.where(damage <= epsilon, (1 - q) * (1 - r) * (1 - lr), np.inf)
    best = np.unravel_index(np.argmin(kept), kept.shape)
    assert kept[best] <= p.size <= kept[best] * 1.04
    assert p.ratios["quant"] == pytest.approx(q[best])  # the same bit width


def test_a_byte_budget_gives_the_lowest_predicted_ppl_that_fits(dims):
    size = block_size_model(block_bytes=1000.0, other_bytes=100.0)
    p = plan_for(dims, budget_bytes=300.0, size_model=size)
    assert p.size_bytes == pytest.approx(100 + 1000 * p.size) and p.size_bytes <= 300.0
    looser = plan_for(dims, budget_bytes=400.0, size_model=size)
    assert looser.predicted <= p.predicted and looser.size_bytes <= 400.0
    both = plan_for(dims, epsilon=1.0, budget_bytes=400.0, size_model=size)
    assert both.predicted - both.base <= 1.0 and both.size_bytes <= 400.0


def test_unreachable_epsilon_or_budget_is_one_error_naming_the_closest_plan(dims):
    with pytest.raises(MPTError, match="compresses anything stays within ε=0.0001 .* closest feasible plan: ") as info:
        plan_for(dims, epsilon=1e-4)  # even the first grid step of the flattest curve costs more
    closest = info.value.closest
    assert closest.predicted - closest.base > 1e-4 and "raise epsilon to ≥" in info.value.fix
    assert closest.ratios["prune"] > 0 and closest.ratios["quant"] == closest.ratios["lowrank"] == 0
    assert plan_for(dims, epsilon=1e-4, allow_dense=True).size == 1.0  # unless staying dense is fine
    size = block_size_model(block_bytes=1000.0, other_bytes=100.0)
    with pytest.raises(MPTError, match="within ε=0.01 .* that fits 500 bytes; closest feasible plan") as info:
        plan_for(dims, epsilon=0.01, budget_bytes=500.0, size_model=size)
    assert info.value.closest.size_bytes <= 500.0
    with pytest.raises(MPTError, match="no safe configuration fits 150 bytes; the smallest safe one") as info:
        plan_for(dims, budget_bytes=150.0, size_model=size)
    assert info.value.closest.size_bytes > 150.0 and "phase transition" in info.value.fix
    with pytest.raises(MPTError, match="size model"):
        plan_for(dims, budget_bytes=150.0)


def test_plan_to_recipe_writes_the_plan_in_the_recipe_grammar(dims):
    recipe = plan_to_recipe(plan_for(dims, epsilon=1.0))
    assert [s.method for s in recipe][-1] == "gguf" and recipe.gguf_scheme.startswith("Q")
    plan = Plan({"quant": 1 - 5 / 16, "prune": 0.43219, "lowrank": 0.12345}, 0.3, 6.0, 5.0, 1.0, ())
    assert str(plan_to_recipe(plan)) == "asvd@0.123 > admm@0.432 > gguf:Q5_K_M"
    assert str(plan_to_recipe(plan, methods={"quant": "gptq", "prune": "wanda"})) == \
        "asvd@0.123 > wanda@0.432 > gptq:5bit"
    assert str(plan_to_recipe(Plan({"quant": 0.0, "prune": 0.5, "lowrank": 0.0}, 0.5, 6.0, 5.0, 1.0, ()))) == "admm@0.5"
    assert [scheme_for_bits(b) for b in (8, 6, 5, 4, 3, 2)] == ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]
    with pytest.raises(MPTError, match="not a whole bit width"):
        plan_to_recipe(Plan({"quant": 0.3}, 0.7, 6.0, 5.0, 1.0, ()))
    with pytest.raises(MPTError, match="no recipe method for dimension 'heads'"):
        plan_to_recipe(Plan({"heads": 0.3}, 0.7, 6.0, 5.0, 1.0, ()))
