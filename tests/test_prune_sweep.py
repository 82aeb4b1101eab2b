"""Notebook 02's sweep as recipe points: the recipe list, the rows adapter, the point equal to pruning by
hand, and the dense-statistics shortcut beside it."""

import copy
import math

import pandas as pd
import pytest
import torch

from mpt_utils.combined.grid import GridSetup, point_config
from mpt_utils.data import calibration_windows
from mpt_utils.errors import MPTError
from mpt_utils.prune import prune_model
from mpt_utils.prune.measure import block_linears
from mpt_utils.prune.sweep import (
    compare_modes,
    dense_shortcut_point,
    parse_method,
    point_rows,
    prune_recipe,
    prune_recipes,
    unstructured_findings,
)
from mpt_utils.recipe import Recipe
from mpt_utils.session import Session
from mpt_utils.store import ResultsStore
from mpt_utils.testing import tiny_model


def _protocol(corpus: str, **changes) -> GridSetup:
    # calibration windows shorter than the evaluation ones, as notebook 02's embedded profile
    return GridSetup(model="tiny-llama", eval_data=corpus, calib_data=corpus, n_calib=2, seqlen=64, max_windows=2,
                     seed=0, device="cpu", calib_seqlen=32, **changes)


def _session(store, loaded=None) -> Session:
    return Session("tiny-llama", store, device="cpu", loaded=loaded or tiny_model("llama"))


def test_the_recipe_list_skips_nm_for_methods_without_it_and_keeps_options():
    recipes = [str(r) for r in prune_recipes(
        ["wanda", "owl:wanda", "besa"], [0.3, 0.6], ["2:4"],
        method_opts={"besa": {"epochs": 3, "d0": 0.001}}, method_sparsities={"besa": [0.6]})]
    assert recipes == ["wanda@0.3", "wanda@0.6", "wanda@2:4", "owl@0.3[base=wanda]", "owl@0.6[base=wanda]",
                       "besa@0.6[d0=0.001,epochs=3]"]  # OWL's per-block ratios and BESA's rows break N:M
    # a method's listed points are its subset of the sweep, N:M patterns included ("2:4" text)
    assert [str(r) for r in prune_recipes(["wanda", "sparsegpt"], [0.3, 0.6], ["2:4", "4:8"],
                                          method_sparsities={"wanda": [0.6, "4:8"], "sparsegpt": [0.3]})] == [
        "wanda@0.6", "wanda@4:8", "sparsegpt@0.3"]
    assert parse_method("owl:sparsegpt") == ("owl", {"base": "sparsegpt"}) and parse_method("wanda") == ("wanda", {})
    assert str(prune_recipe("magnitude", pattern="4:8")) == "magnitude@4:8"
    with pytest.raises(MPTError, match="did you mean 'percdamp'"):
        prune_recipes(["sparsegpt"], [0.5], method_opts={"sparsegpt": {"percdmp": 0.1}})


def test_the_recipe_point_is_prune_model_by_hand_on_the_same_windows(tmp_path, corpus):
    lm = tiny_model("llama")
    session, protocol = _session(ResultsStore(tmp_path), lm), _protocol(corpus)
    for label in ("sparsegpt", "owl:wanda"):
        rows = point_rows(session.point(prune_recipe(label, 0.6), protocol))
        hand = copy.deepcopy(lm.model)
        calib = calibration_windows(lm.tokenizer, corpus, 2, 32, 0)
        name, opts = parse_method(label)
        report = prune_model(hand, name, 0.6, calib_ids=calib, sequential=True, **opts)
        model, _ = session.bench(protocol).compressed_model(Recipe.parse(str(prune_recipe(label, 0.6))))
        assert all(torch.equal(a, b) for a, b in zip(hand.state_dict().values(), model.state_dict().values()))
        ppl = next(r for r in session.paired(64, 2).rows(hand, [corpus]) if r["metric"] == "ppl")
        got = rows[rows.metric == "ppl"].iloc[0]
        assert got.value == ppl["value"] and got.stderr == ppl["stderr"]
        assert got.sparsity == report.achieved and got.block_targets == report.block_targets
        assert got.prune_mode == "sequential" and got.method == label and got.ratio == 0.6
    assert all(torch.equal(p, q) for p, q in zip(lm.model.parameters(), tiny_model("llama").model.parameters()))


def test_owl_block_scores_are_computed_once_per_protocol(tmp_path, corpus, monkeypatch):
    from mpt_utils.prune import engine

    calls = []
    real = engine.allocation_scores
    monkeypatch.setattr(engine, "allocation_scores", lambda *a, **k: calls.append(k) or real(*a, **k))
    session = _session(ResultsStore(tmp_path))
    rows = point_rows(session.sweep(prune_recipes(["owl:wanda"], [0.3, 0.6]), _protocol(corpus)))
    assert len(calls) == 1 and "calib_ids" in calls[0]
    targets = rows[rows.metric == "sparsity"].block_targets.tolist()
    assert targets[0] != targets[1] and all(len(set(t)) > 1 for t in targets)


def test_the_rows_carry_the_measured_sparsity_and_resume_without_loading(tmp_path, corpus):
    lm = tiny_model("llama")
    store, protocol = ResultsStore(tmp_path / "store"), _protocol(corpus)
    session = _session(store, lm)
    recipes = prune_recipes(["magnitude", "wanda"], [0.45], ["2:4"])
    rows = point_rows(session.sweep(recipes, protocol))
    ppl = rows[rows.metric == "ppl"]
    assert ppl.method.tolist() == ["magnitude", "magnitude", "wanda", "wanda"]
    assert ppl.pattern.tolist() == ["unstructured", "2:4"] * 2 and ppl.ratio.tolist() == [0.45, 0.5] * 2
    assert ppl.value.map(math.isfinite).all() and ppl.stderr.notna().all() and "kl_mean" in set(rows.metric)
    assert rows[rows.pattern == "2:4"].nm_ok.all() and rows[rows.pattern == "unstructured"].nm_ok.isna().all()
    # the measured sparsity is the zero share of the decoder linears of the pruned model
    for recipe in recipes:
        model, _ = session.bench(protocol).compressed_model(recipe)
        weights = [lin.weight for block in block_linears(model) for lin in block.values()]
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        measured = rows[(rows.recipe == str(recipe)) & (rows.metric == "sparsity")].value.item()
        assert measured == pytest.approx(zeros, abs=1e-12)
    assert (rows[rows.metric == "prune_seconds"].value > 0).all()

    fresh = Session("tiny-llama", store, loader=lambda: pytest.fail("a stored point loaded the model"))
    again = point_rows(fresh.sweep(recipes, protocol))
    pd.testing.assert_frame_equal(again, rows, check_like=True)  # the store reads columns back sorted


def test_the_dense_shortcut_is_its_own_point_and_the_drift_compares_it(tmp_path, corpus):
    lm = tiny_model("llama", layers=2)
    w0 = {n: p.clone() for n, p in lm.model.named_parameters()}
    store, protocol = ResultsStore(tmp_path), _protocol(corpus)
    session = _session(store, lm)
    dense = dense_shortcut_point(session, protocol, "dsnot:wanda", 0.6)  # DSnoT gets the windows' length
    assert dense[0]["prune_mode"] == "dense-stats" and dense[0]["mode"] == "dense" and math.isfinite(dense[0]["value"])
    assert all(torch.equal(p, w0[n]) for n, p in lm.model.named_parameters())  # pruned on a copy
    drift = compare_modes(session, protocol, ["magnitude", "wanda", "besa"], [0.5, 0.7])
    assert drift.method.tolist() == ["wanda", "wanda"]  # data-free and block-level methods have no shortcut
    seq = point_rows(session.point("wanda@0.5", protocol))
    assert drift.ppl_sequential.iloc[0] == seq[seq.metric == "ppl"].value.item()
    assert drift.ratio.iloc[0] == pytest.approx(drift.ppl_dense.iloc[0] / drift.ppl_sequential.iloc[0])
    assert len(list(tmp_path.glob("points/*.json"))) == 5  # 1 + 2 shortcut points + 2 recipe points
    assert not session.built(("stats", corpus, 2, 32, 0))  # the dense statistics are freed afterwards
    with pytest.raises(MPTError, match="no dense-statistics shortcut"):
        dense_shortcut_point(session, protocol, "besa", 0.5)


def test_unstructured_findings_from_the_table_and_the_drift():
    table = pd.DataFrame({"0.5": [20.0, 15.0, 14.0], "0.7": [500.0, 80.0, 60.0], "2:4": [30.0, 25.0, 22.0]},
                         index=["magnitude", "wanda", "sparsegpt"])
    drift = pd.DataFrame({"method": ["wanda", "sparsegpt"], "sparsity": [0.6, 0.7], "ratio": [1.05, 0.9]})
    lines = unstructured_findings(table, drift, ["2:4"])
    assert lines[0].startswith("PPL(0.7)/PPL(0.5) per method") and "magnitude ×25.0" in lines[0]
    assert lines[1] == "At sparsity 0.7 (best first): sparsegpt 60.0, wanda 80.0, magnitude 500.0."
    assert "(sparsegpt) lead the mask-only ones" in lines[2] and "disagreement" not in lines[2]
    assert lines[3] == "Magnitude ranks 3 of 3 (last, as in the paper)."
    assert "×0.90 to ×1.05" in lines[4] and "furthest: sparsegpt at 0.7" in lines[4]
    assert unstructured_findings(table[["0.5"]], drift.iloc[0:0]) == []


def test_a_wrapper_recipe_is_keyed_by_its_base_method_version(tmp_path, monkeypatch):
    import dataclasses

    from mpt_utils.registry import METHOD_VERSIONS

    store = ResultsStore(tmp_path)
    protocol = GridSetup(model="tiny-llama", eval_data="embedded-wiki", calib_data="embedded-wiki")
    keys = {r: store.key(point_config(protocol, r)) for r in ("owl@0.5[base=wanda]", "owl@0.5[base=sparsegpt]")}
    monkeypatch.setitem(METHOD_VERSIONS, "wanda", dataclasses.replace(METHOD_VERSIONS["wanda"], version=99))
    assert store.key(point_config(protocol, "owl@0.5[base=wanda]")) != keys["owl@0.5[base=wanda]"]
    assert store.key(point_config(protocol, "owl@0.5[base=sparsegpt]")) == keys["owl@0.5[base=sparsegpt]"]
