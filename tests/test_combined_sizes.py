"""The three size columns of a compressed model, checked against counts made by hand on a tiny Llama."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mpt_utils.combined.sizes import model_sizes, nominal_bytes, sparse_bytes, torch_artifact_bytes
from mpt_utils.errors import MPTError
from mpt_utils.quant.rtn import block_linears
from mpt_utils.recipe import apply_recipe
from mpt_utils.testing import tiny_model


@pytest.fixture(scope="module")
def dense16():
    """The tiny Llama held in fp16, so the torch artifact (dtype as held) is an fp16 checkpoint."""
    return tiny_model("llama", seed=0).model.half()


def _other_params(model) -> int:
    linear_weights = {id(lin.weight) for lin in block_linears(model).values()}
    return sum(p.numel() for p in model.parameters() if id(p) not in linear_weights)


def _half_pruned(model):
    """Zero exactly the smaller-magnitude half of every block linear's weights, by hand."""
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for lin in block_linears(pruned).values():
            w = lin.weight
            order = w.abs().flatten().float().argsort()
            w.view(-1)[order[: w.numel() // 2]] = 0
    return pruned


def test_half_pruned_fp16_model_nominal_halves_artifact_does_not_and_bitmask_matches_hand_count(dense16):
    pruned = _half_pruned(dense16)
    dense, sparse = model_sizes(dense16, artifact_dtype_bytes=None), model_sizes(pruned, artifact_dtype_bytes=None)
    other = 2 * _other_params(dense16)
    linears = block_linears(dense16).values()
    block = sum(2 * lin.weight.numel() for lin in linears)
    assert dense.other_bytes == sparse.other_bytes == other
    # (a) nominal: pruned zeros are free, so the block linears' bytes halve exactly
    assert dense.nominal_bytes == other + block
    assert sparse.nominal_bytes == other + block / 2
    assert nominal_bytes(pruned) == sparse.nominal_bytes
    # (b) artifact: the dense fp16 tensors, zeros stored: no drop at all
    hand = sum(t.numel() * t.element_size() for t in dense16.state_dict().values())
    assert dense.artifact_bytes == sparse.artifact_bytes == hand == torch_artifact_bytes(pruned, None)
    # (c) sparse: per linear a 1-bit mask + the non-zero halves at 16 bits (cheaper than dense here)
    masked = sum(math.ceil(lin.weight.numel() / 8) + 2 * (lin.weight.numel() // 2) for lin in linears)
    assert sparse.sparse_bytes == other + masked == sparse_bytes(pruned)
    assert sparse.nominal_bytes < sparse.sparse_bytes < dense.nominal_bytes
    # an unpruned linear keeps the dense form: no mask is paid where there are no zeros
    assert dense.sparse_bytes == dense.nominal_bytes


def test_size_rows_are_tidy_and_give_compression_against_dense(dense16):
    pruned = _half_pruned(dense16)
    dense, sparse = model_sizes(dense16), model_sizes(pruned)
    rows = {r["metric"]: r for r in sparse.rows(dense, recipe="hand@0.5")}
    assert set(rows) == {"nominal_bytes", "artifact_bytes", "sparse_bytes", "compression_nominal",
                         "compression_artifact", "compression_sparse"}
    assert rows["compression_artifact"]["value"] == 0.0
    assert rows["compression_nominal"]["value"] == pytest.approx(1 - sparse.nominal_bytes / dense.nominal_bytes)
    assert all(r["recipe"] == "hand@0.5" and r["artifact"] == "torch" for r in rows.values())


def test_quantized_and_gguf_widths_follow_the_nominal_bits():
    from mpt_utils.quant.size import linear_bits

    model = tiny_model("llama", seed=0).model
    calib = torch.randint(0, 258, (2, 32), generator=torch.Generator().manual_seed(0))
    pruned = copy.deepcopy(model)
    apply_recipe(pruned, "wanda@0.5", calib)
    other = 2 * _other_params(model)
    # a GGUF scheme: its nominal bits (Q4_K_M = 4) per non-zero weight; the mask where it pays off
    nnz = {n: int(torch.count_nonzero(lin.weight)) for n, lin in block_linears(pruned).items()}
    numel = {n: lin.weight.numel() for n, lin in block_linears(pruned).items()}
    assert nominal_bytes(pruned, gguf_scheme="Q4_K_M") == other + sum(4 * v for v in nnz.values()) / 8
    hand = sum(min(math.ceil(4 * numel[n] / 8), math.ceil(numel[n] / 8) + math.ceil(4 * nnz[n] / 8)) for n in nnz)
    assert sparse_bytes(pruned, gguf_scheme="Q4_K_M") == other + hand
    # a torch quantizer: linear_bits (codes + scales) less the bits of the weights pruned before it
    quant = copy.deepcopy(pruned)
    apply_recipe(quant, "rtn:4bit/g64")
    sizes = model_sizes(quant)
    spec_bits = {n: linear_bits(*lin.weight.shape, _spec(quant, n)) for n, lin in block_linears(quant).items()}
    zeros = {n: numel[n] - nnz[n] for n in nnz}
    assert sizes.nominal_bytes == pytest.approx(other + sum(spec_bits[n] - 4 * zeros[n] for n in nnz) / 8)
    hand = sum(min(math.ceil(spec_bits[n] / 8), math.ceil(numel[n] / 8) + math.ceil((spec_bits[n] - 4 * zeros[n]) / 8))
               for n in nnz)
    assert sizes.sparse_bytes == other + hand
    with pytest.raises(MPTError, match="already quantized in torch"):
        nominal_bytes(quant, gguf_scheme="Q4_K_M")
    with pytest.raises(MPTError, match="without its file"):
        model_sizes(pruned, gguf_scheme="Q4_K_M")


def _spec(model, name):
    from mpt_utils.compression_axis import quantized_layers

    return quantized_layers(model)[name].spec


def test_low_rank_factors_shrink_every_torch_column():
    model = tiny_model("llama", seed=0).model
    low = copy.deepcopy(model)
    apply_recipe(low, "svd@0.3")
    dense, small = model_sizes(model), model_sizes(low)
    factors = sum(lin.weight.numel() for lin in block_linears(low).values())
    assert small.nominal_bytes == small.other_bytes + 2 * factors
    assert small.artifact_bytes < dense.artifact_bytes and small.sparse_bytes == small.nominal_bytes
