"""Notebook 05's low-rank points are recipe points: one plan per curve from the engine's step cache,
the same numbers as applying the plan by hand, and tidy rows whose sizes are the factors' sizes."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest

from mpt_utils import lowrank
from mpt_utils.combined.grid import GridSetup, metric
from mpt_utils.errors import MPTError
from mpt_utils.lowrank.factorized import LowRankLinear, get_module, target_linears
from mpt_utils.lowrank.sweep import lowrank_curves, lowrank_rows, release_plans
from mpt_utils.session import Session
from mpt_utils.testing import tiny_model

RATIOS = [0.0, 0.1, 0.2, 0.3]


@pytest.fixture
def setup(tmp_path, corpus):
    session = Session("tiny-llama", tmp_path / "store", device="cpu", loaded=tiny_model("llama", seed=0))
    protocol = GridSetup(model="tiny-llama", eval_data=corpus, calib_data=corpus, n_calib=4, seqlen=32,
                         max_windows=2, device="cpu")
    return session, protocol


@pytest.fixture
def prepared(monkeypatch):
    """Every plan the engine builds, in order (method, options)."""
    built: list[tuple[str, dict]] = []
    real = lowrank.prepare

    def counting(model, method, calib_ids=None, **options):
        built.append((method, {k: v for k, v in options.items() if k not in lowrank.ENGINE_ARGS}))
        return real(model, method, calib_ids, **options)

    monkeypatch.setattr(lowrank, "prepare", counting)
    return built


def test_the_curves_are_notebook_05s_recipes():
    asvd = {"alpha": 0.5, "candidates": [0.2, 0.4, 0.6], "granularity": "part", "sens_windows": 1, "sens_seqlen": 128}
    curves = lowrank_curves(["svd", "asvd", "svd_llm"], [0.0, 0.2], method_ratios={"svd": [0.0, 0.3]},
                            asvd_options=asvd, svd_llm_options={"update": "closed_form"},
                            method_options={"svd_llm": {"update": "none"}}, svd_llm_extra_ratios=[0.4],
                            sequential_ratios=[0.2], extra_eval_ratios=[0.2])
    assert [c.name for c in curves] == ["svd", "asvd", "svd_llm_seq", "svd_llm"]
    assert [c.display for c in curves] == ["SVD", "ASVD", "SVD-LLM (seq)", "SVD-LLM"]
    assert curves[0].recipes == ["dense", "svd@0.3"] and curves[0].extra_recipes == []
    assert curves[1].recipes[1] == ("asvd@0.2[alpha=0.5,candidates=[0.2,0.4,0.6],granularity=part,sens_seqlen=128,"
                                    "sens_windows=1]")
    assert curves[2].recipes == ["dense", "svd_llm@0.2[sequential=true,update=none]"]  # method_options win
    assert curves[3].recipes == ["dense", "svd_llm@0.2[update=none]", "svd_llm@0.4[update=none]"]
    assert curves[3].extra_recipes == ["svd_llm@0.2[update=none]"] and curves[2].extra_recipes == []
    assert (curves[1].mode, curves[3].mode) == ("I", "II")
    with pytest.raises(MPTError, match="alpah"):  # before any model is loaded
        lowrank_curves(["asvd"], [0.2], method_options={"asvd": {"alpah": 0.5}})


def test_a_sweep_over_three_ratios_decomposes_once_and_equals_the_plan_applied_by_hand(setup, prepared, corpus):
    session, protocol = setup
    (curve,) = lowrank_curves(["svd_llm"], RATIOS, svd_llm_options={"update": "none"}, extra_eval_ratios=[0.2])
    other = replace(protocol, eval_data="embedded-wiki")
    recipe_rows = session.sweep(curve.recipes, protocol) + session.sweep(curve.extra_recipes, other)
    assert prepared == [("svd_llm", {"update": "none"})]  # one plan for 3 ratios and both corpora

    calib = session.calib_ids(corpus, 4, 32, 0)
    plan = lowrank.prepare(copy.deepcopy(session.dense), "svd_llm", calib, update="none", progress=False)
    evaluator = session.paired(32, 2)
    for ratio in RATIOS[1:]:
        model = copy.deepcopy(session.dense)
        plan.apply(model, ratio)
        by_hand = next(r for r in evaluator.rows(model, [corpus], False) if r["metric"] == "ppl")["value"]
        stored = [r for r in recipe_rows if r["recipe"] == curve.recipe(ratio) and r.get("data") == corpus]
        assert metric(stored, "ppl")["value"] == pytest.approx(by_hand, rel=1e-6)

    release_plans(session, curve, protocol, other)  # the plan is freed after its curve ...
    assert not session.bench(protocol).step_cache and not session.bench(other).step_cache
    session.point("svd_llm@0.4[update=none]", protocol)
    assert len(prepared) == 3  # ... so a new point plans again (the by-hand plan above is the second)


def test_the_rows_carry_the_requested_ratio_and_the_factor_sizes(setup):
    session, protocol = setup
    curves = lowrank_curves(["svd", "svd_llm"], RATIOS, svd_llm_options={"update": "none"})
    rows = lowrank_rows([r for c in curves for r in session.sweep(c.recipes, protocol)], curves)
    assert "ratio" not in rows.columns  # the recipe's whole-model compression stays a metric row
    dense = rows[(rows.requested == 0.0) & (rows.metric == "ppl")]
    assert list(dense.label) == ["SVD", "SVD-LLM"] and dense.config_hash.nunique() == 1  # one shared point

    shapes = {n: (lin.out_features, lin.in_features) for n, lin in target_linears(session.dense).items()}
    for curve in curves:
        for ratio in RATIOS[1:]:
            point = rows[(rows.curve == curve.name) & (rows.requested == ratio)]
            layers = point[point.metric == "layer_reduction"].set_index("layer")
            assert set(layers.index) == set(shapes)
            kept = sum(r * (o + i) if r > 0 else o * i for n, (o, i) in shapes.items()
                       for r in [int(layers.loc[n, "rank"])])
            by_hand = 1 - kept / sum(o * i for o, i in shapes.values())
            assert point.loc[point.metric == "param_reduction", "value"].item() == pytest.approx(by_hand, abs=1e-12)
            assert by_hand >= ratio  # integer ranks round the reduction up

    model = copy.deepcopy(session.dense)  # the ranks are the factors' ranks of the applied plan
    lowrank.prepare(model, "svd").apply(model, 0.2)
    svd = rows[(rows.curve == "svd") & (rows.requested == 0.2) & (rows.metric == "layer_reduction")]
    for name, rank in zip(svd.layer, svd["rank"]):
        module = get_module(model, name)
        assert (module.rank if isinstance(module, LowRankLinear) else 0) == rank
