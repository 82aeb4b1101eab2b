"""Sweeps on Ray: the same stored points as the local executor, skipped when stored, a killed
worker's point retried and never half-written, the dense reference computed once."""

from __future__ import annotations

import math

import pytest

from mpt_utils import distributed
from mpt_utils.combined.grid import GridBench, GridSetup, grid_point, point_config
from mpt_utils.combined.sweep import sweep
from mpt_utils.distributed import BenchSpec, has_ray, point_task, ray_cluster, run_points, task_resources
from mpt_utils.errors import MPTError
from mpt_utils.eval import paired as paired_module
from mpt_utils.store import ResultsStore
from mpt_utils.testing import CrashOnceLoader, TinyLoader

RECIPES = ["wanda@0.3", "wanda@0.5", "sparsegpt@0.5", "rtn:4bit"]
NEEDS_RAY = pytest.mark.skipif(not has_ray(), reason="ray is not importable (install the extra: pip install -e '.[ray]')")
TIMING = {"step_seconds", "quant_seconds"}  # wall times differ between runs; everything else must not
TIMING_KEYS = {"tokens_per_s", "seconds", "report", "config_hash"}


def _setup(corpus: str) -> GridSetup:
    return GridSetup(model="tiny-llama", eval_data=corpus, calib_data=corpus, n_calib=4, seqlen=32, max_windows=4,
                     seed=0, device="cpu")


def _comparable(rows: list[dict]) -> list[tuple]:
    out = []
    for r in rows:
        if r["metric"] in TIMING:
            continue
        items = []
        for k, v in sorted(r.items()):
            if k in TIMING_KEYS:
                continue
            items.append((k, "nan" if isinstance(v, float) and math.isnan(v) else v))
        out.append(tuple(items))
    return out


def _assert_same_points(a: list[list[dict]], b: list[list[dict]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert {r["config_hash"] for r in x} == {r["config_hash"] for r in y}
        cx, cy = _comparable(x), _comparable(y)
        assert [dict(r)["metric"] for r in cx] == [dict(r)["metric"] for r in cy]
        for rx, ry in zip(cx, cy):
            dx, dy = dict(rx), dict(ry)
            assert dx.keys() == dy.keys()
            for k in dx:
                if isinstance(dx[k], float):  # float32 rounding: a Ray worker runs torch on its own thread count
                    assert dx[k] == pytest.approx(dy[k], rel=1e-5, abs=1e-6), (dx["metric"], k)
                else:
                    assert dx[k] == dy[k], (dx["metric"], k)


def _files(store: ResultsStore) -> set[str]:
    return {p.name for p in store.points.iterdir()}


@pytest.fixture(scope="module")
def local_ray():
    if not has_ray():
        pytest.skip("ray is not importable (install the extra: pip install -e '.[ray]')")
    with ray_cluster(num_cpus=2, object_store_memory=200 * 2**20) as ray:  # a local node, no dashboard
        yield ray


@pytest.fixture(scope="module")
def local_points(tmp_path_factory, corpus):
    store = ResultsStore(tmp_path_factory.mktemp("local"))
    return store, run_points(store, GridBench(_setup(corpus), TinyLoader()), RECIPES)


def test_executor_and_resources_are_checked():
    with pytest.raises(MPTError, match="unknown executor"):
        distributed.check_executor("dask")
    assert task_resources("cuda", 0) == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert task_resources("cuda:0", 0, num_cpus=4) == {"num_cpus": 4.0, "num_gpus": 1.0}
    assert task_resources("cpu", 8) == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert task_resources(None, 2) == {"num_cpus": 1.0, "num_gpus": 1.0}  # the worker then picks CUDA
    assert task_resources(None, 0) == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_a_worker_adopts_the_shared_dense_reference_instead_of_recomputing_it(tmp_path, corpus, monkeypatch):
    setup = _setup(corpus)
    expected = grid_point(ResultsStore(tmp_path / "store"), GridBench(setup, TinyLoader()), "wanda@0.5")
    driver = GridBench(setup, TinyLoader())
    refs = distributed.reference_task(BenchSpec.of(driver), None)
    assert list(refs) == [corpus]

    def no_dense_pass(*_a, **_k):
        raise AssertionError("the dense reference was computed again in the worker")

    monkeypatch.setattr(paired_module, "dense_reference", no_dense_pass)
    rows = point_task(BenchSpec.of(driver), refs, "wanda@0.5", False)
    stored = ResultsStore(tmp_path / "driver").put(point_config(setup, "wanda@0.5"), rows)  # as the driver does
    _assert_same_points([stored], [expected])


@NEEDS_RAY
def test_a_ray_sweep_stores_the_points_of_the_local_executor(tmp_path, corpus, local_ray, local_points):
    local_store, local = local_points
    store = ResultsStore(tmp_path / "ray")
    bench = GridBench(_setup(corpus), TinyLoader())
    remote = run_points(store, bench, RECIPES, executor="ray", progress=True)
    _assert_same_points(remote, local)
    assert _files(store) == _files(local_store)  # same keys, one complete file per point, no temp file
    assert not bench.session.is_loaded  # the driver never loaded the model: workers did
    peak = next(r for r in remote[0] if r["metric"] == "peak_device_bytes")
    assert peak["value"] is None and peak["peak_memory"] == "n/a"  # CPU: no device counter

    # already stored points are read back by the driver; no task, no model
    def fail():
        raise AssertionError("a stored point was computed again")

    again = run_points(store, GridBench(_setup(corpus), fail), RECIPES, executor="ray")
    _assert_same_points(again, remote)

    # the sweep table through the same executor
    table = sweep(store, GridBench(_setup(corpus), fail), "wanda@{r}", [0.3, 0.5], executor="ray")
    assert list(table["ppl"]) == pytest.approx([next(r["value"] for r in p if r["metric"] == "ppl")
                                                for p in remote[:2]])


@NEEDS_RAY
def test_a_killed_worker_leaves_no_partial_point_and_its_retry_completes_it(tmp_path, corpus, local_ray,
                                                                           local_points):
    _, local = local_points
    marker = tmp_path / "crashed"
    store = ResultsStore(tmp_path / "ray")
    recipes = RECIPES[:2]
    rows = run_points(store, GridBench(_setup(corpus), CrashOnceLoader(marker=str(marker))), recipes,
                      executor="ray", max_retries=2)
    assert marker.exists()  # a worker did die in the middle of a point
    _assert_same_points(rows, local[:2])
    assert _files(store) == {f"{store.key(point_config(_setup(corpus), r))}.json" for r in recipes}


@NEEDS_RAY
def test_without_retries_the_killed_point_is_reported_and_absent(tmp_path, corpus, local_ray):
    marker = tmp_path / "crashed"
    store = ResultsStore(tmp_path / "ray")
    recipe = "wanda@0.5"
    with pytest.raises(MPTError, match=r"1 point\(s\) failed on Ray after 0 retries: wanda@0.5"):
        run_points(store, GridBench(_setup(corpus), CrashOnceLoader(marker=str(marker))), [recipe],
                   executor="ray", max_retries=0)
    assert marker.exists() and _files(store) == set()  # nothing written for the killed point, not even a temp file
