"""Pruning the embedded 135M model: measured sparsity, N:M on every layer, a finite PPL above dense."""

import math

import pytest
import torch

from mpt_utils.calibration import collect_stats
from mpt_utils.data import calibration_windows, eval_ids
from mpt_utils.eval.perplexity import perplexity
from mpt_utils.prune import prune_model
from mpt_utils.prune.measure import block_linears


@pytest.mark.integration
def test_wanda_and_nm_on_the_embedded_model(embedded):
    model, tok = embedded.model, embedded.tokenizer
    dense = [{n: lin.weight.detach().clone() for n, lin in ls.items()} for ls in block_linears(model)]
    ids = eval_ids(tok, "embedded-wiki")
    try:
        base = perplexity(model, ids, seqlen=128, max_windows=2, progress=False).ppl
        stats = collect_stats(model, calibration_windows(tok, "embedded-wiki", 2, 128, 0), progress=False)
        report = prune_model(model, "wanda", 0.5, stats=stats)
        assert report.achieved == pytest.approx(0.5, abs=0.002)
        assert all(s == pytest.approx(0.5, abs=0.01) for s in report.block_sparsity)
        pruned = perplexity(model, ids, seqlen=128, max_windows=2, progress=False).ppl
        assert math.isfinite(pruned) and pruned > base
        with torch.no_grad():
            for ls, saved in zip(block_linears(model), dense):
                for n, lin in ls.items():
                    lin.weight.copy_(saved[n])
        assert prune_model(model, "magnitude", pattern="2:4").nm_ok
    finally:
        with torch.no_grad():
            for ls, saved in zip(block_linears(model), dense):
                for n, lin in ls.items():
                    lin.weight.copy_(saved[n])
