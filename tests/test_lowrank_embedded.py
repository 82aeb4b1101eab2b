"""Low-rank decomposition on the embedded 135M model (integration): real sizes and the Mode I/II gap."""

import pytest
import torch

from mpt_utils.calibration import collect_stats
from mpt_utils.data import calibration_windows, eval_ids
from mpt_utils.eval.perplexity import perplexity
from mpt_utils.lowrank import LowRankLinear, prepare
from mpt_utils.lowrank.factorized import count_params


@pytest.mark.integration
def test_svd_llm_beats_plain_svd_on_the_embedded_model(embedded):
    model, tok = embedded.model, embedded.tokenizer
    only = lambda name: name == "mlp.up_proj"  # noqa: E731  (30 of the 210 linears keep the test short)
    calib = calibration_windows(tok, "embedded-wiki", n=8, seqlen=256, seed=0)  # 2048 tokens > 576 features
    ids = eval_ids(tok, "embedded-wiki")
    dense = perplexity(model, ids, seqlen=256, max_windows=2, progress=False).ppl
    stats = collect_stats(model, calib, layer_filter=only, progress=False)
    ppl, before = {}, count_params(model)
    for method in ("svd", "svd_llm"):
        # whitening alone ("SVD-LLM (W)"): the Mode I/II gap is the truncation's; the update stage has its own tests
        opts = {"update": "none"} if method == "svd_llm" else {}
        plan = prepare(model, method, calib, stats=stats, layer_filter=only, progress=False, **opts)
        with plan.swapped(model, 0.3) as report:
            assert len(report.layers) == 30 and report.n_factorized == 30
            # a 1536×576 up_proj at 30% fewer parameters keeps rank ⌊0.7·1536·576/2112⌋ = 293
            assert {layer.rank for layer in report.layers} == {293}
            assert report.param_reduction == pytest.approx(1 - 293 * 2112 / (1536 * 576))
            assert count_params(model) == report.n_params_after
            assert before - count_params(model) == 30 * (1536 * 576 - 293 * 2112)
            assert isinstance(model.model.layers[0].mlp.up_proj, LowRankLinear)
            ppl[method] = perplexity(model, ids, seqlen=256, max_windows=2, progress=False).ppl
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)
    # Mode I vs Mode II: plain SVD of the weights collapses (PPL in the thousands, measured), the
    # whitened truncation of the same ranks stays within a few times the dense PPL
    assert dense < ppl["svd_llm"] < 6 * dense
    assert ppl["svd"] > 10 * ppl["svd_llm"]
