"""Low-rank decomposition: factorized layers, rank accounting, SVD / ASVD / SVD-LLM on tiny models."""

import math

import pytest
import torch
from torch import nn

from mpt_utils.errors import MPTError
from mpt_utils.lowrank import LOWRANK, LowRankLinear, breakeven_rank, decompose, prepare, rank_for_ratio
from mpt_utils.lowrank.factorized import count_params, factorized_params
from mpt_utils.lowrank.ranks import achieved_reduction, allocate_by_sensitivity, uniform_ranks
from mpt_utils.lowrank.svd import scaled_svd
from mpt_utils.lowrank.svd_llm import whitening

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (64, 64), (128, 64)]


def _calib(n=4, seqlen=32, seed=0):
    return torch.randint(0, 258, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _correlated_inputs(n=512, dim=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=gen) * torch.logspace(0, -2, dim)[None, :]
    return torch.randn(n, dim, generator=gen) @ mix.T + 0.3 * torch.randn(1, dim, generator=gen)


def test_breakeven_rank_of_the_embedded_shapes():
    assert breakeven_rank(576, 576) == 287  # a 576×576 factorization saves parameters only for r < 288
    assert breakeven_rank(192, 576) == 143
    for out_f, in_f in SHAPES:
        r = breakeven_rank(out_f, in_f)
        assert factorized_params(out_f, in_f, r) < out_f * in_f <= factorized_params(out_f, in_f, r + 1)


@pytest.mark.parametrize("shape", SHAPES)
def test_factorized_layer_is_smaller_at_every_accepted_ratio(shape):
    out_f, in_f = shape
    for step in range(1, 100):
        ratio = step / 100
        try:
            rank = rank_for_ratio(out_f, in_f, ratio)
        except MPTError:
            assert ratio > 0.9  # only ratios that would leave rank 0
            continue
        kept = factorized_params(out_f, in_f, rank)
        assert kept < out_f * in_f
        assert 1 - kept / (out_f * in_f) >= ratio - 1e-9  # never below the requested reduction
    layer = LowRankLinear(in_f, out_f, rank_for_ratio(out_f, in_f, 0.03), bias=True)
    dense = nn.Linear(in_f, out_f, bias=True)
    assert sum(p.numel() for p in layer.parameters()) < sum(p.numel() for p in dense.parameters())


def test_ratios_that_would_add_parameters_are_clear_errors():
    with pytest.raises(MPTError, match="increase the parameters"):
        rank_for_ratio(576, 576, -0.1)
    with pytest.raises(MPTError, match="more than the dense") as err:
        rank_for_ratio(576, 576, 0.2, axis="rank")  # keeps rank 461 > 287
    assert "50%" in err.value.fix
    assert rank_for_ratio(576, 576, 0.6, axis="rank") == 230
    with pytest.raises(MPTError, match="not fewer than the dense"):
        LowRankLinear(576, 576, 300)
    with pytest.raises(MPTError, match="rank 0"):
        rank_for_ratio(64, 64, 0.995)
    with pytest.raises(MPTError):
        rank_for_ratio(64, 64, 1.0)
    with pytest.raises(MPTError, match="unknown low-rank method"):
        LOWRANK.get("tucker")


def test_svd_at_full_rank_reproduces_the_layer():
    torch.manual_seed(0)
    dense = nn.Linear(48, 40, bias=True)
    x = _correlated_inputs(64, 48)
    gram = x.T @ x
    scales = {"plain": {}, "diag": {"diag": x.abs().mean(0) ** 0.5}, "whitened": {"lower": whitening(gram)[0]}}
    for name, scale in scales.items():
        fact = scaled_svd(dense.weight, dense.bias, keep=40, **scale)
        layer = fact.module(40, allow_growth=True)
        torch.testing.assert_close(layer(x), dense(x), atol=1e-4, rtol=1e-4, msg=name)


def test_svd_llm_whitened_truncation_beats_plain_svd_on_correlated_inputs():
    torch.manual_seed(1)
    weight = torch.randn(40, 48)
    x = _correlated_inputs(512, 48, seed=2)
    lower, shift = whitening(x.T @ x)
    assert shift == 0.0
    for rank in (4, 8, 16):
        plain = scaled_svd(weight, keep=rank).weight(rank)
        white = scaled_svd(weight, lower=lower, keep=rank)
        err_plain = torch.linalg.norm(x @ (weight - plain).T)
        err_white = torch.linalg.norm(x @ (weight - white.weight(rank)).T)
        assert err_white < 0.9 * err_plain
        # truncation-aware: the output error is exactly the dropped singular values of W·L
        full = torch.linalg.svdvals(weight.double() @ lower)
        assert float(err_white) == pytest.approx(float(full[rank:].square().sum().sqrt()), rel=1e-3)


def test_whitening_damps_a_singular_gram_matrix():
    x = _correlated_inputs(16, 48)  # 16 rows < 48 features: XᵀX is rank deficient
    x[:, 3] = 0.0  # a dead channel
    lower, shift = whitening(x.T @ x)
    assert shift > 0
    assert torch.isfinite(lower).all() and torch.diagonal(lower).min() > 0


def test_asvd_allocation_spares_sensitive_groups_and_meets_the_target():
    shapes = {"a": (64, 64), "b": (64, 64), "c": (64, 64)}
    groups = {g: [g] for g in shapes}
    cands = (0.2, 0.4, 0.6)
    table = {"a": {0.2: 10.5, 0.4: 11.0, 0.6: 12.0},  # robust
             "b": {0.2: 10.6, 0.4: 11.5, 0.6: 13.0},
             "c": {0.2: 30.0, 0.4: 90.0, 0.6: 400.0}}  # fragile
    pick = allocate_by_sensitivity(groups, shapes, table, 0.3)
    ranks = {n: rank_for_ratio(*shapes[n], pick[n]) for n in shapes}
    assert achieved_reduction(shapes, ranks) >= 0.3
    assert pick["c"] < pick["a"] and pick["c"] == 0.0
    assert allocate_by_sensitivity(groups, shapes, table, 0.0) == dict.fromkeys(groups, 0.0)
    with pytest.raises(MPTError, match="at most"):
        allocate_by_sensitivity(groups, shapes, {g: {c: 1.0 for c in cands[:1]} for g in groups}, 0.5)


@pytest.mark.parametrize("method,options", [("svd", {}), ("svd_llm", {}), ("svd_llm", {"sequential": True}),
                                            ("asvd", {"candidates": (0.2, 0.5), "granularity": "block",
                                                      "sens_windows": 2})])
def test_decomposed_tiny_model_shrinks_runs_and_restores(tiny, method, options):
    model = tiny.model
    ids = _calib(2, 24, seed=3)
    dense_logits = model(input_ids=ids).logits
    before = count_params(model)
    plan = prepare(model, method, _calib(), progress=False, **options)
    with plan.swapped(model, 0.3) as report:
        assert count_params(model) == report.n_params_after < before
        assert report.param_reduction >= 0.3
        n_dense = sum(layer.dense_params for layer in report.layers)
        assert before - report.n_params_after == n_dense - sum(layer.params for layer in report.layers)
        assert report.model_reduction == pytest.approx((before - report.n_params_after) / before)
        assert any(isinstance(m, LowRankLinear) for m in model.modules())
        logits = model(input_ids=ids).logits
        assert torch.isfinite(logits).all() and not torch.allclose(logits, dense_logits)
    torch.testing.assert_close(model(input_ids=ids).logits, dense_logits)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    with plan.swapped(model, 0.0) as report:  # ratio 0 leaves the model dense
        assert report.n_factorized == 0 and report.param_reduction == 0
        torch.testing.assert_close(model(input_ids=ids).logits, dense_logits)


def test_decompose_in_place_with_uniform_ranks(tiny):
    report = decompose(tiny.model, "svd", 0.2, progress=False)
    shapes = {layer.name: (layer.out_features, layer.in_features) for layer in report.layers}
    assert {layer.name: layer.rank for layer in report.layers} == uniform_ranks(shapes, 0.2)
    assert report.param_reduction == pytest.approx(achieved_reduction(shapes, uniform_ranks(shapes, 0.2)))
    assert math.isclose(report.summary()["flops_reduction"], report.param_reduction)


def test_asvd_sensitivity_tail_evaluation_matches_the_full_forward(tiny):
    from mpt_utils.lowrank.asvd import TailEvaluator

    tail = TailEvaluator(tiny.model, _calib(2, 32))
    for start in range(len(tail.layers)):
        assert tail.ppl(start) == pytest.approx(tail.base, rel=1e-5)


def test_svd_llm_on_tiny_model_tracks_outputs_better_than_plain_svd(tiny):
    from mpt_utils.calibration import collect_stats

    model, ids = tiny.model, _calib(8, 48, seed=4)
    stats = collect_stats(model, ids, progress=False)
    err = {}
    for method in ("svd", "svd_llm"):
        plan = prepare(model, method, ids, stats=stats, progress=False)
        err[method] = 0.0
        for name, fact in plan.factorizations.items():
            dense = model.get_submodule(name).weight.detach().double()
            rank = plan.ranks(0.4)[name]
            diff = dense - fact.weight(rank).double()
            err[method] += float(torch.trace(diff @ stats[name].gram.double() @ diff.T))  # ‖ΔW X‖²
    assert err["svd_llm"] < err["svd"]


def test_closed_form_refit_of_u_lowers_the_error_on_shifted_inputs():
    from mpt_utils.lowrank.svd_llm import refit_up

    torch.manual_seed(5)
    weight = torch.randn(40, 48)
    x_dense = _correlated_inputs(512, 48, seed=6)  # what the whitening saw
    x_shift = x_dense + 0.5 * _correlated_inputs(512, 48, seed=7)  # inputs after compressed blocks
    fact = scaled_svd(weight, lower=whitening(x_dense.T @ x_dense)[0], keep=8)
    up, down = fact.factors(8)
    refit = refit_up(weight, down, x_shift.T @ x_shift).float()
    err_kept = torch.linalg.norm(x_shift @ (weight - up @ down).T)
    err_refit = torch.linalg.norm(x_shift @ (weight - refit @ down).T)
    assert err_refit < err_kept
    # it is the least-squares solution on the raw rows, as SVDLLM.py's local_update computes it
    lstsq = torch.linalg.lstsq(x_shift.double() @ down.double().T, x_shift.double() @ weight.double().T).solution
    torch.testing.assert_close(refit, lstsq.T.float(), atol=1e-3, rtol=1e-3)
    # on the whitening's own inputs the truncated SVD's U is already the least-squares one
    same = refit_up(weight, down, x_dense.T @ x_dense).float()
    torch.testing.assert_close(same, up, atol=1e-3, rtol=1e-3)


def _calib_nll(model, ids) -> float:
    from mpt_utils.eval.perplexity import nll_from_logits

    with torch.no_grad():
        return float(nll_from_logits(model(input_ids=ids).logits, ids).sum())


def _layer_errors(model, ids, dense_weights) -> dict[str, float]:
    """‖(W_dense − W′)x‖² of each linear on the inputs it really receives in the compressed model."""
    errs, hooks = {}, []
    for name, weight in dense_weights.items():
        def hook(module, args, output, name=name, weight=weight):
            x = args[0].reshape(-1, weight.shape[1])
            errs[name] = float((x @ weight.T - output.reshape(-1, weight.shape[0])).square().sum())
        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return errs


def test_svd_llm_update_stages_beat_whitening_alone_on_calibration_data(tiny):
    from mpt_utils.calibration import collect_stats

    model, ids = tiny.model, _calib(8, 48, seed=4)
    with torch.no_grad():
        dense_logits = model(input_ids=ids).logits
    stats = collect_stats(model, ids, progress=False)
    # the first linears of block 1 see exactly the inputs the closed-form refit was fitted on
    fed = [f"model.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    dense_weights = {n: model.get_submodule(n).weight.detach().clone() for n in fed}
    nll, err = {}, {}
    for update, budget in (("none", {}), ("closed_form", {}), ("lora", {"update_steps": 8, "update_lr": 1e-2})):
        plan = prepare(model, "svd_llm", ids, stats=stats, progress=False, update=update, **budget)
        with plan.swapped(model, 0.4):
            nll[update], err[update] = _calib_nll(model, ids), _layer_errors(model, ids, dense_weights)
        torch.testing.assert_close(model(input_ids=ids).logits, dense_logits)  # the dense model is untouched
    for name in fed:  # SVDLLM.py --step 2: least-squares U on the compressed prefix's outputs
        assert err["closed_form"][name] < err["none"][name], name
    assert nll["lora"] < nll["none"]  # sequential LoRA on U then V lowers the calibration loss
    log = plan.info["update_log"][0.4]
    assert log["steps_per_phase"] == 8 and log["loss_v_last"] < log["loss_u_first"]


def test_svd_llm_defaults_to_the_reference_lora_update(tiny):
    model, ids = tiny.model, _calib(4, 32)
    plan = prepare(model, "svd_llm", ids, progress=False)
    with plan.swapped(model, 0.3) as report:
        assert report.n_factorized > 0
        first = model(input_ids=ids).logits
    log = plan.info["update_log"].pop(0.3)
    with plan.swapped(model, 0.3):  # the same ratio again (another corpus): the updated factors, not retrained
        torch.testing.assert_close(model(input_ids=ids).logits, first)
    assert 0.3 not in plan.info["update_log"]
    # the reference's schedule: 2 epochs; 4 windows fit in one batch of 64, so 2 steps per phase, lr 1e-4
    assert plan.info["update"] == "lora" and log["steps_per_phase"] == 2 and log["lr"] == 1e-4
    with pytest.raises(MPTError, match="unknown SVD-LLM update"):
        prepare(model, "svd_llm", ids, progress=False, update="adam")
    with pytest.raises(MPTError, match="trains on calibration windows"):
        prepare(model, "svd_llm", None, progress=False, stats={})
    with pytest.raises(MPTError, match="already re-fits"):
        prepare(model, "svd_llm", ids, progress=False, update="closed_form", sequential=True)


def test_asvd_search_stops_at_the_reference_floor_of_40_percent_kept(tiny):
    from mpt_utils.lowrank.asvd import DEFAULT_CANDIDATES, MIN_KEPT

    assert max(DEFAULT_CANDIDATES) == pytest.approx(1 - MIN_KEPT) and MIN_KEPT == 0.4
    model, ids = tiny.model, _calib()
    plan = prepare(model, "asvd", ids, progress=False, granularity="block", sens_windows=2)
    report = plan.apply(model, 0.5)
    for layer in report.layers:  # no layer keeps less than the 0.6-reduction rank
        assert layer.rank == 0 or layer.rank >= rank_for_ratio(layer.out_features, layer.in_features, 0.6)
    report.restore(model)
    with pytest.raises(MPTError, match="at most"):  # beyond what a 40% floor can reach
        plan.ranks(0.7)
    with pytest.raises(MPTError, match="below the floor"):
        prepare(model, "asvd", ids, progress=False, candidates=(0.2, 0.8), granularity="block", sens_windows=2)
    deep = prepare(model, "asvd", ids, progress=False, candidates=(0.2, 0.5, 0.8, 0.9), min_kept=0.1,
                   granularity="block", sens_windows=2)
    assert max(deep.ranks(0.85).values()) <= max(rank_for_ratio(o, i, 0.8) for o, i in deep.shapes.values())
    # a stored table from a deeper search is cut at the floor
    floored = prepare(model, "asvd", ids, progress=False, granularity="block",
                      sensitivity_table=deep.info["sensitivity"])
    assert all(max(row) <= 0.6 for row in floored.info["sensitivity"].values())


def test_apply_shapes_gives_the_ranks_of_apply_without_the_update(tiny):
    import copy

    model, ids = tiny.model, _calib(4, 32)
    plan = prepare(model, "svd_llm", ids, progress=False, update="lora", update_steps=1)
    timed, updated = copy.deepcopy(model), copy.deepcopy(model)
    shaped = plan.apply_shapes(timed, 0.3)
    assert plan.info["update_log"] == {}  # no training for a model that is only timed
    full = plan.apply(updated, 0.3)
    assert 0.3 in plan.info["update_log"]
    assert [(la.name, la.rank) for la in shaped.layers] == [(la.name, la.rank) for la in full.layers]
    assert shaped.n_factorized == full.n_factorized > 0
    assert sum(p.numel() for p in timed.parameters()) == sum(p.numel() for p in updated.parameters())
