"""One session per model: every family's driver takes the model, windows, statistics and evaluator
from it, so a notebook running several drivers loads and calibrates once, and keys do not change."""

from __future__ import annotations

import pytest

from mpt_utils.combined.grid import GridSetup, metric, point_config
from mpt_utils.errors import MPTError
from mpt_utils.prune.structured.sweep import structured_sweep
from mpt_utils.quant.sweep import Setup, Workbench
from mpt_utils.session import Session
from mpt_utils.store import ResultsStore
from mpt_utils.testing import tiny_model


@pytest.fixture
def counted(tmp_path):
    """A session whose loader counts its calls, and its store."""
    calls: list[int] = []
    loaded = tiny_model("llama", seed=0)

    def loader():
        calls.append(1)
        return loaded

    store = ResultsStore(tmp_path / "store")
    return Session("tiny-llama", store, device="cpu", loader=loader), store, calls


def test_every_family_driver_shares_one_load_one_calibration_and_one_evaluator(counted, corpus, monkeypatch):
    from mpt_utils import data

    session, store, calls = counted
    drawn: list[tuple] = []
    real = data.calibration_windows
    monkeypatch.setattr(data, "calibration_windows", lambda *a: drawn.append(a[1:]) or real(*a))
    protocol = dict(calib_data=corpus, n_calib=4, seqlen=32, seed=0)

    bench = Workbench(Setup(model="tiny-llama", eval_data=corpus, max_windows=2, device="cpu", **protocol),
                      session=session)  # the GGUF ladder's bench
    grid = GridSetup(model="tiny-llama", eval_data=corpus, max_windows=2, device="cpu", **protocol)
    # pruning, structured pruning, quantization and low rank are recipe points
    structured_sweep(session, grid, ["shortgpt@0.25"], speed={"ratios": [0.25], "rounds": 1, "seqlen": 16})
    session.sweep(["wanda@0.5", "gptq:4bit/g32", "wanda@0.5 > rtn:4bit", "svd_llm@0.2[update=none]"], grid)

    assert calls == [1]  # one load for every driver
    assert drawn == [(corpus, 4, 32, 0)]  # one calibration draw
    assert session.paired(32, 2) is session.bench(grid).paired() is bench.paired()
    assert session.dense_stats(corpus, 4, 32, 0) is bench.dense_stats()  # one dense statistics pass


def test_the_recipe_point_is_the_grid_point_and_a_rerun_loads_nothing(counted, corpus):
    session, store, calls = counted
    grid = GridSetup(model="tiny-llama", eval_data=corpus, calib_data=corpus, n_calib=4, seqlen=32, max_windows=2,
                     seed=0, device="cpu")
    rows = session.sweep(["wanda@0.5", "wanda@0.5 > rtn:4bit"], grid)
    dense = session.dense_point(grid)
    assert metric(dense, "compression_nominal")["value"] == 0.0
    assert metric(dense, "kl_mean")["value"] == pytest.approx(0.0, abs=1e-6)
    assert metric(rows[:len(rows) // 2], "kl_mean")["value"] > 0  # the pruned model moved away from dense
    ppl = [r["value"] for r in rows if r["metric"] == "ppl"]
    assert store.has(point_config(grid, "wanda@0.5 > rtn:4bit"))  # stored under the grid's own key

    fresh_calls: list[int] = []
    fresh = Session("tiny-llama", store, loader=lambda: fresh_calls.append(1))
    again = fresh.sweep(["wanda@0.5", "wanda@0.5 > rtn:4bit"], grid)
    assert [r["value"] for r in again if r["metric"] == "ppl"] == ppl and fresh_calls == []


def test_in_place_drivers_restore_the_dense_weights_and_caches_can_be_dropped(counted, corpus):
    session, store, _ = counted
    before = {n: p.clone() for n, p in session.dense.named_parameters()}
    from mpt_utils.prune.sweep import dense_shortcut_point

    grid = GridSetup(model="tiny-llama", eval_data=corpus, calib_data=corpus, n_calib=4, seqlen=32, max_windows=2)
    session.point("sparsegpt@0.6", grid)
    dense_shortcut_point(session, grid, "sparsegpt", 0.6)
    assert all((p == before[n]).all() for n, p in session.dense.named_parameters())
    stats = session.dense_stats(corpus, 4, 32, 0)
    assert session.built(("stats", corpus, 4, 32, 0)) and session.seconds(("stats", corpus, 4, 32, 0)) >= 0
    session.forget(("stats", corpus, 4, 32, 0))
    assert not session.built(("stats", corpus, 4, 32, 0)) and session.dense_stats(corpus, 4, 32, 0) is not stats


def test_a_session_without_a_store_says_what_to_pass(corpus):
    session = Session("tiny-llama", loaded=tiny_model("llama"))
    grid = GridSetup(model="tiny-llama", eval_data=corpus, calib_data=corpus, n_calib=2, seqlen=32, max_windows=1)
    with pytest.raises(MPTError, match="no results store"):
        session.point("wanda@0.5", grid)
