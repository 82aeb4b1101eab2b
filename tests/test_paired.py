"""The evaluator every sweep scores points with: perplexity and the paired KL from one pass."""

import copy

import pytest
import torch

from mpt_utils.errors import MPTError
from mpt_utils.eval.paired import PairedEvaluator
from mpt_utils.eval.perplexity import perplexity_rows


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 40 + "a stitch in time saves nine. " * 40)
    return str(path)


def _metrics(rows):
    return {r["metric"]: r for r in rows}


def test_dense_model_scores_zero_divergence_and_the_same_perplexity(tiny, corpus):
    ev = PairedEvaluator("tiny-llama", tiny.tokenizer, 64, 4)
    ev.prepare(tiny.model, [corpus])
    rows = _metrics(ev.rows(tiny.model, [corpus]))
    plain = perplexity_rows(tiny.model, tiny.tokenizer, [corpus], seqlen=64, max_windows=4, progress=False)[0]
    assert rows["ppl"]["value"] == pytest.approx(plain["value"], rel=1e-5)
    assert rows["ppl"]["stderr"] == pytest.approx(plain["stderr"], rel=1e-3)
    assert rows["ppl"]["n_windows"] == plain["n_windows"] == 4
    assert rows["kl_mean"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert rows["same_top"]["value"] == 1.0


def test_a_damaged_model_diverges_and_its_perplexity_matches_the_plain_evaluator(tiny, corpus):
    ev = PairedEvaluator("tiny-llama", tiny.tokenizer, 64, 4)
    ev.prepare(tiny.model, [corpus])
    damaged = copy.deepcopy(tiny.model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in damaged.parameters():  # a sharp, then perturbed, output distribution
            p.mul_(4.0).add_(2.0 * p.std() * torch.randn_like(p))
    rows = _metrics(ev.rows(damaged, [corpus], extra_tag="x"))
    plain = perplexity_rows(damaged, tiny.tokenizer, [corpus], seqlen=64, max_windows=4, progress=False)[0]
    assert rows["ppl"]["value"] == pytest.approx(plain["value"], rel=1e-5)
    assert rows["kl_mean"]["value"] > 0.05 and rows["kl_mean"]["stderr"] > 0
    assert rows["same_top"]["value"] < 1.0
    assert all(r["extra_tag"] == "x" and r["data"] == corpus for r in rows.values())


def test_without_a_reference_only_perplexity_and_a_gguf_needs_one(tiny, corpus):
    ev = PairedEvaluator("tiny-llama", tiny.tokenizer, 64, 2, k=None)
    ev.prepare(tiny.model, [corpus])  # k=None: nothing to prepare
    assert [r["metric"] for r in ev.rows(tiny.model, [corpus])] == ["ppl"]
    with pytest.raises(MPTError, match="no dense reference"):
        ev.rows("model.gguf", [corpus])


def test_the_dense_reference_is_cached_under_the_store_folder_given_as_a_path(tiny, corpus, tmp_path, monkeypatch):
    import mpt_utils.eval.paired as paired

    monkeypatch.setattr(paired, "reference_key", lambda *a, **k: "fixedkey")
    root = tmp_path / "store"
    ev = PairedEvaluator("tiny-llama", tiny.tokenizer, 64, 2, store_root=root)
    ev.prepare(tiny.model, [corpus])
    assert (root / "dense_logits" / "fixedkey.pt").is_file()
