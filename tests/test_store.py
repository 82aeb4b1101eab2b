import json

import pytest

from mpt_utils.store import ResultsStore, StoreWarning, config_hash, main


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


# -- damaged point files ---------------------------------------------------------------------------
BAD_POINTS = {
    "random bytes": bytes(range(256)) * 3,
    "a JSON list": b'[{"metric": "ppl", "value": 1.0}]',
    "no rows": b'{"config": {}, "config_hash": "x"}',
    "rows not objects": b'{"rows": [1, 2]}',
    "truncated JSON": b'{"rows": [{"metric": "ppl", ',
}


@pytest.mark.parametrize("kind", sorted(BAD_POINTS))
def test_unreadable_point_is_quarantined_and_recomputed(tmp_path, kind):
    store = ResultsStore(tmp_path)
    path = store.points / f"{store.key(_cfg(0.1))}.json"
    path.write_bytes(BAD_POINTS[kind])
    with pytest.warns(StoreWarning, match=rf"point file .*{path.name} is unreadable .*quarantine.*compute the point again"):
        rows = store.get_or_compute(_cfg(0.1), lambda: {"metric": "ppl", "value": 7.0})
    assert rows[0]["value"] == 7.0
    assert (store.quarantine_dir / path.name).read_bytes() == BAD_POINTS[kind]
    assert store.load(_cfg(0.1))[0]["value"] == 7.0  # the recomputed point replaced it


def test_frame_and_export_skip_bad_files_naming_them(tmp_path):
    store = ResultsStore(tmp_path)
    store.get_or_compute(_cfg(0.1), lambda: {"metric": "ppl", "value": 3.0})
    for name, content in (("aaaa.json", b"\x89PNG\r\n"), ("bbbb.json", b"[]"), ("cccc.json", b'{"rows": 5}')):
        (store.points / name).write_bytes(content)
    with pytest.warns(StoreWarning) as caught:
        df = store.frame()
    assert list(df["value"]) == [3.0]
    text = " ".join(str(w.message) for w in caught)
    assert all(n in text for n in ("aaaa.json", "bbbb.json", "cccc.json")) and "left it out of the table" in text
    assert sorted(p.name for p in store.quarantine_dir.iterdir()) == ["aaaa.json", "bbbb.json", "cccc.json"]
    (store.points / "aaaa.json").write_bytes(b"{}")  # a second bad file of the same name is kept too
    with pytest.warns(StoreWarning, match="no 'rows' list"):
        out = store.export_csv()
    assert "3.0" in out.read_text() and (store.quarantine_dir / "aaaa.1.json").exists()


def test_messages_say_what_is_wrong(tmp_path):
    from mpt_utils.store import BadPoint, read_point

    cases = {b"\xff\xfe": "not UTF-8 text: byte 0xff at offset 0", b"[1]": "JSON list instead of an object",
             b'{"a": 1}': "no 'rows' list", b'{"rows": [{}, "x"]}': "row 1 is a str, not an object",
             b"{": "not valid JSON"}
    for content, message in cases.items():
        (tmp_path / "p.json").write_bytes(content)
        with pytest.raises(BadPoint, match=message):
            read_point(tmp_path / "p.json")


# -- stale points ------------------------------------------------------------------------------------
def _corpus_cfg(corpus, method):
    return {"model": "tiny-llama", "method": method, "family": "test", "ratio": 0.5, "data": str(corpus)}


def test_stale_lists_and_drop_stale_removes_changed_points(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one corpus\n\nwith two paragraphs")
    store = ResultsStore(tmp_path / "store")
    store.get_or_compute(_corpus_cfg(corpus, "wanda"), lambda: {"metric": "ppl", "value": 1.0})
    store.get_or_compute(_cfg(0.1), lambda: {"metric": "ppl", "value": 2.0})
    assert store.stale().empty
    (store.points / "old.json").write_text(json.dumps({"config": _cfg(0.3), "rows": []}))  # no inputs stored
    corpus.write_text("a different corpus\n\nat the same path, longer")
    stale = store.stale().sort_values("file").reset_index(drop=True)
    assert list(stale.columns) == ["file", "method", "model", "reason"]
    assert len(stale) == 2
    changed = stale[stale.file != "old.json"].iloc[0]
    assert changed.method == "wanda" and changed.model == "tiny-llama"
    assert changed.reason == f"corpus {corpus} changed"
    assert "no recorded inputs" in stale[stale.file == "old.json"].reason.iloc[0]

    assert main(["--results", str(store.root), "list-stale"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"2 stale point(s) in {store.points}" and any("wanda" in line for line in lines)
    assert main(["--results", str(store.root), "drop-stale"]) == 0
    assert capsys.readouterr().out.strip() == f"dropped 2 stale point(s) from {store.points}"
    assert store.stale().empty and list(store.frame()["value"]) == [2.0]


def test_cli_rejects_a_folder_without_points(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--results", str(tmp_path / "nothing"), "list-stale"])
    assert exit_.value.code == 2 and "no results store" in capsys.readouterr().err
