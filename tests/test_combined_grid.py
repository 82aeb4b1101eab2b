"""Grid points: a recipe applied to a fresh copy of the dense model, scored and sized, stored once."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from mpt_utils.combined import grid as grid_module
from mpt_utils.combined.grid import GridBench, GridSetup, grid_point, metric, point_config
from mpt_utils.combined.sizes import model_sizes
from mpt_utils.data import calibration_windows
from mpt_utils.errors import MPTError
from mpt_utils.eval.paired import PairedEvaluator
from mpt_utils.native import has_llama_cpp
from mpt_utils.recipe import Recipe, apply_recipe
from mpt_utils.store import ResultsStore
from mpt_utils.testing import tiny_model

RECIPE = "svd@0.2 > wanda@0.5 > rtn:4bit"


@pytest.fixture(scope="module")
def loaded():
    return tiny_model("llama", seed=0)


def _setup(corpus: str) -> GridSetup:
    return GridSetup(model="tiny-llama", eval_data=corpus, calib_data=corpus, n_calib=4, seqlen=32, max_windows=4,
                     seed=0, device="cpu")


def _bench(setup: GridSetup, loaded, calls: list[int], **kwargs) -> GridBench:
    def loader():
        calls.append(1)
        return loaded

    return GridBench(setup, loader, **kwargs)


def test_grid_point_equals_the_recipe_by_hand_and_is_stored_once(tmp_path, corpus, loaded, monkeypatch):
    setup, store, calls = _setup(corpus), ResultsStore(tmp_path / "store"), []
    applied = []
    real_apply = grid_module.apply_recipe
    monkeypatch.setattr(grid_module, "apply_recipe", lambda *a, **k: applied.append(1) or real_apply(*a, **k))
    rows = grid_point(store, _bench(setup, loaded, calls), RECIPE)
    assert calls == [1] and applied == [1, 1, 1]  # one call per step

    # by hand: a fresh copy, the same calibration windows, the same evaluator
    model = copy.deepcopy(loaded.model)
    calib = calibration_windows(loaded.tokenizer, corpus, setup.n_calib, setup.seqlen, setup.seed)
    apply_recipe(model, RECIPE, calib)
    ev = PairedEvaluator("tiny-llama", loaded.tokenizer, setup.seqlen, setup.max_windows)
    ev.prepare(loaded.model, [corpus])
    hand = {r["metric"]: r for r in ev.rows(model, [corpus])}
    for name in ("ppl", "kl_mean"):
        assert metric(rows, name)["value"] == pytest.approx(hand[name]["value"], rel=1e-6)
    assert metric(rows, "ppl")["stderr"] == pytest.approx(hand["ppl"]["stderr"], rel=1e-6)
    sizes, dense = model_sizes(model), model_sizes(loaded.model)
    for name in ("nominal_bytes", "artifact_bytes", "sparse_bytes"):
        assert metric(rows, name)["value"] == pytest.approx(getattr(sizes, name))
    ratio = 1 - sizes.nominal_bytes / dense.nominal_bytes
    assert all(r["recipe"] == RECIPE and r["ratio"] == pytest.approx(ratio) and r["bits"] == 4 for r in rows)
    assert [r["step"] for r in rows if r["metric"] == "step_seconds"] == ["svd@0.2", "wanda@0.5", "rtn:4bit"]

    # a second call, on a fresh bench: read from the store, nothing loaded or applied
    again = grid_point(store, _bench(setup, loaded, calls), RECIPE)
    assert calls == [1] and applied == [1, 1, 1]
    assert [(r["metric"], r["value"]) for r in again] == [(r["metric"], r["value"]) for r in rows]


def test_a_kept_prefix_gives_the_points_of_recipes_applied_from_scratch(tmp_path, corpus, loaded, monkeypatch):
    recipes = ["svd@0.2 > wanda@0.5", "svd@0.2 > wanda@0.5 > rtn:4bit", "svd@0.2 > wanda@0.5 > rtn:3bit",
               "svd@0.2 > wanda@0.6 > rtn:4bit"]
    applied: list[str] = []
    real_apply = grid_module.apply_recipe
    monkeypatch.setattr(grid_module, "apply_recipe",
                        lambda model, recipe, *a, **k: applied.append(str(recipe)) or real_apply(model, recipe, *a, **k))
    setup = _setup(corpus)
    reused = grid_module.grid(ResultsStore(tmp_path / "a"), _bench(setup, loaded, [], keep_prefixes=2), recipes)
    # the 0.5 pruning ran once: the next two recipes started from it; two kept prefixes are the
    # last two used, so the last recipe starts again from the dense model
    assert applied == ["svd@0.2", "wanda@0.5", "rtn:4bit", "rtn:3bit", "svd@0.2", "wanda@0.6", "rtn:4bit"]
    scratch = grid_module.grid(ResultsStore(tmp_path / "b"), _bench(setup, loaded, [], keep_prefixes=0), recipes)
    assert len(applied) == 7 + 2 + 3 + 3 + 3
    pick = [(r["recipe"], r["metric"], r.get("value")) for r in reused if r["metric"] in ("ppl", "kl_mean", "nominal_bytes")]
    want = [(r["recipe"], r["metric"], r.get("value")) for r in scratch if r["metric"] in ("ppl", "kl_mean", "nominal_bytes")]
    assert len(pick) == 12
    for (ra, ma, va), (rb, mb, vb) in zip(pick, want):
        assert (ra, ma) == (rb, mb) and va == pytest.approx(vb, rel=1e-6)


def test_the_key_is_the_recipe_and_the_protocol(tmp_path, corpus):
    setup, store = _setup(corpus), ResultsStore(tmp_path / "store")
    cfg = point_config(setup, "svd@0.2 -> wanda@0.5 -> rtn:4bit")
    assert cfg["recipe"] == RECIPE and cfg["registry_method"] == ["svd", "wanda", "rtn"]
    assert {"model", "data", "calib_data", "n_calib", "seqlen", "max_windows", "seed"} <= set(cfg)
    assert "export" not in cfg and point_config(setup, "wanda@0.5 > gguf:Q8_0")["export"] == "f16"
    assert set(store.inputs(cfg)["methods"]) == {"svd", "wanda", "rtn"}  # a version bump recomputes the point
    more_calib = dataclasses.replace(setup, n_calib=8)
    assert store.key(cfg) == store.key(point_config(setup, RECIPE)) != store.key(point_config(more_calib, RECIPE))
    with pytest.raises(MPTError, match="work_dir"):
        grid_point(store, GridBench(setup), "wanda@0.5 > gguf:Q8_0", keep_files=True)


def test_calib_seqlen_enters_the_key_only_when_set(tmp_path, corpus, loaded):
    setup = GridSetup(model="tiny-llama", eval_data="embedded-wiki", calib_data="embedded-wiki", n_calib=4,
                      seqlen=32, max_windows=4, seed=0)
    # the protocol every stored grid point was keyed by before calib_seqlen existed
    assert setup.config() == {"model": "tiny-llama", "family": "combined", "data": "embedded-wiki",
                              "calib_data": "embedded-wiki", "seqlen": 32, "n_calib": 4, "max_windows": 4, "seed": 0,
                              "divergence_k": 64, "dense_dtype_bytes": 2}
    store = ResultsStore(tmp_path)
    key = store.key(point_config(setup, "wanda@0.5"))
    assert store.key(point_config(dataclasses.replace(setup, calib_seqlen=32), "wanda@0.5")) == key  # = seqlen
    short = dataclasses.replace(setup, calib_seqlen=16)
    assert short.config()["calib_seqlen"] == 16 and store.key(point_config(short, "wanda@0.5")) != key
    bench = GridBench(dataclasses.replace(_setup(corpus), calib_seqlen=16), lambda: loaded)
    assert tuple(bench.calib_ids().shape) == (4, 16)  # every calibrated step reads these windows


@pytest.mark.gguf
@pytest.mark.skipif(not has_llama_cpp(), reason="llama-cpp-python not installed")
def test_gguf_grid_point_is_the_quantized_file_scored_by_llama_cpp(tmp_path, corpus, loaded):
    from mpt_utils.quant.gguf.fileinfo import read_gguf

    setup, calls = _setup(corpus), []
    bench = _bench(setup, loaded, calls, work_dir=tmp_path / "files")
    rows = grid_point(ResultsStore(tmp_path / "store"), bench, "wanda@0.5 > gguf:Q8_0", keep_files=True)
    (path,) = (tmp_path / "files").glob("*-Q8_0.gguf")
    info = read_gguf(path)
    assert metric(rows, "artifact_bytes")["value"] == info.file_bytes
    assert metric(rows, "bits_per_weight")["value"] == pytest.approx(info.bits_per_weight)
    assert "Q8_0" in metric(rows, "bits_per_weight")["types"]
    # Q8_0 is near lossless: llama.cpp's score of the file is the torch model's within 2 %
    model = copy.deepcopy(loaded.model)
    apply_recipe(model, Recipe.parse("wanda@0.5"),
                 calibration_windows(loaded.tokenizer, corpus, setup.n_calib, setup.seqlen, setup.seed))
    ev = PairedEvaluator("tiny-llama", loaded.tokenizer, setup.seqlen, setup.max_windows, k=None)
    torch_ppl = ev.rows(model, [corpus])[0]["value"]
    assert metric(rows, "ppl")["value"] == pytest.approx(torch_ppl, rel=0.02)
    assert metric(rows, "kl_mean")["value"] > 0 and torch.isfinite(torch.tensor(metric(rows, "ppl")["stderr"]))
    # 8 nominal bits on half the weights; the file stores every zero at ~8.5 bits
    assert metric(rows, "compression_nominal")["value"] > metric(rows, "compression_artifact")["value"] > 0
