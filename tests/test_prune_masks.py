"""Mask selection and input validation of the pruning family."""

import pytest
import torch

from mpt_utils.calibration import LayerStats
from mpt_utils.errors import MPTError
from mpt_utils.prune import get_method, method_names, prune_model
from mpt_utils.prune.masks import layer_mask, nm_mask, parse_pattern, resolve_sparsity, row_mask
from mpt_utils.prune.measure import nm_satisfied
from mpt_utils.prune.wanda import wanda


def _stats(x: torch.Tensor) -> LayerStats:
    st = LayerStats(x.shape[1], torch.device("cpu"))
    st.add(x)
    return st


@pytest.mark.parametrize("bad", ["4:4", "5:4", "0:4", "-1:4", "a:b", "2-4", (3, 2)])
def test_bad_nm_pattern_is_a_clear_error(bad):
    with pytest.raises(MPTError, match="N:M|pattern"):
        parse_pattern(bad)


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, "x"])
def test_sparsity_outside_unit_interval_is_a_clear_error(bad, tiny):
    with pytest.raises(MPTError, match="sparsity"):
        resolve_sparsity(bad, None)
    with pytest.raises(MPTError, match="sparsity"):
        prune_model(tiny.model, "magnitude", bad)


def test_pattern_and_contradicting_sparsity_is_an_error():
    assert parse_pattern("2:4") == (2, 4) and parse_pattern(None) is None
    assert resolve_sparsity(None, (2, 4)) == 0.5
    with pytest.raises(MPTError, match="contradicts"):
        resolve_sparsity(0.7, (2, 4))


def test_unknown_method_lists_the_registry():
    with pytest.raises(MPTError, match="wanda"):
        get_method("no-such-pruner")
    assert {"magnitude", "wanda", "sparsegpt", "ria", "admm", "owl", "dsnot"} <= set(method_names())


def test_row_layer_and_nm_masks_are_exact():
    scores = torch.rand(16, 40, generator=torch.Generator().manual_seed(0))
    assert (row_mask(scores, 0.3).sum(dim=1) == 12).all()
    assert int(layer_mask(scores, 0.3).sum()) == 192
    m = nm_mask(scores, (2, 4))
    assert (m.view(16, 10, 4).sum(dim=2) == 2).all()
    with pytest.raises(MPTError, match="cannot hold"):
        nm_mask(scores[:, :38], (4, 8))


def test_wanda_mask_equals_brute_force_row_topk():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, 24, generator=g)
    x = torch.randn(300, 24, generator=g) * torch.linspace(0.1, 3.0, 24)
    out = wanda(w, _stats(x), 0.5)
    norms = x.norm(dim=0)
    for i in range(w.shape[0]):
        score = [(abs(float(w[i, j])) * float(norms[j]), j) for j in range(w.shape[1])]
        pruned = {j for _, j in sorted(score)[:12]}
        assert {j for j in range(24) if out[i, j] == 0} == pruned
        assert all(out[i, j] == w[i, j] for j in range(24) if j not in pruned)


def test_magnitude_sparsity_is_exact_per_layer_and_nm_holds():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    for s in (0.1, 0.5, 0.8):
        out = get_method("magnitude").fn(w, None, s, None)
        assert int((out == 0).sum()) == round(w.numel() * s)
        kept = w.abs()[out != 0].min()
        assert w.abs()[out == 0].max() <= kept  # the smallest magnitudes went, across the layer
    for pattern in ((2, 4), (4, 8)):
        assert nm_satisfied(get_method("magnitude").fn(w, None, 0.5, pattern), pattern)
