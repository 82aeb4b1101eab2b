import pytest

from mpt_utils.store import ResultsStore, config_hash


def _cfg(ratio):
    return {"model": "tiny", "method": "m", "family": "test", "ratio": ratio, "seed": 0}


def test_config_hash_is_stable_and_order_free():
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})
    assert config_hash(_cfg(0.1)) != config_hash(_cfg(0.2))


def test_get_or_compute_skips_finished_points(tmp_path):
    store = ResultsStore(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"metric": "ppl", "value": 12.5}

    rows = store.get_or_compute(_cfg(0.1), compute)
    again = store.get_or_compute(_cfg(0.1), compute)
    assert len(calls) == 1
    assert rows[0]["value"] == again[0]["value"] == 12.5
    assert rows[0]["ratio"] == 0.1 and rows[0]["config_hash"] == config_hash(_cfg(0.1))


def test_sweep_resumes_after_a_crash(tmp_path):
    store = ResultsStore(tmp_path)
    done = []

    def sweep(crash_at=None):
        for r in (0.1, 0.2, 0.3, 0.4):
            def compute(r=r):
                if r == crash_at:
                    raise KeyboardInterrupt("killed")
                done.append(r)
                return [{"metric": "ppl", "value": 10 + r}, {"metric": "sparsity", "value": r}]
            store.get_or_compute(_cfg(r), compute)

    with pytest.raises(KeyboardInterrupt):
        sweep(crash_at=0.3)
    # a half-written temp file from the kill must not break reading
    (store.points / ".deadbeef.json.tmp").write_text("{partial")
    assert sorted(store.frame()["ratio"].unique()) == [0.1, 0.2]
    sweep()
    assert done == [0.1, 0.2, 0.3, 0.4]  # 0.1 and 0.2 were not recomputed
    df = store.frame(metric="ppl")
    assert len(df) == 4 and set(df.columns) >= {"model", "method", "ratio", "metric", "value", "config_hash"}


def test_infinite_values_survive_round_trip(tmp_path):
    store = ResultsStore(tmp_path)
    store.get_or_compute(_cfg(0.9), lambda: {"metric": "ppl", "value": float("inf")})
    assert store.frame()["value"].iloc[0] == float("inf")
