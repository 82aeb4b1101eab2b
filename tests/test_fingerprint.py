"""Content fingerprints: replacing a model or corpus at the same path changes the point's key."""

import hashlib
import os

import pytest

from mpt_utils import fingerprint
from mpt_utils.fingerprint import FingerprintCache, data_fingerprint, model_fingerprint
from mpt_utils.store import ResultsStore


def _rewrite(path, text):
    """Replace a file's content and make sure its mtime moves (coarse filesystem clocks)."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def _counting(monkeypatch):
    calls = []
    real = fingerprint.sha256_file

    def counted(path):
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(fingerprint, "sha256_file", counted)
    return calls


def test_replacing_a_corpus_file_recomputes_its_points(tmp_path):
    corpus = tmp_path / "corpus.txt"
    _rewrite(corpus, "first version of the corpus\n\nsecond paragraph")
    store = ResultsStore(tmp_path / "store")
    cfg = {"model": "tiny-llama", "method": "dense", "family": "dense", "data": str(corpus), "seed": 0}
    calls = []

    def compute():
        calls.append(1)
        return {"metric": "ppl", "value": float(len(calls))}

    assert store.get_or_compute(cfg, compute)[0]["value"] == 1.0
    assert store.get_or_compute(cfg, compute)[0]["value"] == 1.0 and len(calls) == 1
    _rewrite(corpus, "first version of the corpus\n\nsecond paragraph")  # same bytes, new mtime
    assert store.get_or_compute(cfg, compute)[0]["value"] == 1.0 and len(calls) == 1
    _rewrite(corpus, "an edited corpus\n\nat the same path")
    assert store.get_or_compute(cfg, compute)[0]["value"] == 2.0 and len(calls) == 2


def test_replacing_a_gguf_file_changes_the_key(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    store = ResultsStore(tmp_path / "store")
    cfg = {"model": str(gguf), "method": "dense", "data": "embedded-news"}
    first = store.key(cfg)
    assert store.inputs(cfg)["model"] == {str(gguf): model_fingerprint(str(gguf))}
    gguf.write_bytes(b"GGUF" + bytes(range(255, -1, -1)) * 4)  # same size, other weights
    os.utime(gguf, ns=(1, 1))
    assert store.key(cfg) != first


def test_replacing_a_saved_model_dir_changes_the_key(tmp_path, monkeypatch):
    from mpt_utils import models
    from mpt_utils.testing import tiny_model

    folder = tmp_path / "tiny-saved"
    tiny_model("llama", seed=0).model.save_pretrained(folder)
    (folder / "README.md").write_text("docs do not count")

    def no_loading(*args, **kwargs):
        raise AssertionError("fingerprinting must not load a model")

    monkeypatch.setattr(models, "load_model", no_loading)
    first = model_fingerprint(str(folder))
    assert first == model_fingerprint(str(folder))
    (folder / "README.md").write_text("edited docs")
    assert model_fingerprint(str(folder)) == first
    tiny_model("llama", seed=1).model.save_pretrained(folder)  # other weights, same path
    assert model_fingerprint(str(folder)) != first


def test_cache_hashes_each_file_once_across_sessions(tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    big = tmp_path / "weights.gguf"
    big.write_bytes(b"x" * 100_000)
    cache_file = tmp_path / "store" / ".fingerprints.json"
    first = FingerprintCache(cache_file).file_hash(big)
    assert FingerprintCache(cache_file).file_hash(big) == first  # a new session reads the JSON cache
    assert model_fingerprint(str(big), FingerprintCache(cache_file)) is not None
    assert len(calls) == 1
    big.write_bytes(b"y" * 100_000)
    os.utime(big, ns=(10**9, 10**9))
    assert FingerprintCache(cache_file).file_hash(big) != first
    assert len(calls) == 2


def test_damaged_cache_only_costs_rehashing(tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    f = tmp_path / "a.txt"
    f.write_text("text")
    cache_file = tmp_path / ".fingerprints.json"
    cache_file.write_bytes(b"\xff not json")
    digest = FingerprintCache(cache_file).file_hash(f)
    assert digest == hashlib.sha256(b"text").hexdigest() and len(calls) == 1
    assert FingerprintCache(cache_file).file_hash(f) == digest  # the cache was rewritten readable
    assert len(calls) == 1


def test_names_that_cannot_be_resolved_are_left_out(tmp_path):
    assert model_fingerprint("tiny-llama") == model_fingerprint("tiny-llama") != model_fingerprint("tiny-opt")
    assert model_fingerprint(str(tmp_path / "missing.gguf")) is None
    assert model_fingerprint("no-such-org/no-such-model-xyz") is None  # not cached, never downloaded
    assert data_fingerprint("downstream") is None
    assert data_fingerprint(str(tmp_path / "missing.txt")) is None
    assert data_fingerprint("wikitext2") not in (None, data_fingerprint("c4"))
    store = ResultsStore(tmp_path / "store")
    assert store.inputs({"model": "no-such-org/no-such-model-xyz", "data": str(tmp_path / "nope.txt")}) == {}


def test_embedded_corpus_is_fingerprinted_from_the_gensim_file():
    pytest.importorskip("gensim")
    from mpt_utils.data import embedded_corpus_file

    assert embedded_corpus_file("embedded-news").is_file()
    news = data_fingerprint("embedded-news")
    assert news is not None and news == data_fingerprint("embedded-news") != data_fingerprint("embedded-wiki")
