"""KL divergence against a cached dense reference: identities, the lumped top-k bound, the cache,
the window-resampling comparison and the llama.cpp path."""

import copy
import math

import pytest
import torch

from mpt_utils.errors import MPTError
from mpt_utils.eval.divergence import (
    DenseReference,
    dense_reference,
    divergence,
    kl_exact,
    ordering_consistency,
    reference_dir,
    reference_key,
    windows_needed,
)
from mpt_utils.eval.perplexity import perplexity
from mpt_utils.native import has_llama_cpp
from mpt_utils.testing import tiny_model

SEQLEN = 64


def _sharp(lm_head: float = 1.0):
    """A tiny random llama with weights x8 (predictions far from uniform); `lm_head` sharpens the
    output further, to a real model's share of probability outside the top-32 (about 2 %)."""
    loaded = tiny_model("llama", seed=1)
    with torch.no_grad():
        for p in loaded.model.parameters():
            if p.ndim > 1:
                p.mul_(8)
        loaded.model.lm_head.weight.mul_(lm_head)
    return loaded


def _perturbed(model: torch.nn.Module, scale: float, seed: int = 1) -> torch.nn.Module:
    """A stand-in for a compressed model: every matrix plus `scale` x its std of Gaussian noise."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            if p.ndim > 1:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * scale)
    return out


def _ids(n_windows: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 258, (n_windows * SEQLEN,), generator=torch.Generator().manual_seed(seed))


def test_a_model_has_zero_divergence_from_itself():
    model = _sharp().model
    ref = dense_reference(model, _ids(), SEQLEN, k=16, progress=False)
    res = divergence(model, ref, batch_size=3, progress=False)
    assert res.n_windows == 4 and res.n_positions == 4 * (SEQLEN - 1)
    assert res.kl_mean == pytest.approx(0.0, abs=1e-6) and res.kl_max == pytest.approx(0.0, abs=1e-6)
    assert res.same_top == 1.0
    assert res.dp_mean == pytest.approx(0.0, abs=1e-7) and res.dp_rms == pytest.approx(0.0, abs=1e-7)
    assert res.nll_diff == pytest.approx(0.0, abs=1e-6)


def test_divergence_statistics_match_a_hand_computation():
    dense = _sharp(3.0).model
    comp = _perturbed(dense, 0.05)
    ids = _ids()
    ref = dense_reference(dense, ids, SEQLEN, k=32, progress=False)
    res = divergence(comp, ref, progress=False)
    windows = ids.view(4, SEQLEN)
    with torch.no_grad():
        logp = torch.log_softmax(dense(windows).logits[:, :-1].double(), -1)
        logq = torch.log_softmax(comp(windows).logits[:, :-1].double(), -1)
    target = windows[:, 1:, None]
    dp = logq.gather(-1, target).exp() - logp.gather(-1, target).exp()
    assert res.dp_mean == pytest.approx(float(dp.mean()), abs=1e-6)
    assert res.dp_rms == pytest.approx(float(dp.pow(2).mean().sqrt()), rel=1e-4)
    assert res.same_top == pytest.approx(float((logp.argmax(-1) == logq.argmax(-1)).double().mean()))
    assert 0 < res.same_top < 1 and res.kl_p50 <= res.kl_p90 <= res.kl_p99 <= res.kl_max
    # the compressed model's NLL is its perplexity on the same windows; the paired difference is exact
    ppl = perplexity(comp, ids, SEQLEN, progress=False)
    assert res.nll == pytest.approx(ppl.nll, rel=1e-5)
    assert res.window_nll == pytest.approx(ppl.window_nll, rel=1e-5)
    assert res.nll_diff == pytest.approx(ppl.nll - perplexity(dense, ids, SEQLEN, progress=False).nll, rel=1e-4)
    assert res.kl_se == pytest.approx(float(torch.tensor(res.window_kl).std() / 2), rel=1e-5)


def test_lumped_top_k_kl_is_a_lower_bound_with_the_stated_gap():
    dense = _sharp(3.0).model
    comp = _perturbed(dense, 0.05)
    ids = _ids()
    ref = dense_reference(dense, ids, SEQLEN, k=32, progress=False)
    res = divergence(comp, ref, progress=False)
    windows = ids.view(4, SEQLEN)
    with torch.no_grad():
        p_logits, q_logits = dense(windows).logits[:, :-1], comp(windows).logits[:, :-1]
    exact = kl_exact(p_logits, q_logits)
    from mpt_utils.eval.divergence import position_stats

    with torch.no_grad():
        lumped = position_stats(comp(windows).logits, ref.compact())["kl"].double()
    assert (lumped <= exact + 1e-6).all()  # never above the exact KL (data-processing inequality)
    # the gap is exactly p_R x KL of the two tail distributions conditioned on the rest R
    logp, logq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    tail = torch.ones_like(logp, dtype=torch.bool).scatter(-1, ref.top_ids.long(), False)
    p_r = logp.masked_fill(~tail, -math.inf).logsumexp(-1, keepdim=True)
    q_r = logq.masked_fill(~tail, -math.inf).logsumexp(-1, keepdim=True)
    cond_p, cond_q = (logp - p_r).masked_fill(~tail, -math.inf), (logq - q_r).masked_fill(~tail, 0.0)
    tail_kl = torch.where(tail, cond_p.exp() * (cond_p - cond_q), 0.0).sum(-1)
    assert torch.allclose(exact - lumped, p_r.squeeze(-1).exp() * tail_kl, atol=1e-5)
    # the documented empirical tightness: with ~2 % of the mass outside the top-32, >= 95 % of the KL
    assert 0.005 < res.rest_mass < 0.05
    assert res.kl_mean == pytest.approx(float(lumped.mean()), rel=1e-5)
    assert 0.95 * float(exact.mean()) <= res.kl_mean <= float(exact.mean())


def test_dense_reference_is_cached_once_and_reused(tmp_path, monkeypatch):
    from mpt_utils.store import ResultsStore

    model = _sharp().model
    store = ResultsStore(tmp_path / "results")
    key = reference_key("tiny-llama", "embedded-news", SEQLEN, 3, k=16, dtype="float32")
    assert key is not None
    ids = _ids(5)
    first = dense_reference(model, ids, SEQLEN, 3, k=16, cache_dir=reference_dir(store), key=key, progress=False)
    path = tmp_path / "results" / "dense_logits" / f"{key}.pt"
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    stamp = path.stat().st_mtime_ns

    def no_forward(*args, **kwargs):
        raise AssertionError("the cached reference must not run the model")

    monkeypatch.setattr(model, "forward", no_forward)
    again = dense_reference(model, ids, SEQLEN, 3, k=16, cache_dir=reference_dir(store), key=key, progress=False)
    assert path.stat().st_mtime_ns == stamp
    for name in ("windows", "top_ids", "top_logp", "rest_logp", "target_logp"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert again.key == key and again.k == 16 and again.vocab_size == 258
    monkeypatch.undo()
    # a file made from other windows is never used for these: recomputed, with a warning
    with pytest.warns(UserWarning, match="other windows"):
        other = dense_reference(model, _ids(5, seed=9), SEQLEN, 3, k=16, cache_dir=reference_dir(store), key=key,
                                progress=False)
    assert not torch.equal(other.windows, first.windows)


def test_reference_key_names_everything_that_changes_the_logits():
    base = reference_key("tiny-llama", "embedded-news", 64, 8, k=32)
    assert base is not None
    others = [reference_key("tiny-qwen2", "embedded-news", 64, 8, k=32),
              reference_key("tiny-llama", "embedded-wiki", 64, 8, k=32),
              reference_key("tiny-llama", "embedded-news", 128, 8, k=32),
              reference_key("tiny-llama", "embedded-news", 64, 16, k=32),
              reference_key("tiny-llama", "embedded-news", 64, 8, k=64),
              reference_key("tiny-llama", "embedded-news", 64, 8, k=32, dtype="float16")]
    assert len({base, *others}) == 7
    assert reference_key("/no/such/model/dir", "embedded-news", 64, 8) is None  # nothing to fingerprint


def test_a_damaged_cache_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a tensor file")
    with pytest.raises(MPTError, match="not a readable dense reference"):
        DenseReference.load(bad)


def test_rows_are_tidy():
    model = _sharp().model
    ref = dense_reference(model, _ids(), SEQLEN, k=8, progress=False)
    rows = divergence(_perturbed(model, 0.05), ref, progress=False).rows(data="random", method="noise")
    metrics = [r["metric"] for r in rows]
    assert len(metrics) == len(set(metrics))
    assert {"kl_mean", "kl_p50", "kl_p90", "kl_p99", "kl_max", "same_top", "dp_mean", "dp_rms", "nll_diff"} <= set(
        metrics)
    by = {r["metric"]: r for r in rows}
    assert by["kl_mean"]["stderr"] > 0 and "stderr" not in by["kl_p99"]
    assert all(r["data"] == "random" and r["top_k"] == 8 and r["n_windows"] == 4 for r in rows)


def test_a_model_with_another_vocabulary_is_refused():
    ref = dense_reference(_sharp().model, _ids(2), SEQLEN, k=8, progress=False)
    with pytest.raises(MPTError, match="output tokens"):
        divergence(tiny_model("llama", seed=0, vocab_size=300).model, ref, progress=False)


def test_ordering_consistency_is_seeded_and_separates_clear_differences():
    dense = _sharp(3.0).model
    ref = dense_reference(dense, _ids(8), SEQLEN, k=16, progress=False)
    near = divergence(_perturbed(dense, 0.02), ref, progress=False)
    far = divergence(_perturbed(dense, 0.2), ref, progress=False)
    table = ordering_consistency(near, far, window_counts=[1, 2, 4, 8], n_boot=300, seed=3)
    assert table.equals(ordering_consistency(near, far, window_counts=[1, 2, 4, 8], n_boot=300, seed=3))
    assert set(table["metric"]) == {"ppl", "kl"} and table["consistent"].between(0, 1).all()
    kl = table[table["metric"] == "kl"].set_index("n_windows")["consistent"]
    assert kl[8] == 1.0 and (table[table["metric"] == "kl"]["full_diff"] < 0).all()
    assert windows_needed(table)["kl"] is not None and windows_needed(table)["kl"] <= 8
    unpaired = ordering_consistency(near, far, window_counts=[1, 2, 4, 8], n_boot=300, seed=3, paired=False)
    assert unpaired["full_diff"].tolist() == table["full_diff"].tolist()
    assert unpaired["consistent"].between(0, 1).all() and not unpaired["consistent"].equals(table["consistent"])
    elsewhere = dense_reference(dense, _ids(8, seed=5), SEQLEN, k=16, progress=False)
    other = divergence(_perturbed(dense, 0.1), elsewhere, progress=False)
    with pytest.raises(MPTError, match="different windows"):
        ordering_consistency(near, other)


def test_windows_needed_takes_the_first_count_from_which_all_pass():
    import pandas as pd

    table = pd.DataFrame({"n_windows": [1, 2, 4, 8] * 2, "metric": ["kl"] * 4 + ["ppl"] * 4,
                          "consistent": [0.9, 0.96, 0.94, 0.99, 0.5, 0.6, 0.7, 0.8]})
    assert windows_needed(table, 0.95) == {"kl": 8, "ppl": None}


@pytest.mark.gguf
@pytest.mark.skipif(not has_llama_cpp(), reason="llama-cpp-python not installed")
def test_llama_cpp_divergence_of_exported_and_quantized_ggufs(tmp_path):
    from mpt_utils.eval.llamacpp import llamacpp_perplexity
    from mpt_utils.quant.gguf import export_gguf, quantize_gguf

    loaded = _sharp()
    f32 = export_gguf(loaded.model, loaded.tokenizer, tmp_path / "f32.gguf")
    q4 = tmp_path / "q4_0.gguf"
    quantize_gguf(f32, q4, "Q4_0")
    ids = _ids(3)
    ref = dense_reference(loaded.model, ids, SEQLEN, k=32, progress=False)
    same = divergence(f32, ref, kv_type="f32", progress=False)
    assert same.kl_mean < 1e-4 and same.same_top > 0.99 and abs(same.dp_mean) < 1e-5
    quant = divergence(str(q4), ref, kv_type="f32", progress=False)
    assert quant.kl_mean > 100 * max(same.kl_mean, 1e-7) and quant.same_top < same.same_top
    # both evaluators give the same per-window NLLs, so the same standard error
    torch_ppl = perplexity(loaded.model, ids, SEQLEN, progress=False)
    gguf_ppl = llamacpp_perplexity(f32, ids, SEQLEN, kv_type="f32", progress=False)
    assert gguf_ppl.window_nll == pytest.approx(torch_ppl.window_nll, rel=1e-3)
    assert gguf_ppl.nll_se == pytest.approx(torch_ppl.nll_se, rel=1e-2)
    assert same.window_nll == pytest.approx(torch_ppl.window_nll, rel=1e-3)
