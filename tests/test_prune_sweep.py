"""Sweep runner: points stored as they finish, resumed from the store, dense statistics reused."""

import math

import pandas as pd
import pytest
import torch

from mpt_utils.prune.sweep import PruneSession, parse_method, sweep_points, unstructured_findings
from mpt_utils.store import ResultsStore
from mpt_utils.testing import tiny_model


def _session(store, mode="dense", loaded=None):
    return PruneSession("tiny-llama", store, calib_data="embedded-news", n_calib=2, seqlen=64,
                        eval_data=["embedded-news"], max_eval_windows=2, mode=mode,
                        loaded=loaded or tiny_model("llama"))


def test_sweep_points_and_method_labels():
    assert sweep_points([0.1, 0.5], ["2:4", "4:8"]) == [(0.1, None), (0.5, None), (0.5, "2:4"), (0.5, "4:8")]
    assert parse_method("owl:sparsegpt") == ("owl", {"base": "sparsegpt"})
    assert parse_method("wanda") == ("wanda", {})


def test_sweep_stores_each_point_reuses_stats_and_resumes(tmp_path, monkeypatch):
    store = ResultsStore(tmp_path / "store")
    session = _session(store)
    df = session.sweep(["wanda", "owl:wanda"], [0.3, 0.6], ["2:4"])
    ppl = df[df.metric == "ppl"]
    assert len(ppl) == 5  # owl has no 2:4 point
    assert ppl.value.map(math.isfinite).all()
    assert ppl.sparsity.round(2).tolist() == [0.3, 0.6, 0.5, 0.3, 0.6]
    assert df[df.pattern == "2:4"].nm_ok.all()
    assert len(list((tmp_path / "store" / "points").glob("*.json"))) == 5
    first_stats = session.stats
    session.point("wanda", 0.45)
    assert session.stats is first_stats  # one dense pass served every point

    fresh = _session(store)
    monkeypatch.setattr(fresh, "_compute", lambda cfg: pytest.fail("a stored point was recomputed"))
    again = fresh.sweep(["wanda", "owl:wanda"], [0.3, 0.6], ["2:4"])
    assert again[again.metric == "ppl"].value.tolist() == ppl.value.tolist()
    assert fresh.session.is_loaded and not fresh.session.built(("stats", "embedded-news", 2, 64, 0))


def test_sequential_mode_and_dense_restore(tmp_path):
    lm = tiny_model("llama")
    w0 = lm.model.model.layers[0].mlp.down_proj.weight.clone()
    session = _session(ResultsStore(tmp_path), mode="sequential", loaded=lm)
    rows = session.point("sparsegpt", 0.5)
    assert {r["prune_mode"] for r in rows} == {"sequential"}
    assert (lm.model.model.layers[0].mlp.down_proj.weight == w0).all()  # the model is dense again
    magnitude = session.point("magnitude", pattern="4:8")
    assert magnitude[0]["calib_data"] is None and magnitude[0]["nm_ok"]


def test_sequential_is_the_default_and_dense_is_the_labelled_shortcut(tmp_path):
    session = PruneSession("tiny-llama", ResultsStore(tmp_path), calib_data="embedded-news", n_calib=2, seqlen=64,
                           eval_data=["embedded-news"], max_eval_windows=2, loaded=tiny_model("llama"))
    assert session.mode == "sequential"
    rows = session.point("wanda", 0.5)
    assert {r["mode"] for r in rows} == {"sequential"} and {r["prune_mode"] for r in rows} == {"sequential"}
    dense = session.derive(mode="dense").point("wanda", 0.5)
    assert {r["prune_mode"] for r in dense} == {"dense-stats"}
    assert len(list(tmp_path.glob("points/*.json"))) == 2  # the two modes are two stored points


def test_owl_dense_scores_are_computed_once_per_session(tmp_path, monkeypatch):
    from mpt_utils.prune import engine

    calls = []
    real = engine.allocation_scores
    monkeypatch.setattr(engine, "allocation_scores", lambda *a, **k: calls.append(k) or real(*a, **k))
    session = _session(ResultsStore(tmp_path), mode="sequential")
    df = session.sweep(["owl:wanda"], [0.3, 0.6])
    assert len(calls) == 1 and "calib_ids" in calls[0]
    targets = df[df.metric == "sparsity"].block_targets.tolist()
    assert targets[0] != targets[1] and all(len(set(t)) > 1 for t in targets)
    fresh = tiny_model("llama")  # the cached scores give the same allocation as a fresh engine run
    from mpt_utils.prune import prune_model

    report = prune_model(fresh.model, "owl", 0.6, calib_ids=session.calib_ids, base="wanda")
    assert report.block_targets == pytest.approx(targets[1])


def test_dense_mode_dsnot_and_a_failed_point_leave_the_model_dense(tmp_path, monkeypatch):
    lm = tiny_model("llama")
    w0 = {n: p.clone() for n, p in lm.model.named_parameters()}
    session = _session(ResultsStore(tmp_path), mode="dense", loaded=lm)
    rows = session.point("dsnot:wanda", 0.6)  # DSnoT gets the windows' length with dense statistics
    assert rows[0]["prune_mode"] == "dense-stats" and math.isfinite(rows[0]["value"])
    from mpt_utils.eval.paired import PairedEvaluator

    def broken(*a, **k):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(PairedEvaluator, "rows", broken)
    with pytest.raises(RuntimeError):
        session.point("wanda", 0.7)
    assert all(torch.equal(p, w0[n]) for n, p in lm.model.named_parameters())


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
