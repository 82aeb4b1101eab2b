"""SVD-LLM V2 and FLAT-LLM on tiny models: reported losses, allocations, exactness at full rank."""

import math

import pytest
import torch

from mpt_utils.calibration import LayerStats, collect_stats
from mpt_utils.lowrank import prepare
from mpt_utils.lowrank.factorized import count_params
from mpt_utils.lowrank.svd_llm_v2 import gram_root, heterogeneous_ratios, truncation_loss
from mpt_utils.testing import tiny_model


def _calib(n=8, seqlen=48, seed=4):
    return torch.randint(0, 258, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_svd_llm_v2_reported_loss_is_the_output_error_on_calibration_inputs(tiny):
    model, ids = tiny.model, _calib()
    stats = collect_stats(model, ids, keep_rows=10**6, progress=False)  # every calibration row kept
    plan = prepare(model, "svd_llm_v2", ids, stats=stats, progress=False)
    # the allocation sees the losses at the reference's 256 × 2048 calibration tokens (L grows as √tokens)
    assert plan.info["loss_scale"] == pytest.approx(math.sqrt(256 * 2048 / ids.numel()))
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


def test_flat_llm_iprs_allocation_is_proportional_with_a_cap():
    from mpt_utils.lowrank.flat_llm import proportional_with_cap

    # shares 0.4, 0.4, 1.6: the third is capped at 1 and its excess re-shared over the other two
    assert proportional_with_cap([1.0, 1.0, 4.0], 2.4) == pytest.approx([0.7, 0.7, 1.0])
    assert proportional_with_cap([1.0, 3.0], 1.0) == pytest.approx([0.25, 0.75])
    assert proportional_with_cap([1.0, 3.0], 2.0) == [1.0, 1.0]


def test_flat_llm_at_full_rank_is_exact_and_its_value_pca_drops_the_least_energy(tiny):
    from mpt_utils.calibration import layerwise
    from mpt_utils.lowrank.flat_llm import FlatAttention, _flat_block

    model, ids = tiny.model, _calib()
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    cfg = model.config
    grams = {}

    def full(i, block, stats):  # φ = 1: every head dimension and neuron kept, only a change of basis
        grams[i] = stats["self_attn.v_proj"].gram.double().clone()
        _flat_block(block, stats, 1.0, cfg.num_attention_heads, cfg.num_key_value_heads, 1.0, torch.device("cpu"))

    layerwise(model, ids, full, sequential=True, progress=False)
    assert isinstance(model.model.layers[0].self_attn, FlatAttention)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense, atol=1e-4, rtol=1e-4)
    # at half the head dimension the values lose exactly the smaller half of each head's eigenvalues
    block = tiny_model("llama", seed=0).model.model.layers[0]
    wv = block.self_attn.v_proj.weight.detach().double()
    d_head = cfg.head_dim
    stats = {"self_attn.v_proj": LayerStats(cfg.hidden_size, "cpu"), "mlp.down_proj": LayerStats(cfg.intermediate_size, "cpu")}
    stats["self_attn.v_proj"].gram, stats["mlp.down_proj"].gram = grams[0].float(), torch.eye(cfg.intermediate_size)
    _flat_block(block, stats, 0.5, cfg.num_attention_heads, cfg.num_key_value_heads, 1.0, torch.device("cpu"))
    new_v = block.self_attn.v_proj.weight.detach().double()
    r = d_head // 2
    for h in range(cfg.num_key_value_heads):
        w = wv[h * d_head:(h + 1) * d_head]
        q = new_v[h * r:(h + 1) * r]  # Q_rᵀ W_v,h; the kept projection is Q_r Q_rᵀ W_v,h
        basis = torch.linalg.lstsq(w.T, q.T).solution  # Q_r from Q_rᵀ W = q
        err = float(torch.trace((w - basis @ q).T @ (w - basis @ q) @ grams[0]))
        evals = torch.linalg.eigvalsh(w @ grams[0] @ w.T)
        assert err == pytest.approx(float(evals[: d_head - r].sum()), rel=1e-4, abs=1e-6)


def test_flat_llm_meets_the_target_and_restores(tiny):
    model, ids = tiny.model, _calib()
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    plan = prepare(model, "flat_llm", ids, progress=False)
    for ratio in (0.1, 0.3):
        with plan.swapped(model, ratio) as report:
            assert ratio <= report.param_reduction < ratio + 0.05
            assert count_params(model) == report.n_params_after < report.n_params_before
            with torch.no_grad():
                logits = model(input_ids=ids).logits
            assert torch.isfinite(logits).all() and not torch.allclose(logits, dense)
            kept = plan.info["kept_share"][ratio]
            assert max(kept.values()) <= 1.0
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, dense)
    with plan.swapped(model, 0.3) as again:  # the same ratio again comes from the cache, identical
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, logits)
        assert again.param_reduction == report.param_reduction
