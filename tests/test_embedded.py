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
