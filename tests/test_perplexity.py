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
