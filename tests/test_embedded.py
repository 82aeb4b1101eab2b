"""Integration: the embedded model loads offline, describes itself and has a sane dense PPL."""

import pytest

from mpt_utils.data import eval_ids
from mpt_utils.eval.perplexity import perplexity


@pytest.mark.integration
def test_embedded_model_loads_and_scores(embedded):
    info = embedded.info
    assert info.source == "embedded" and info.n_layers == 30 and info.hidden_size == 576
    assert 130e6 < info.n_params < 140e6 and info.dtype == "float32"
    res = perplexity(embedded.model, eval_ids(embedded.tokenizer, "embedded-wiki"), seqlen=256,
                     max_windows=4, progress=False)
    assert 5 < res.ppl < 60  # a working 135M model on Wikipedia prose, not a collapsed one


@pytest.mark.integration
def test_the_converted_gguf_is_cached_and_reads_back_the_same_model(tmp_path, monkeypatch):
    import torch

    from mpt_utils.models import embedded_path, gguf_cache_dir, load_model

    monkeypatch.setenv("MPT_MODEL_CACHE", str(tmp_path))
    converted = load_model("smollm2-135m", device="cpu")  # parses the GGUF and keeps the float model
    kept = gguf_cache_dir(embedded_path("smollm2-135m"), torch.float32)
    assert kept is not None and (kept / "complete").is_file() and kept.parent == tmp_path
    cached = load_model("smollm2-135m", device="cpu")  # read back from the cache
    a, b = converted.model.state_dict(), cached.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    text = "The capital of France is Paris; 3.5 kg of rice cost £4."
    assert converted.tokenizer(text).input_ids == cached.tokenizer(text).input_ids
    assert converted.info == cached.info
    monkeypatch.setenv("MPT_MODEL_CACHE", "off")
    assert gguf_cache_dir(embedded_path("smollm2-135m"), torch.float32) is None
