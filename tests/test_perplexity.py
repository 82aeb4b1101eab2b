import math

import pytest
import torch

from mpt_utils.errors import MPTError
from mpt_utils.eval.perplexity import perplexity, window_ids


def test_windows_are_non_overlapping_and_cover_the_text():
    ids = torch.arange(1000)
    w = window_ids(ids, 100)
    assert w.shape == (10, 100)
    assert torch.equal(w.flatten(), ids)
    # an incomplete tail is dropped (the GPTQ/Wanda protocol), everything before it is covered once
    w = window_ids(torch.arange(1050), 100)
    assert torch.equal(w.flatten(), torch.arange(1000))
    assert window_ids(ids, 100, max_windows=3).shape == (3, 100)


def test_window_errors_are_clear():
    with pytest.raises(MPTError, match="fewer than one window"):
        window_ids(torch.arange(10), 100)


def test_perplexity_equals_hand_computation(tiny):
    model = tiny.model
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (3 * 32 + 5,))
    res = perplexity(model, ids, seqlen=32, batch_size=2, progress=False)
    # by hand: log-softmax of each window's logits, gather the next token, mean over all
    total, count = 0.0, 0
    with torch.no_grad():
        for k in range(3):
            window = ids[k * 32 : (k + 1) * 32]
            logp = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
            total -= logp[torch.arange(31), window[1:]].sum().item()
            count += 31
    assert res.n_windows == 3 and res.n_tokens == count
    assert res.nll == pytest.approx(total / count, rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(total / count), rel=1e-5)
    assert res.tokens_per_s > 0


def test_collapsed_model_gives_inf_not_crash(tiny):
    with torch.no_grad():
        tiny.model.lm_head.weight.fill_(float("nan"))
    res = perplexity(tiny.model, torch.randint(0, 258, (64,)), seqlen=32, progress=False)
    assert math.isinf(res.ppl)


def test_standard_error_matches_hand_computation_on_known_window_nlls():
    from mpt_utils.eval.perplexity import PerplexityResult

    windows = torch.zeros(4, 11, dtype=torch.long)  # 10 scored tokens per window
    per_window = [2.0, 2.5, 3.0, 4.5]  # mean NLL of each window
    res = PerplexityResult.from_window_sums([10 * x for x in per_window], windows, seconds=1.0)
    mean = sum(per_window) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in per_window) / 3)  # sample std, ddof=1
    assert res.nll == pytest.approx(mean)
    assert res.window_nll == pytest.approx(per_window)
    assert res.nll_se == pytest.approx(std / 2)  # / sqrt(4 windows)
    assert res.ppl_se == pytest.approx(math.exp(mean) * std / 2)  # delta method
    one = PerplexityResult.from_window_sums([25.0], windows[:1], seconds=1.0)
    assert one.nll == pytest.approx(2.5) and math.isnan(one.nll_se) and math.isnan(one.ppl_se)


def test_perplexity_reports_per_window_nll_and_its_standard_error(tiny):
    model = tiny.model
    ids = torch.randint(0, model.config.vocab_size, (5 * 32,), generator=torch.Generator().manual_seed(2))
    res = perplexity(model, ids, seqlen=32, batch_size=2, progress=False)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids.view(5, 32)).logits.double(), dim=-1)
    by_hand = -logp[:, :-1].gather(-1, ids.view(5, 32)[:, 1:, None]).squeeze(-1).mean(1)
    assert res.window_nll == pytest.approx(by_hand.tolist(), rel=1e-5)
    assert res.nll_se == pytest.approx(float(by_hand.std() / math.sqrt(5)), rel=1e-4)
    assert res.ppl_se == pytest.approx(res.ppl * res.nll_se)


def test_perplexity_rows_carry_the_standard_error(tiny, tmp_path):
    from mpt_utils.eval.perplexity import perplexity_rows

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    rows = perplexity_rows(tiny.model, tiny.tokenizer, [str(corpus)], seqlen=64, progress=False)
    (row,) = rows
    assert row["metric"] == "ppl" and row["n_windows"] >= 2
    assert row["stderr"] > 0 and row["stderr"] == pytest.approx(row["value"] * row["nll_stderr"])


def test_collapsed_model_has_no_standard_error(tiny):
    with torch.no_grad():
        tiny.model.lm_head.weight.fill_(float("nan"))
    res = perplexity(tiny.model, torch.randint(0, 258, (96,)), seqlen=32, progress=False)
    assert math.isinf(res.ppl) and math.isnan(res.ppl_se)
