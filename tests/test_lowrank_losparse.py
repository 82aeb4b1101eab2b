"""LoSparse: U·V + row-sparse S beats low rank alone at equal size; pruning follows the cubic schedule
and the parameter target (U·V plus S's kept rows) is met."""

import pytest
import torch

from mpt_utils.errors import MPTError
from mpt_utils.lowrank import prepare
from mpt_utils.lowrank._structured import LowRankSparseLinear
from mpt_utils.lowrank.losparse import cubic_keep, losparse_init, losparse_rank, select_rows
from mpt_utils.lowrank.svd import scaled_svd
from mpt_utils.testing import tiny_model


def _calib(n=8, seqlen=32, seed=0):
    return torch.randint(0, 258, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_low_rank_plus_sparse_rows_beats_low_rank_alone_at_equal_size():
    """A weight with a coherent low-rank part and a few incoherent heavy rows (LoSparse's model of
    an LLM weight): U·V + S's largest rows reconstructs it better than the SVD of the same size."""
    gen = torch.Generator().manual_seed(0)
    out_f, in_f = 96, 64
    w = 5 * torch.randn(out_f, 2, generator=gen) @ torch.randn(2, in_f, generator=gen)
    heavy = torch.randperm(out_f, generator=gen)[:24]
    w[heavy] += torch.randn(24, in_f, generator=gen)
    w += 0.01 * torch.randn(out_f, in_f, generator=gen)
    rank = losparse_rank(out_f, in_f, 0.05)
    up, down, sparse = losparse_init(w, rank)
    assert torch.allclose(up @ down + sparse, w, atol=1e-5)  # exact before pruning
    budget = 0.4 * out_f * in_f - rank * (out_f + in_f)
    keep = select_rows({"w": sparse.abs().mean(1)}, {"w": in_f}, budget)["w"]
    layer = LowRankSparseLinear(up, down, sparse * keep[:, None])
    layer.compact()
    assert layer.stored_params <= 0.4 * out_f * in_f
    svd_rank = layer.stored_params // (out_f + in_f)
    svd_err = (scaled_svd(w, keep=min(out_f, in_f)).weight(svd_rank) - w).pow(2).sum()
    ours = (layer.weight_approx() - w).pow(2).sum()
    assert ours < 0.5 * svd_err
    x = torch.randn(5, in_f, generator=gen)
    assert torch.allclose(layer(x), x @ layer.weight_approx().T, atol=1e-4)


def test_cubic_schedule_matches_the_reference_shape():
    total, final = 100, 0.2
    keep = [cubic_keep(s, total, final, 0.1, 0.3, 5) for s in range(total)]
    assert all(k == (1.0, False) for k in keep[:11])  # initial warm-up: S dense, no masking
    assert all(k == (final, True) for k in keep[71:])  # final phase: masked every step at the final share
    middle = [k for k, _ in keep[11:71]]
    assert all(a >= b for a, b in zip(middle, middle[1:])) and middle[0] < 1 and middle[-2] > final == middle[-1]
    assert cubic_keep(40, total, final, 0.1, 0.3, 5) == pytest.approx((final + 0.8 * 0.5 ** 3, True))
    assert cubic_keep(41, total, final, 0.1, 0.3, 5)[1] is False  # masks every delta_t steps in between


def test_rows_are_selected_globally_by_score_within_the_element_budget():
    scores = {"a": torch.tensor([5.0, 1.0, 3.0]), "b": torch.tensor([4.0, 2.0])}
    keep = select_rows(scores, {"a": 10, "b": 20}, budget=40)  # 5, 4, 3 fit: 10 + 20 + 10 elements
    assert keep["a"].tolist() == [True, False, True] and keep["b"].tolist() == [True, False]
    keep = select_rows(scores, {"a": 10, "b": 20}, budget=39)  # a threshold: the 3-row stops, so does 1
    assert keep["a"].tolist() == [True, False, False] and keep["b"].tolist() == [True, False]


def test_fine_tuning_meets_the_target_counts_both_parts_and_lowers_the_loss():
    ids = _calib()
    model = tiny_model(seed=0).model
    with torch.no_grad():
        dense_loss = float(model(ids, labels=ids).loss)
    plan = prepare(model, "losparse", ids, steps=12, lr=1e-3, batch_size=8, delta_t=2, progress=False)
    report = plan.apply(model, 0.3)
    parts = plan.info["parts"][0.3]
    assert report.param_reduction >= 0.3 - 1e-9
    assert 1 - (parts["low_rank_params"] + parts["sparse_params"]) / parts["dense_params"] == pytest.approx(
        report.param_reduction)
    assert parts["sparse_params"] > 0 and parts["low_rank_params"] > 0
    assert sum(p.numel() for p in model.parameters()) == report.n_params_after
    log = plan.info["train_log"][0.3]
    assert log["steps"] == 12 and log["masks"] > 1 and log["loss_last"] < log["loss_first"]
    with torch.no_grad():
        assert float(model(ids, labels=ids).loss) < dense_loss  # fine-tuned on these windows
    with torch.no_grad():
        trained = model(ids).logits
    report.restore(model)
    with torch.no_grad():
        assert float(model(ids, labels=ids).loss) == pytest.approx(dense_loss, abs=1e-6)
    plan.info["train_log"].clear()
    again = plan.apply(model, 0.3)  # the same ratio again: the trained layers come back, no training
    assert not plan.info["train_log"] and again.n_params_after == report.n_params_after
    with torch.no_grad():
        assert torch.equal(model(ids).logits, trained)


def test_bad_options_are_mpt_errors():
    model = tiny_model(seed=0).model
    with pytest.raises(MPTError, match="calibration"):
        prepare(model, "losparse", None, progress=False)
    with pytest.raises(MPTError, match="low_rank_ratio"):
        prepare(model, "losparse", _calib(), low_rank_ratio=0, progress=False)
    plan = prepare(model, "losparse", _calib(), low_rank_ratio=0.5, steps=1, progress=False)
    with pytest.raises(MPTError, match="fewer parameters than the low-rank part"):
        plan.apply(model, 0.6)
