"""compress_to_target on a tiny model: synthetic curves with known PTPs -> a safe plan, built, carded."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from mpt_utils.combined import figures as cf
from mpt_utils.combined.build import compress_to_target, curves_from_rows, main
from mpt_utils.combined.card import read_card
from mpt_utils.combined.grid import metric
from mpt_utils.errors import MPTError
from mpt_utils.native import has_llama_cpp
from mpt_utils.recipe import Recipe
from mpt_utils.store import ResultsStore

MODEL = "tiny-llama"
DENSE = 266.0  # about the tiny random model's PPL (its byte vocabulary has 258 tokens)
BITS = np.array([16, 12, 10, 8, 7, 6, 5, 4.5, 4, 3.5, 3, 2.5, 2])
PROTOCOL = dict(seqlen=32, n_calib=4, max_windows=2, seed=0, device="cpu")


def eq5(s, s0, a, alpha, beta=8.0, gamma=30.0):
    """The continuous eq. 5 on top of DENSE: a power law up to s0, then a collapse."""
    s = np.asarray(s, float)
    at = a * s0**alpha + DENSE
    return np.where(s <= s0, a * s**alpha + DENSE, at * np.exp(beta * (s - s0) + gamma * (s - s0) ** 2))


def curve_rows(data: str, quant: str = "rtn") -> list[dict]:
    """Notebook-02-like Wanda rows (PTP at sparsity 0.5) and notebook-03-like quant rows (PTP at 4 bits)."""
    rows = []
    for s in np.linspace(0, 0.8, 17):
        y = float(eq5(s, 0.5, 40.0, 2.0))
        common = dict(model=MODEL, family="unstructured", method="wanda", ratio=s, data=data,
                      config_hash=f"prune{s:.3f}", seqlen=32, n_windows=2)
        rows.append({**common, "metric": "ppl", "value": y, "stderr": 0.01 * y, "sparsity": s,
                     "pattern": "unstructured"})
        rows.append({**common, "metric": "kl_mean", "value": 0.1 * s**2, "stderr": 1e-3})
    for b in BITS:
        y = float(eq5(1 - b / 16, 0.75, 4.0, 2.0))
        extra = {"scheme": {16: "F16", 8: "Q8_0", 6: "Q6_K", 5: "Q5_K_M", 4: "Q4_K_M", 3: "Q3_K_M", 2: "Q2_K"}.get(int(b))}
        if quant == "gguf" and (b != int(b) or extra["scheme"] is None):
            continue
        rows.append(dict(model=MODEL, family="quant", method=quant, bits=float(b), ratio=1 - b / 16, data=data,
                         metric="ppl", value=y, stderr=0.01 * y, config_hash=f"quant{b}", seqlen=32, n_windows=2,
                         **(extra if quant == "gguf" else {})))
    return rows


def build(tmp_path, corpus, **kwargs):
    args = dict(eval_data=corpus, calib_data=corpus, out_dir=tmp_path / "out", results=tmp_path / "store", **PROTOCOL)
    return compress_to_target(MODEL, **{**args, **kwargs})


def test_curves_from_notebook_rows_keep_one_protocol_and_the_dense_anchor(corpus):
    rows = curve_rows(corpus)
    rows = [r for r in rows if not (r["family"] == "unstructured" and r["ratio"] == 0)]  # no ratio-0 point ...
    rows.append(dict(model=MODEL, family="dense", method="dense", ratio=0.0, data=corpus, metric="ppl", value=DENSE,
                     stderr=1.0, config_hash="dense", seqlen=32, n_windows=2))  # ... the dense point anchors it
    rows.append(dict(model=MODEL, family="unstructured", method="wanda", ratio=0.5, data=corpus, metric="ppl",
                     value=1.0, stderr=0.1, pattern="2:4", config_hash="nm", seqlen=32, n_windows=2))  # N:M: not a curve
    rows.append(dict(model=MODEL, family="unstructured", method="wanda", ratio=0.3, data=corpus, metric="ppl",
                     value=2.0, stderr=0.1, pattern="unstructured", config_hash="other", seqlen=64, n_windows=2))
    curves, why = curves_from_rows(pd.DataFrame(rows), MODEL, corpus)
    prune = curves["prune"]
    assert prune.method == "wanda" and prune.anchored and prune.x[0] == 0 and prune.y[0] == DENSE
    assert prune.x.size == 17 and 1.0 not in prune.y and 2.0 not in prune.y  # one protocol, no N:M point
    assert curves["quant"].method == "rtn" and curves["quant"].x[0] == 16 and curves["quant"].axis == "bits"
    assert "lowrank" in why and "lowrank" not in curves
    assert curves_from_rows(pd.DataFrame(rows), "tiny-qwen2", corpus)[0] == {}


def test_the_build_is_a_safe_plan_whose_card_is_the_stored_point(tmp_path, corpus):
    built = build(tmp_path, corpus, curves=curve_rows(corpus), epsilon=20.0, methods={"quant": "rtn"})
    plan, recipe, gguf_path, card = built
    assert gguf_path is None and [s.method for s in recipe] == ["wanda", "rtn"]
    bounds = {d.name: d for d in built.dims}
    assert all(d.bound == "s0_ci_low" for d in built.dims)
    assert bounds["prune"].ptp <= 0.5 + 0.01 and bounds["quant"].ptp <= 0.75 + 0.01  # conservative: not past the knee
    prune, quant = recipe.steps
    assert 0 < prune.setting < bounds["prune"].ptp and prune.setting <= plan.ratios["prune"]
    assert 16 * (1 - bounds["quant"].ptp) < quant.setting.bits < 16
    assert plan.predicted - plan.base <= 20.0 + 1e-9
    assert card.inside_safe_zone and all(m.margin > 0 for m in card.margins)

    # every number on the card is the stored point's
    stored = ResultsStore(tmp_path / "store").frame()
    point = stored[stored.recipe == str(recipe)].to_dict("records")
    assert card.ppl == metric(point, "ppl")["value"] and card.quality["ppl_se"] == metric(point, "ppl")["stderr"]
    assert card.kl == metric(point, "kl_mean")["value"] and card.quality["kl_se"] == metric(point, "kl_mean")["stderr"]
    for name in ("nominal_bytes", "artifact_bytes", "sparse_bytes", "compression_nominal"):
        assert card.sizes[name] == metric(point, name)["value"]
    assert card.quality["dense_ppl"] == metric(built.dense, "ppl")["value"]
    written = read_card(built.card_paths[1])
    assert written["recipe"] == str(recipe) and written["quality"]["ppl"] == card.ppl
    assert written["inside_safe_zone"] is True and not written["speed"]["side_by_side"]
    text = built.card_paths[0].read_text()
    assert str(recipe) in text and "not timed side by side" in text
    assert set(built.comparison().metric) == {"PPL", "KL to dense"} and str(recipe) in built.summary()

    # again: read back, nothing computed
    before = sorted(p.name for p in (tmp_path / "store" / "points").iterdir())
    again = build(tmp_path, corpus, curves=curve_rows(corpus), epsilon=20.0, methods={"quant": "rtn"})
    assert again.recipe == recipe and again.card.ppl == card.ppl
    assert sorted(p.name for p in (tmp_path / "store" / "points").iterdir()) == before


def test_an_unreachable_epsilon_is_one_error_naming_the_closest_plan(tmp_path, corpus):
    with pytest.raises(MPTError, match="closest feasible plan: .*as a recipe: ") as info:
        build(tmp_path, corpus, curves=curve_rows(corpus), epsilon=1e-6)
    closest = Recipe.parse(info.value.closest_recipe)
    assert len(closest) >= 1 and "raise epsilon" in info.value.fix
    assert info.value.closest.predicted - info.value.closest.base > 1e-6


def test_missing_curves_are_one_error_naming_the_notebook_before_any_work(tmp_path, corpus):
    rows = [r for r in curve_rows(corpus) if r["family"] == "unstructured"]
    with pytest.raises(MPTError, match=r"(?s)for lowrank .*05_low_rank"):
        build(tmp_path, corpus, curves=rows, epsilon=1.0, dimensions=["prune", "lowrank"])
    with pytest.raises(MPTError, match="02_unstructured_pruning"):
        build(tmp_path, corpus, curves=[], epsilon=1.0)
    assert not list((tmp_path / "store" / "points").glob("*.json"))  # nothing was measured


def test_the_command_line_reports_a_missing_store(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--model", MODEL, "--epsilon", "1", "--results", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert info.value.code == 2 and "no results store" in capsys.readouterr().err


@pytest.mark.gguf
@pytest.mark.skipif(not has_llama_cpp(), reason="llama-cpp-python not installed")
def test_a_gguf_plan_keeps_its_file_times_it_and_rebuilds_it_when_removed(tmp_path, corpus):
    built = build(tmp_path, corpus, curves=curve_rows(corpus, quant="gguf"), epsilon=20.0, speed_rounds=1)
    assert built.recipe.gguf_scheme is not None and built.gguf_path.exists()
    card = built.card
    size = built.gguf_path.stat().st_size
    assert card.file_bytes == size == card.sizes["artifact_bytes"] == metric(built.point, "artifact_bytes")["value"]
    assert built.card_paths[0].parent == built.gguf_path.parent  # the card sits next to the file
    assert card.speed["side_by_side"] and card.speed["tokens_per_s"] > 0 and card.speed["dense_tokens_per_s"] > 0
    points = sorted((tmp_path / "store" / "points").iterdir())
    built.gguf_path.unlink()
    again = build(tmp_path, corpus, curves=curve_rows(corpus, quant="gguf"), epsilon=20.0, speed_rounds=1)
    assert again.gguf_path.stat().st_size == size and sorted((tmp_path / "store" / "points").iterdir()) == points


# -- figures: the compression limit on a synthetic grid with known transitions --------------------------
def synthetic_points() -> pd.DataFrame:
    rows = []
    for p in np.linspace(0, 0.8, 9):
        for b in [16, 8, 6, 5, 4, 3.5, 3, 2.5, 2]:
            q = 1 - b / 16
            y = float(eq5(p, 0.5, 40.0, 2.0) + eq5(q, 0.75, 4.0, 2.0) - DENSE)
            kept = 0.1 + 0.9 * (1 - p) * (1 - q)
            real = 0.12 + 0.93 * (1 - q)  # a file stores the zeros: only the bits shrink it
            rows.append(dict(recipe=f"p{p:g}b{b:g}", lowrank=0.0, prune=p, quant=q, bits=b, ppl=y, ppl_se=0.01 * y,
                             compression_nominal=1 - kept, kept_nominal=kept, compression_artifact=1 - real,
                             kept_artifact=real, compression_sparse=math.nan, kept_sparse=math.nan))
    return pd.DataFrame(rows)


def test_the_compression_limit_is_where_the_transition_lines_meet():
    points = synthetic_points()
    lines = cf.transition_lines(points, "prune", "quant")
    ptp = lines[lines.kind == "ptp"]
    assert len(ptp) >= 10 and set(ptp.along) == {"prune", "quant"}
    limit = cf.compression_limit(points, "prune", "quant", lines)
    assert limit.found and not limit.open and len(limit.binding) == 2
    assert limit.at["prune"] == pytest.approx(0.5, abs=0.02) and limit.at["quant"] == pytest.approx(0.75, abs=0.02)
    value, low, high = limit.compression["nominal"]
    assert low <= value <= high and value == pytest.approx(1 - (0.1 + 0.9 * 0.5 * 0.25), abs=0.02)
    real = limit.compression["artifact"][0]
    assert real == pytest.approx(1 - (0.12 + 0.93 * 0.25), abs=0.02) and real < value
    assert "where the two transition lines meet" in limit.text()


def test_frontier_grid_recipes_and_the_size_conclusion():
    points = synthetic_points()
    front = cf.frontier(points, "nominal")
    assert (np.diff(front.kept_nominal) > 0).all() and (np.diff(front.ppl) < 0).all()
    best = cf.best_within(points, 0.3, "nominal")
    assert best.kept_nominal <= 0.3 and best.ppl == points[points.kept_nominal <= 0.3].ppl.min()
    text = cf.size_conclusion(points, 0.10)["text"]
    assert "no measured configuration reaches 10%" in text and "real artifact" in text
    assert cf.grid_recipes("wanda", [0, 0.5], "gguf", ["F16", "Q4_K_M"]) == [
        "gguf:F16", "gguf:Q4_K_M", "wanda@0.5 > gguf:F16", "wanda@0.5 > gguf:Q4_K_M"]
    assert cf.grid_recipes("sparsegpt", [0, 0.5], "gptq", [16, 4]) == [
        "dense", "gptq:4bit", "sparsegpt@0.5", "sparsegpt@0.5 > gptq:4bit"]
    assert cf.with_options(["asvd@0.05 > admm@0.3 > gguf:Q3_K_M"], {"asvd": {"granularity": "part"}}) == [
        "asvd@0.05[granularity=part] > admm@0.3 > gguf:Q3_K_M"]


def test_recipe_points_make_the_curve_and_the_dense_statistics_shortcut_never_does(corpus):
    # notebook 02 stores its sweep as recipe points (no calibration column in their rows) beside the
    # dense-statistics shortcut (family "unstructured", mode "dense", its calibration named)
    rows = [dict(model=MODEL, family="combined", method="recipe", recipe="dense", data=corpus, metric="ppl",
                 value=DENSE, stderr=1.0, config_hash="dense", seqlen=32, n_windows=2)]
    for s in (0.2, 0.4, 0.6):
        rows.append(dict(model=MODEL, family="combined", method="recipe", recipe=f"wanda@{s}", data=corpus,
                         metric="ppl", value=float(eq5(s, 0.5, 40.0, 2.0)), stderr=1.0, config_hash=f"w{s}",
                         seqlen=32, n_windows=2))
    for s in (0.3, 0.5, 0.7, 0.8):
        rows.append(dict(model=MODEL, family="unstructured", method="wanda", ratio=s, sparsity=s, data=corpus,
                         metric="ppl", value=1.0, stderr=0.1, pattern="unstructured", mode="dense",
                         calib_data=corpus, config_hash=f"shortcut{s}", seqlen=32, n_windows=2))
    curves, _ = curves_from_rows(pd.DataFrame(rows), MODEL, corpus, calib_data=corpus)
    prune = curves["prune"]
    assert list(prune.x) == [0.0, 0.2, 0.4, 0.6] and 1.0 not in prune.y and prune.source == "grid points"
