"""The dense baseline is the empty recipe's point: the plain perplexity, read back without loading."""

import pytest
import torch

from mpt_utils.baseline import dense_baseline
from mpt_utils.eval.perplexity import perplexity
from mpt_utils.session import Session
from mpt_utils.store import ResultsStore
from mpt_utils.testing import tiny_model


@pytest.fixture
def corpus(tmp_path):
    rng = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north"]
    text = "\n\n".join(" ".join(words[i] for i in torch.randint(0, 8, (40,), generator=rng).tolist()) + "."
                       for _ in range(40))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return str(path)


def test_dense_baseline_is_the_plain_perplexity_and_resumes_without_loading(tmp_path, corpus):
    loaded, loads = tiny_model("llama"), []
    store = ResultsStore(tmp_path / "store")
    session = Session("tiny-llama", store, device="cpu", loader=lambda: loads.append(1) or loaded)
    rows = dense_baseline(session, [corpus], seqlen=32, max_windows=2, device="cpu")
    ids = session.eval_ids(corpus)
    by_hand = perplexity(loaded.model, ids, seqlen=32, max_windows=2, progress=False)
    ppl = rows[rows.metric == "ppl"].iloc[0]
    assert ppl.value == pytest.approx(by_hand.ppl, rel=1e-9) and ppl.n_tokens == by_hand.n_tokens
    assert rows[rows.metric == "n_params"].value.item() == sum(p.numel() for p in loaded.model.parameters())
    assert rows[rows.metric == "model_info"].arch.item() == loaded.info.arch
    again = dense_baseline(Session("tiny-llama", store, device="cpu", loader=lambda: loads.append(1) or loaded),
                           [corpus], seqlen=32, max_windows=2, device="cpu")
    assert loads == [1] and len(again) == len(rows)  # read back: nothing loaded
