"""bitsandbytes' formats: NF4 / FP4 blockwise absmax codebooks with double quantization, and LLM.int8()'s
decomposed int8 matmul; their storage and how the sweep and Table 4 take them."""

import copy

import pandas as pd
import pytest
import torch
from torch import nn

from mpt_utils.errors import MPTError
from mpt_utils.quant import QUANTIZERS, quantize
from mpt_utils.quant._blockwise import (
    NF4_LEVELS,
    NF4_OFFSET,
    AbsmaxSpec,
    blockwise,
    dequantize_blockwise,
    double_quantize,
    dynamic_map,
    fp4_levels,
)
from mpt_utils.quant.llm_int8 import Int8MixedLinear
from mpt_utils.quant.rtn import QuantSpec, block_linears, quantize_weight
from mpt_utils.quant.size import linear_bits, storage
from mpt_utils.quant.smoothquant import fake_quant_per_token
from mpt_utils.testing import tiny_model


def _gauss(out_f=96, in_f=256, seed=0):
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))


def test_nf4_levels_are_the_normal_quantiles_of_bitsandbytes():
    # the construction of bitsandbytes' create_normal_map: 8 positive, 7 negative quantiles and 0
    pos = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].double())
    built = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    assert len(NF4_LEVELS) == 16 and NF4_LEVELS[0] == -1.0 and NF4_LEVELS[7] == 0.0 and NF4_LEVELS[-1] == 1.0
    assert torch.allclose(torch.tensor(NF4_LEVELS, dtype=torch.float64), built / built.max(), atol=1e-7, rtol=0)
    assert fp4_levels() == tuple(sorted({s * m / 12 for m in (0, 0.0625, 2, 3, 4, 6, 8, 12) for s in (1, -1)}))
    code = dynamic_map()
    assert code.numel() == 256 and code.unique().numel() == 256 and code.max() == 1.0 and (code == 0).sum() == 1


@pytest.mark.parametrize("codebook", ["nf4", "fp4"])
def test_codes_are_the_codebook_levels_within_each_block_absmax(codebook):
    w = _gauss()
    levels = torch.tensor(NF4_LEVELS if codebook == "nf4" else fp4_levels())
    q = dequantize_blockwise(w, codebook, 64, double_quant=False)
    blocks, qb = w.reshape(-1, 64), q.reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    ratio = qb / absmax
    assert (ratio.unsqueeze(-1) - levels).abs().amin(-1).max() < 1e-6  # every value is level * absmax
    if codebook == "nf4":  # 96 x 256 Gaussian weights use all 16 NF4 codes
        idx, _ = blockwise(w, levels, 64)
        assert idx.unique().tolist() == list(range(16))
    assert (qb.abs() <= absmax * (1 + 1e-6)).all()
    assert torch.allclose(qb.abs().amax(dim=1, keepdim=True), absmax)  # the absmax element is exact (±1)
    # with double quantization the de-quantized constants bound the block instead, close to the true absmax
    dq = dequantize_blockwise(w, codebook, 64, double_quant=True).reshape(-1, 64)
    scale = double_quantize(absmax.flatten()).unsqueeze(1)
    assert (dq.abs() <= scale * (1 + 1e-6)).all()
    assert (scale - absmax).abs().max() < 0.01 * absmax.max()


def test_partial_last_block_has_its_own_absmax():
    w = _gauss(1, 100)  # 100 = 64 + a partial block of 36
    q = dequantize_blockwise(w, "nf4", 64, double_quant=False)
    assert torch.isclose(q[0, 64:].abs().max(), w[0, 64:].abs().max())


def test_nf4_error_is_below_rtn_4bit_symmetric_and_fp4_on_gaussian_weights():
    w = _gauss(256, 512, seed=3)
    err = {name: float((q - w).pow(2).mean()) for name, q in {
        "nf4": dequantize_blockwise(w, "nf4", 64, double_quant=True),
        "fp4": dequantize_blockwise(w, "fp4", 64, double_quant=True),
        "rtn": quantize_weight(w, QuantSpec(4, 64, sym=True)),
    }.items()}
    assert err["nf4"] < 0.8 * err["rtn"], err  # ~0.0085 vs ~0.0116 per weight
    assert err["nf4"] < err["fp4"], err


def test_absmax_storage_counts_constants_as_bitsandbytes_keeps_them():
    dq, plain = AbsmaxSpec(4, 64, codebook="nf4", double_quant=True), AbsmaxSpec(4, 64, codebook="nf4")
    # 4096 x 4096: 262144 blocks of 64 -> 8-bit constants + 1024 fp32 second-level absmax + 1 fp32 offset
    n = 4096 * 4096
    assert linear_bits(4096, 4096, dq) == n * 4 + 262144 * 8 + 1024 * 32 + 32
    assert linear_bits(4096, 4096, dq) / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-5)  # QLoRA's 0.127
    assert linear_bits(4096, 4096, plain) / n == 4.5
    assert linear_bits(8, 100, plain) == 800 * 4 + 13 * 32  # blocks run over the flattened matrix
    int8 = AbsmaxSpec(8, None, codebook="int8")
    assert linear_bits(6, 10, int8) == 60 * 8 + 6 * 32  # one fp32 absmax per row
    assert linear_bits(6, 10, AbsmaxSpec(8, None, codebook="int8", fp16_copy=True)) == 60 * 24 + 6 * 32


@pytest.mark.parametrize("method", ["nf4", "fp4", "llm_int8"])
def test_fixed_formats_through_the_registry(method):
    loaded = tiny_model("llama")
    model, ids = loaded.model, torch.randint(0, 258, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = model(input_ids=ids).logits
    bits = QUANTIZERS.info(method).traits["fixed_bits"]
    q = copy.deepcopy(model)
    head = q.lm_head.weight.clone()
    res = quantize(q, method, bits=bits, progress=False)
    assert set(res.layers) == set(block_linears(q)) and torch.equal(q.lm_head.weight, head)
    out = q(input_ids=ids).logits
    assert torch.isfinite(out).all() and 0 < (out - ref).abs().max() < 0.5
    lins = block_linears(q).values()
    n, rows = sum(lin.weight.numel() for lin in lins), sum(lin.out_features for lin in lins)
    want = 8 + 32 * rows / n if method == "llm_int8" else 4.127  # fp32 absmax per row / double-quant blocks
    assert storage(q, res.layers).bits_per_weight == pytest.approx(want, abs=0.02)
    with pytest.raises(MPTError, match=f"{bits}-bit format"):
        quantize(copy.deepcopy(model), method, bits=3)
    with pytest.raises(MPTError, match="symmetric"):
        quantize(copy.deepcopy(model), method, bits=bits, sym=False)


def test_double_quant_is_an_option_that_changes_the_constants_only():
    model = tiny_model("llama").model
    on, off = copy.deepcopy(model), copy.deepcopy(model)
    r_on = quantize(on, "nf4", bits=4, progress=False)
    r_off = quantize(off, "nf4", bits=4, double_quant=False, progress=False)
    assert r_on.spec.double_quant and not r_off.spec.double_quant
    w_on, w_off = on.model.layers[0].mlp.up_proj.weight, off.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(w_on, w_off) and (w_on - w_off).abs().max() < 0.01 * w_off.abs().max()
    assert storage(on, r_on.layers).bits_per_weight < storage(off, r_off.layers).bits_per_weight == 4.5
    with pytest.raises(MPTError, match="block size"):
        quantize(copy.deepcopy(model), "nf4", bits=4, group_size=None)


# ---------------------------------------------------------------------------------------- LLM.int8()
def _int8_layer(w, threshold=6.0, fp16_weights=False):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w.clone()
    return Int8MixedLinear(lin, threshold, fp16_weights)


def test_outlier_features_take_the_high_precision_path_by_hand():
    w = torch.tensor([[0.5, -1.0, 0.25, 2.0],
                      [-0.3, 0.7, 1.5, 0.1],
                      [1.0, 0.2, -0.4, -0.6]])
    x = torch.tensor([[0.9, -2.0, 8.0, 0.3],  # 8.0 >= 6: feature 2 is an outlier for every token
                      [1.2, 0.5, -0.7, -1.1]])
    layer = _int8_layer(w)
    out = layer(x)
    assert layer.last_outliers.tolist() == [2]
    # by hand: weights int8 per row; tokens int8 per row over features 0, 1, 3; feature 2 in float
    # against the de-quantized weight column
    expected = torch.zeros(2, 3, dtype=torch.float64)
    for o in range(3):
        sw = max(abs(float(v)) for v in w[o])
        cw = [round(127 * float(v) / sw) for v in w[o]]
        for t in range(2):
            sx = max(abs(float(x[t, j])) for j in (0, 1, 3))
            cx = {j: round(127 * float(x[t, j]) / sx) for j in (0, 1, 3)}
            acc = sum(cx[j] * cw[j] for j in (0, 1, 3))
            expected[t, o] = acc * sx * sw / 127**2 + float(x[t, 2]) * cw[2] * sw / 127
    assert torch.allclose(out.double(), expected, atol=1e-5, rtol=0)
    # fp16_weights: the outlier feature meets the original weight column instead
    exact_col = _int8_layer(w, fp16_weights=True)(x)
    assert torch.allclose(exact_col - out, (x[:, 2:3] * (w[:, 2] - layer.weight[:, 2])), atol=1e-5)


def test_without_outliers_it_is_pure_vectorwise_int8():
    gen = torch.Generator().manual_seed(5)
    w, x = torch.randn(24, 40, generator=gen), torch.randn(3, 7, 40, generator=gen)
    pure = fake_quant_per_token(x) @ quantize_weight(w, QuantSpec(8, None, sym=True)).t()
    layer = _int8_layer(w)
    assert torch.allclose(layer(x), pure, atol=1e-5) and layer.last_outliers.numel() == 0
    x[0, 0, 5] = 9.0  # an outlier: the default threshold decomposes, threshold 0 does not
    assert not torch.allclose(layer(x), fake_quant_per_token(x) @ quantize_weight(w, QuantSpec(8, None, True)).t(),
                              atol=1e-5)
    off = _int8_layer(w, threshold=0)
    assert torch.allclose(off(x), fake_quant_per_token(x) @ quantize_weight(w, QuantSpec(8, None, True)).t(),
                          atol=1e-5)


def test_decomposition_lowers_the_error_with_an_outlier_feature():
    gen = torch.Generator().manual_seed(6)
    w, x = torch.randn(32, 64, generator=gen) * 0.05, torch.randn(16, 64, generator=gen)
    x[:, 10] *= 40  # a systematic outlier dimension, as in large LLMs
    exact = x @ w.t()
    err = {t: float((_int8_layer(w, threshold=t)(x) - exact).pow(2).mean()) for t in (0.0, 6.0)}
    assert err[6.0] < 0.1 * err[0.0], err


def test_llm_int8_user_errors():
    model = tiny_model("llama").model
    with pytest.raises(MPTError, match="per output row"):
        quantize(model, "llm_int8", bits=8, group_size=128)
    with pytest.raises(MPTError, match="threshold"):
        quantize(model, "llm_int8", bits=8, threshold=-1.0)
    with pytest.raises(MPTError, match="did you mean 'threshold'"):
        quantize(model, "llm_int8", bits=8, treshold=5.0)


def test_fixed_formats_run_once_at_their_own_width_as_recipes(tmp_path):
    from mpt_utils.combined.grid import GridSetup
    from mpt_utils.quant import report
    from mpt_utils.quant.sweep import quant_recipes, quant_rows
    from mpt_utils.session import Session

    protocol = GridSetup(model="tiny-llama", eval_data="embedded-wiki", calib_data="embedded-wiki", seqlen=32,
                         n_calib=2, max_windows=2)
    loaded = tiny_model("llama")
    session = Session("tiny-llama", tmp_path, loader=lambda: loaded)
    recipes = quant_recipes(["rtn"], [4, 8], smoothquant_alpha=None, fixed_width=["nf4", "llm_int8"])
    assert recipes == ["rtn:4bit", "rtn:8bit", "nf4:4bit", "llm_int8:8bit"]  # each format at its own width
    rows = quant_rows(session.dense_point(protocol) + session.sweep(recipes, protocol))
    ppl = rows[rows.metric == "ppl"].set_index("method")
    assert ppl.loc["nf4", "bits"] == 4 and ppl.loc["llm_int8", "bits"] == 8 and ppl.loc["dense", "bits"] == 16
    assert ppl.loc["nf4", "scheme"] == "NF4 g64" and ppl.loc["llm_int8", "scheme"] == "LLM.int8()"
    assert ppl.loc["rtn", "scheme"].tolist() == ["RTN w4 g128 asym", "RTN w8 g128 asym"]
    t4 = report.table4(rows, bits=(4, 8))
    assert list(t4.index) == ["RTN", "NF4", "LLM.int8()"]
    assert pd.isna(t4.loc["NF4", "8 bits"]) and pd.isna(t4.loc["LLM.int8()", "4 bits"])
    table = report.per_point_table(rows)
    assert 4.12 < table.loc[("nf4", 4), "bits_per_weight"] < 4.2  # absmax constants (partial blocks of tiny rows)
    assert table.loc[("dense", 16), "compression"] == 0.0 and table.loc[("nf4", 4), "compression"] > 0
    with pytest.raises(MPTError, match="not a fixed-width quantizer"):
        quant_recipes([], [], smoothquant_alpha=None, fixed_width=["rtn"])
    with pytest.raises(MPTError, match="single torch quantization point"):
        quant_rows(session.point("wanda@0.5 > rtn:4bit", protocol))


def test_quant_recipes_write_only_what_differs_from_the_method_defaults():
    from mpt_utils.quant.sweep import quant_recipes

    assert quant_recipes(["gptq", "awq"], [3], options={"awq": {"n_grid": 10, "objective": "module"}}) == [
        "gptq:3bit", "awq:3bit[n_grid=10]", "smoothquant:8bit"]
    assert quant_recipes(["rtn"], [4, 4], group_size=None, sym=True, extra_bits={"rtn": [4, 5]},
                         smoothquant_alpha=0.5) == ["rtn:4bit/g0[sym=true]", "rtn:5bit/g0[sym=true]",
                                                    "smoothquant:8bit[alpha=0.5]"]
    assert quant_recipes(["rtn"], [2], group_size=64, smoothquant_alpha=None, fixed_width=["fp4"]) == [
        "rtn:2bit/g64", "fp4:4bit"]


def test_save_refuses_llm_int8_activations_unless_asked(tmp_path):
    from mpt_utils.save import save_compressed

    loaded = tiny_model("llama")
    model = copy.deepcopy(loaded.model)
    quantize(model, "llm_int8", bits=8, progress=False)
    with pytest.raises(MPTError, match="activation quantization"):
        save_compressed(model, None, tmp_path / "int8")
    saved = save_compressed(model, None, tmp_path / "int8", ignore_hooks=True)  # the int8 weights alone
    back = saved.path / "model.safetensors"
    assert back.exists()
    nf4 = copy.deepcopy(loaded.model)
    quantize(nf4, "nf4", bits=4, progress=False)
    save_compressed(nf4, None, tmp_path / "nf4")  # weight-only: a plain folder
