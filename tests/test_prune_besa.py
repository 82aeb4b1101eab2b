"""BESA on tiny random decoders: exact block sparsity, a learned (non-uniform) allocation, and a
lower block reconstruction error than Wanda's uniform rows at the same sparsity."""

import copy

import pytest
import torch

from mpt_utils.calibration import capture_block_inputs, collect_stats, decoder_layers
from mpt_utils.combined.grid import GridSetup
from mpt_utils.errors import MPTError
from mpt_utils.prune import get_method, method_options, prune_model
from mpt_utils.prune.besa import Prodigy
from mpt_utils.prune.masks import n_pruned
from mpt_utils.prune.sweep import compare_modes
from mpt_utils.session import Session
from mpt_utils.store import ResultsStore
from mpt_utils.testing import tiny_model


def _calib(n=4, seqlen=32, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _block_error(model, dense_block, calib) -> float:
    """Σ over windows of ‖dense block(x) − pruned block(x)‖² on block 0's inputs (block 0 sees the
    same inputs whatever the method, so the errors compare the masks alone)."""
    inputs, kwargs = capture_block_inputs(model, calib, torch.device("cpu"))
    block = decoder_layers(model)[0]
    with torch.no_grad():
        return sum(float(((dense_block(x, **kwargs)[0] - block(x, **kwargs)[0]) ** 2).sum()) for x in inputs)


@pytest.fixture(scope="module")
def pruned():
    calib = _calib()
    lm = tiny_model("llama", layers=2)
    dense_block = copy.deepcopy(decoder_layers(lm.model)[0])
    wanda = copy.deepcopy(lm.model)
    prune_model(wanda, "wanda", 0.5, calib_ids=calib)
    report = prune_model(lm.model, "besa", 0.5, calib_ids=calib, epochs=16)
    return lm.model, wanda, dense_block, calib, report


def test_besa_meets_the_target_exactly_in_every_block(pruned):
    model, _, _, _, report = pruned
    assert report.mode == "sequential"
    for block in decoder_layers(model):
        lins = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
        zeros = sum(int((m.weight == 0).sum()) for m in lins)
        assert zeros == n_pruned(sum(m.weight.numel() for m in lins), 0.5)


def test_besa_allocation_is_learned_not_uniform(pruned):
    model = pruned[0]
    block = decoder_layers(model)[0]
    row_sparsity = torch.cat([(m.weight == 0).float().mean(dim=1) for m in block.modules()
                              if isinstance(m, torch.nn.Linear)])
    assert float(row_sparsity.std()) > 0.02  # Wanda's rows would all sit at exactly 0.5
    layer_sparsity = {n: float((m.weight == 0).float().mean()) for n, m in block.named_modules()
                      if isinstance(m, torch.nn.Linear)}
    assert max(layer_sparsity.values()) - min(layer_sparsity.values()) > 0.01


def test_besa_block_error_is_below_wanda_at_the_same_sparsity(pruned):
    model, wanda, dense_block, calib, _ = pruned
    assert _block_error(model, dense_block, calib) < 0.95 * _block_error(wanda, dense_block, calib)


def test_besa_keeps_surviving_weights_and_wanda_order_within_rows():
    calib = _calib()
    lm = tiny_model("llama", layers=1)
    dense = {n: m.weight.clone() for n, m in decoder_layers(lm.model)[0].named_modules()
             if isinstance(m, torch.nn.Linear)}
    stats = collect_stats(lm.model, calib, progress=False)
    prune_model(lm.model, "besa", 0.6, calib_ids=calib, epochs=2, scope="layer")
    for n, m in decoder_layers(lm.model)[0].named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        kept = m.weight != 0
        assert torch.equal(m.weight[kept], dense[n][kept])  # mask only, no update
        score = dense[n].abs() * stats[f"model.layers.0.{n}"].sq_norm.sqrt()
        # every pruned weight scores no higher than any kept weight of its row (the Wanda ranking)
        lo_kept = score.masked_fill(~kept, float("inf")).min(dim=1).values
        hi_pruned = score.masked_fill(kept, float("-inf")).max(dim=1).values
        assert bool((hi_pruned <= lo_kept).all())


def test_besa_rejects_what_it_cannot_do():
    lm = tiny_model("llama", layers=1)
    calib = _calib(2, 16)
    with pytest.raises(MPTError, match="N:M"):
        prune_model(lm.model, "besa", pattern="2:4", calib_ids=calib)
    with pytest.raises(MPTError, match="own inputs and outputs"):
        prune_model(lm.model, "besa", 0.5, stats=collect_stats(lm.model, calib, progress=False))
    with pytest.raises(MPTError, match="scope"):
        prune_model(lm.model, "besa", 0.5, calib_ids=calib, scope="column")
    with pytest.raises(MPTError, match="epochs"):
        prune_model(lm.model, "besa", 0.5, calib_ids=calib, epoch=2)
    assert {"epochs", "sparsity_beta", "d_coef", "scope", "exact"} <= method_options("besa")
    assert get_method("besa").block_level and not get_method("wanda").block_level


def test_prodigy_finds_its_own_step_size():
    x = torch.nn.Parameter(torch.zeros(8))
    target = torch.linspace(-3, 3, 8)
    opt = Prodigy([x], d_coef=1.0)
    for _ in range(200):
        opt.zero_grad()
        ((x - target) ** 2).sum().backward()
        opt.step()
    assert opt.d > 1e-3  # grew from 1e-6 without a tuned learning rate
    assert float((x.detach() - target).abs().max()) < 0.3


def test_mode_comparison_skips_block_level_methods(tmp_path):
    lm = tiny_model("llama", layers=1)
    session = Session("tiny", ResultsStore(tmp_path), loaded=lm)
    protocol = GridSetup(model="tiny", eval_data="x", calib_data="x", n_calib=2, seqlen=16)
    drift = compare_modes(session, protocol, ["besa"], [0.5])
    assert drift.empty


def test_findings_rank_the_methods_measured_where_besa_has_gaps():
    import pandas as pd

    from mpt_utils.prune.sweep import unstructured_findings

    nan = float("nan")
    table = pd.DataFrame({"0.5": [20.0, 15.0, 14.0], "0.6": [90.0, 30.0, nan], "0.7": [500.0, 80.0, 60.0]},
                         index=["magnitude", "wanda", "besa"])
    ranking = unstructured_findings(table, pd.DataFrame())[1]
    assert ranking == "At sparsity 0.7 (best first): besa 60.0, wanda 80.0, magnitude 500.0."
    ranking = unstructured_findings(table[["0.5", "0.6"]], pd.DataFrame())[0]
    assert ranking == "At sparsity 0.6 (best first): wanda 30.0, magnitude 90.0."
