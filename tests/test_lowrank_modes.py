"""SVD-LLM V2 on tiny models: the loss it reports, its allocation, its error against plain SVD."""

import math

import pytest
import torch

from mpt_utils.calibration import collect_stats
from mpt_utils.lowrank import prepare
from mpt_utils.lowrank.svd_llm_v2 import gram_root, heterogeneous_ratios, truncation_loss


def _calib(n=8, seqlen=48, seed=4):
    return torch.randint(0, 258, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_svd_llm_v2_reported_loss_is_the_output_error_on_calibration_inputs(tiny):
    model, ids = tiny.model, _calib()
    stats = collect_stats(model, ids, keep_rows=10**6, progress=False)  # every calibration row kept
    plan = prepare(model, "svd_llm_v2", ids, stats=stats, progress=False)
    losses = plan.truncation_losses(0.3)
    with plan.swapped(model, 0.3) as report:
        assert report.n_factorized == len(losses)
        for name, loss in losses.items():
            x = torch.cat(stats[name].rows).double()
            dense = report.originals[name].weight.detach().double()
            approx = model.get_submodule(name).weight_approx.detach().double()
            measured = float(torch.linalg.norm(x @ (dense - approx).T))
            assert loss == pytest.approx(measured, rel=1e-4), name


def test_two_round_svd_whitening_reproduces_the_gram_matrix():
    x = torch.randn(300, 24, generator=torch.Generator().manual_seed(1)).double() @ torch.diag(torch.logspace(0, -3, 24,
                                                                                                  dtype=torch.float64))
    gram = x.T @ x
    root, inv_root = gram_root(gram)
    torch.testing.assert_close(root @ root.T, gram)  # (U_s√S)(U_s√S)ᵀ = XᵀX, so ‖ΔW·X‖ = ‖ΔW·U_s√S‖
    torch.testing.assert_close(inv_root @ root, torch.eye(24, dtype=torch.float64))


def test_heterogeneous_allocation_follows_the_inverse_log_loss_and_keeps_the_group_mean():
    shapes = {"a": (64, 64), "b": (64, 64), "c": (64, 64)}
    # three same-kind matrices with different spectra: 'a' costs most to truncate, 'c' least
    spectra = {"a": torch.linspace(40, 20, 64), "b": torch.linspace(30, 5, 64), "c": torch.logspace(1.5, -2, 64)}
    ratio = 0.3
    per, uniform = heterogeneous_ratios({"g": ["a", "b", "c"]}, shapes, spectra, ratio)
    assert uniform == []
    rank = int(math.floor((1 - ratio) * 64 * 64 / 128 + 1e-9))
    inv = {n: 1 / math.log(truncation_loss(spectra[n], rank)) for n in shapes}  # hand computation
    for n in shapes:
        assert per[n] == pytest.approx(3 * ratio * inv[n] / sum(inv.values()))
    assert per["a"] < per["b"] < per["c"]
    assert sum(per.values()) / 3 == pytest.approx(ratio)  # same shapes: the parameter budget is met
    # a group whose losses are below 1 (log not positive) keeps the uniform ratio
    small = {n: s * 1e-4 for n, s in spectra.items()}
    per, uniform = heterogeneous_ratios({"g": ["a", "b", "c"]}, shapes, small, ratio)
    assert uniform == ["g"] and set(per.values()) == {ratio}


def test_svd_llm_v2_meets_the_target_and_beats_plain_svd(tiny):
    model, ids = tiny.model, _calib()
    stats = collect_stats(model, ids, progress=False)
    err, reduction = {}, {}
    for method in ("svd", "svd_llm_v2"):
        plan = prepare(model, method, ids, stats=stats, progress=False)
        with plan.swapped(model, 0.4) as report:
            reduction[method] = report.param_reduction
            err[method] = 0.0
            for name, original in report.originals.items():
                diff = original.weight.detach().double() - model.get_submodule(name).weight_approx.detach().double()
                err[method] += float(torch.trace(diff @ stats[name].gram.double() @ diff.T))  # ‖ΔW X‖²
    assert reduction["svd_llm_v2"] >= 0.4 - 1e-9
    assert reduction["svd_llm_v2"] == pytest.approx(reduction["svd"], abs=0.03)
    assert err["svd_llm_v2"] < err["svd"]
