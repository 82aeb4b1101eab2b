"""SoLA: prime neurons kept exactly, the parameter target met, less output error than plain SVD."""

import pytest
import torch

from mpt_utils.calibration import collect_stats
from mpt_utils.errors import MPTError
from mpt_utils.lowrank import prepare
from mpt_utils.lowrank.factorized import get_module
from mpt_utils.lowrank.sola import PrimeLowRankLinear
from mpt_utils.lowrank.svd import scaled_svd
from mpt_utils.testing import tiny_model


def _calib(n=8, seqlen=48, seed=5):
    return torch.randint(0, 258, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture()
def setup():
    model = tiny_model("llama", seed=0).model
    ids = _calib()
    stats = collect_stats(model, ids, progress=False)
    return model, ids, stats


def _mean_abs_activation(model, ids, layer):
    """Mean |a_j| of down_proj's inputs, measured by a hook independent of the method's statistics."""
    acc = {}

    def hook(_m, args):
        a = args[0].reshape(-1, args[0].shape[-1]).double()
        acc["s"] = acc.get("s", 0) + a.abs().sum(0)
        acc["n"] = acc.get("n", 0) + a.shape[0]

    h = model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(hook)
    with torch.no_grad():
        for row in ids:
            model(input_ids=row[None], use_cache=False)
    h.remove()
    return acc["s"] / acc["n"]


def test_prime_neurons_are_the_top_norm_ones_and_are_reproduced_exactly(setup):
    model, ids, stats = setup
    dense = {n: get_module(model, n).weight.detach().clone()
             for n in ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj")}
    plan = prepare(model, "sola", ids, stats=stats, skip_layers=0, progress=False)
    score = _mean_abs_activation(model, ids, 1)
    n_top = int(0.15 * score.numel())  # 128 neurons -> 19 prime
    expected = torch.topk(score, n_top).indices.sort().values
    assert plan.info["prime_neurons"]["model.layers.1.mlp"] == expected.tolist()
    plan.apply(model, 0.3)
    for name, w in dense.items():
        layer = get_module(model, name)
        assert isinstance(layer, PrimeLowRankLinear)
        kept = w[:, expected] if name.endswith("down_proj") else w[expected]
        assert torch.equal(layer.heavy.weight, kept)
        approx = layer.weight_approx
        assert torch.equal(approx[:, expected] if name.endswith("down_proj") else approx[expected], kept)
        assert not torch.allclose(approx, w)  # the marginal part really is truncated
    # the prime neurons' activations of the compressed MLP equal the dense ones on the same input
    x = torch.randn(3, 64)
    mlp = model.model.layers[1].mlp
    a = torch.nn.functional.silu(x @ dense["model.layers.1.mlp.gate_proj"].T) * (x @ dense["model.layers.1.mlp.up_proj"].T)
    a_new = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    torch.testing.assert_close(a_new[:, expected], a[:, expected], rtol=0, atol=1e-6)


@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_parameter_target_is_met_counting_the_kept_part(setup, ratio):
    model, ids, stats = setup
    dense_linear = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and "norm" not in n)
    plan = prepare(model, "sola", ids, stats=stats, skip_layers=0, progress=False)
    report = plan.apply(model, ratio)
    stored = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and "norm" not in n)
    achieved = 1 - stored / dense_linear  # every tensor the decoder linears really hold, prime rows included
    assert achieved == pytest.approx(report.param_reduction, abs=1e-12)
    assert ratio <= achieved < ratio + 0.03
    # v_proj stays dense, as in the reference
    assert isinstance(model.model.layers[0].self_attn.v_proj, torch.nn.Linear)


def test_skipped_blocks_stay_dense_and_unreachable_ratios_are_errors(setup):
    model, ids, stats = setup
    with pytest.raises(MPTError):  # two blocks, one skipped at each end: nothing left to decompose
        prepare(model, "sola", ids, stats=stats, skip_layers=1, progress=False)
    with pytest.raises(MPTError):
        prepare(model, "sola", ids, stats=stats, prime_share=1.5, progress=False)
    plan = prepare(model, "sola", ids, stats=stats, skip_layers=0, progress=False)
    with pytest.raises(MPTError):
        plan.apply(model, 0.95)


def test_output_error_on_calibration_inputs_is_below_plain_svd_at_the_same_size(setup):
    model, ids, stats = setup
    dense = {n: get_module(model, n).weight.detach().double().clone() for n in stats}
    plan = prepare(model, "sola", ids, stats=stats, skip_layers=0, progress=False)
    report = plan.apply(model, 0.3)
    sola_err = svd_err = 0.0
    for layer in report.layers:
        if layer.rank == 0:
            continue
        w, g = dense[layer.name], stats[layer.name].gram.double()
        approx = get_module(model, layer.name).weight_approx.detach().double()
        sola_err += float(torch.trace((w - approx) @ g @ (w - approx).T))
        rank = layer.params // (layer.out_features + layer.in_features)  # plain SVD with the same storage
        plain = scaled_svd(w.float(), keep=rank).weight(rank).double()
        svd_err += float(torch.trace((w - plain) @ g @ (w - plain).T))
    assert sola_err < 0.8 * svd_err  # 0.65 on this model


def test_restore_gives_back_the_dense_model(setup):
    model, ids, stats = setup
    x = ids[:2]
    with torch.no_grad():
        before = model(input_ids=x).logits.clone()
    plan = prepare(model, "sola", ids, stats=stats, skip_layers=0, progress=False)
    with plan.swapped(model, 0.3):
        with torch.no_grad():
            assert not torch.allclose(model(input_ids=x).logits, before)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, before, rtol=0, atol=0)
