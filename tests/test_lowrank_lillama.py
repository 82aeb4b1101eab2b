"""Lillama: the local feature distillation improves on its SVD initialisation; the rank search meets the target."""

import pytest
import torch

from mpt_utils.errors import MPTError
from mpt_utils.lowrank import prepare
from mpt_utils.lowrank.factorized import factorized_params
from mpt_utils.lowrank.lillama import bottom_ranks, l1_cos_loss
from mpt_utils.testing import tiny_model


def _calib(n=8, seqlen=32, seed=0):
    return torch.randint(0, 258, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _block_error(model, dense_model, ids):
    """Relative squared error of every block's output on the dense model's block inputs."""
    from mpt_utils.calibration import decoder_layers

    errs = []
    hidden = {}

    def grab(i):
        def hook(_m, args, kwargs, output):
            hidden[i] = ((args[0] if args else kwargs["hidden_states"]).detach(), kwargs,
                         (output[0] if isinstance(output, tuple) else output).detach())
        return hook

    handles = [b.register_forward_hook(grab(i), with_kwargs=True) for i, b in enumerate(decoder_layers(dense_model))]
    with torch.no_grad():
        dense_model(ids)
        for h in handles:
            h.remove()
        for i, block in enumerate(decoder_layers(model)):
            x, kwargs, y = hidden[i]
            out = block(x, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            errs.append(float((out - y).pow(2).sum() / (y - x).pow(2).sum()))
    return sum(errs) / len(errs)


def test_distillation_lowers_the_block_output_error_of_the_svd_init():
    ids = _calib(n=4)
    dense = tiny_model(seed=0).model
    errors = {}
    for steps in (0, 10):
        model = tiny_model(seed=0).model
        if steps:
            plan = prepare(model, "lillama", ids, steps=steps, lr=1e-3, allocation="uniform", progress=False)
        else:  # the SVD initialisation alone: the same ranks, no training
            plan = prepare(model, "svd", progress=False)
        report = plan.apply(model, 0.3)
        assert report.param_reduction >= 0.3
        errors[steps] = _block_error(model, dense, ids)
        if steps:
            log = plan.info["train_log"][0.3]
            assert log["steps"] == steps and log["tokens"] == steps * 4 * 32
            assert log["loss_last"] < log["loss_first"]
    assert errors[10] < 0.9 * errors[0]


def test_restore_gives_back_the_dense_model_after_training():
    ids = _calib()
    model = tiny_model(seed=0).model
    with torch.no_grad():
        dense = model(ids).logits
    plan = prepare(model, "lillama", ids, steps=3, lr=1e-3, progress=False)
    with plan.swapped(model, 0.25) as report:
        assert sum(p.numel() for p in model.parameters()) == report.n_params_after < report.n_params_before
        with torch.no_grad():
            trained = model(ids).logits
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)
    plan.info["train_log"].clear()
    with plan.swapped(model, 0.25) as again:  # the same ratio again: the trained layers come back, no training
        assert again.n_params_after == report.n_params_after and not plan.info["train_log"]
        with torch.no_grad():
            assert torch.equal(model(ids).logits, trained)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)


def test_bottom_search_compresses_from_the_first_block_and_meets_the_target():
    shapes = {f"b{b}.{n}": s for b in range(4) for n, s in (("q", (64, 64)), ("up", (128, 64)), ("down", (64, 128)))}
    ranks = bottom_ranks(shapes, [f"b{b}" for b in range(4)], 0.2, 64, 0.25, 1 / 16)
    dense = sum(o * i for o, i in shapes.values())
    kept = sum(factorized_params(*shapes[n], r) if r else o * i for n, r in ranks.items() for o, i in [shapes[n]])
    assert 1 - kept / dense >= 0.2 - 1e-12
    hit = sorted({n.split(".")[0] for n, r in ranks.items() if r})
    assert hit == [f"b{b}" for b in range(len(hit))] and len(hit) < 4  # a prefix of the blocks
    assert all(r >= 16 for r in ranks.values() if r)  # never below the minimum rank
    with pytest.raises(MPTError, match="bottom search"):
        bottom_ranks(shapes, [f"b{b}" for b in range(4)], 0.9, 64, 0.25, 1 / 16)


def test_feature_loss_is_l1_minus_log_sigmoid_cosine():
    a = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    y = torch.tensor([[[1.0, 0.0], [2.0, 0.0]]])
    expected = ((0 - torch.nn.functional.logsigmoid(torch.tensor(1.0))) + (2.0 - torch.nn.functional.logsigmoid(
        torch.tensor(0.0)))) / 2
    assert float(l1_cos_loss(a, y)) == pytest.approx(float(expected))


def test_bad_options_are_mpt_errors():
    model = tiny_model(seed=0).model
    with pytest.raises(MPTError, match="calibration"):
        prepare(model, "lillama", None, progress=False)
    with pytest.raises(MPTError, match="loss"):
        prepare(model, "lillama", _calib(), loss="kl", progress=False)
    with pytest.raises(MPTError, match="budget"):
        prepare(model, "lillama", _calib(), steps=0, progress=False)
