"""The measured compression axis against hand counts on tiny Llama (hidden 64, 4 heads / 2 KV heads of
16, MLP 128, vocab 258, 2 blocks, untied head): every family, and pruning then quantization."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mpt_utils.compression_axis import compression, mark_quantized, weight_bytes
from mpt_utils.errors import MPTError
from mpt_utils.quant.rtn import QuantSpec
from mpt_utils.testing import tiny_model

# (out, in) of each block linear, by hand from the config
SHAPES = {"q": (64, 64), "k": (32, 64), "v": (32, 64), "o": (64, 64), "gate": (128, 64), "up": (128, 64),
          "down": (64, 128)}
LAYERS = 2
BLOCK_LINEAR = LAYERS * sum(o * i for o, i in SHAPES.values())  # 73,728 weights
NORMS = LAYERS * 2 * 64 + 64
OTHER = 2 * 258 * 64 + NORMS  # embedding + lm_head + norms = 33,344


@pytest.fixture(scope="module")
def dense():
    return tiny_model("llama", seed=0).model


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 258, (4, 32), generator=torch.Generator().manual_seed(0))


def test_dense_bytes_are_every_weight_at_two_bytes(dense):
    counted = weight_bytes(dense)
    assert counted.block_linear == 2 * BLOCK_LINEAR
    assert counted.total == 2 * (BLOCK_LINEAR + OTHER) == 2 * counted.n_params
    assert compression(dense, copy.deepcopy(dense)).total == 0.0


def test_unstructured_half_removes_half_the_block_linears(dense):
    from mpt_utils.prune.engine import prune_model

    model = copy.deepcopy(dense)
    prune_model(model, "magnitude", 0.5)
    axis = compression(dense, model)
    assert axis.block_linear == 0.5
    assert axis.total == pytest.approx(1 - (BLOCK_LINEAR / 2 + OTHER) / (BLOCK_LINEAR + OTHER), abs=1e-12)


def test_low_rank_counts_both_factors(dense):
    from mpt_utils.lowrank import decompose

    model = copy.deepcopy(dense)
    decompose(model, "svd", 0.2)
    ranks = {k: math.floor(0.8 * o * i / (o + i)) for k, (o, i) in SHAPES.items()}  # q 25, k/v 17, mlp 34
    kept = LAYERS * sum(ranks[k] * (o + i) for k, (o, i) in SHAPES.items())
    axis = compression(dense, model)
    assert model.model.layers[0].self_attn.k_proj.rank == 17
    assert axis.block_linear == pytest.approx(1 - kept / BLOCK_LINEAR, abs=1e-12)
    assert axis.total == pytest.approx(1 - (kept + OTHER) / (BLOCK_LINEAR + OTHER), abs=1e-12)


def test_block_removal_counts_the_smaller_model(dense, calib):
    from mpt_utils.prune.structured import structured_prune

    model = copy.deepcopy(dense)
    structured_prune(model, "shortgpt", 0.5, calib, progress=False)  # one of the two blocks
    axis = compression(dense, model)
    assert axis.block_linear == 0.5
    removed = BLOCK_LINEAR / 2 + 2 * 64  # a block's linears and its two norms
    assert axis.total == pytest.approx(removed / (BLOCK_LINEAR + OTHER), abs=1e-12)


def test_channel_removal_counts_the_smaller_tensors(dense):
    from mpt_utils.prune.structured import structured_prune

    model = copy.deepcopy(dense)
    result = structured_prune(model, "random", 0.2)
    attention = sum(o * i for k, (o, i) in SHAPES.items() if k in "qkvo")
    kept = sum(attention + 3 * 64 * c for c in result.detail["kept_channels"])  # gate/up rows, down columns
    assert kept < BLOCK_LINEAR
    assert compression(dense, model).block_linear == pytest.approx(1 - kept / BLOCK_LINEAR, abs=1e-12)


def test_rtn_4bit_g128_counts_codes_scales_and_zeros(dense):
    from mpt_utils.quant import quantize
    from mpt_utils.quant.size import storage

    model = copy.deepcopy(dense)
    result = quantize(model, "rtn", bits=4, group_size=128, progress=False)
    # every row holds one group (in = 64 or 128 <= 128): 4-bit codes + fp16 scale + 4-bit zero per row
    rows = LAYERS * sum(o for o, _ in SHAPES.values())
    bits = 4 * BLOCK_LINEAR + rows * (16 + 4)
    axis = compression(dense, model, quantized=result.layers)
    assert axis.compressed.block_linear == bits / 8 == storage(model, result.layers).quant_bytes
    assert axis.block_linear == pytest.approx(1 - bits / (16 * BLOCK_LINEAR), abs=1e-12)
    assert axis.total == pytest.approx(1 - (bits / 8 + 2 * OTHER) / (2 * (BLOCK_LINEAR + OTHER)), abs=1e-12)
    mark_quantized(model, result.layers)  # recorded on the model instead of passed
    assert compression(dense, model) == axis


def test_pruned_then_quantized_pays_codes_only_for_kept_weights(dense):
    from mpt_utils.recipe import apply_recipe

    model = copy.deepcopy(dense)
    apply_recipe(model, "magnitude@0.5 > rtn:4bit")
    rows = LAYERS * sum(o for o, _ in SHAPES.values())
    bits = 4 * BLOCK_LINEAR // 2 + rows * (16 + 4)  # rounding to zero after pruning is still paid for
    assert compression(dense, model).compressed.block_linear == bits / 8


def test_specs_of_another_model_are_refused(dense):
    with pytest.raises(MPTError, match="does not hold"):
        weight_bytes(dense, quantized={"model.layers.9.mlp.up_proj": QuantSpec(4)})
