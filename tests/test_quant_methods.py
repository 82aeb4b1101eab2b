"""Torch quantizers: RTN grid, GPTQ vs RTN, AWQ search, SmoothQuant, size accounting, errors."""

import pytest
import torch
from torch import nn

from mpt_utils.errors import MPTError
from mpt_utils.quant import QUANTIZERS, QuantResult, quantize
from mpt_utils.quant.awq import _fold_into_producer, output_error, search_scales
from mpt_utils.quant.gptq import gptq_weight
from mpt_utils.quant.rtn import QuantSpec, block_linears, quantize_weight
from mpt_utils.quant.size import linear_bits, storage
from mpt_utils.quant.smoothquant import fake_quant_per_token
from mpt_utils.testing import tiny_model


def _on_grid(spec: QuantSpec, out_f: int = 6, in_f: int = 64, seed: int = 0) -> torch.Tensor:
    """A weight whose every group already sits on `spec`'s grid, end codes present in each group."""
    gen = torch.Generator().manual_seed(seed)
    g = spec.group_size or in_f
    n_groups = in_f // g
    if spec.sym:
        qmax = 2 ** (spec.bits - 1) - 1
        codes = torch.randint(-qmax, qmax + 1, (out_f, n_groups, g), generator=gen).float()
        codes[..., 0], codes[..., 1] = -qmax, qmax
        zero = torch.zeros(out_f, n_groups, 1)
    else:
        maxq = 2**spec.bits - 1
        codes = torch.randint(0, maxq + 1, (out_f, n_groups, g), generator=gen).float()
        codes[..., 0], codes[..., 1] = 0, maxq
        zero = torch.randint(0, maxq + 1, (out_f, n_groups, 1), generator=gen).float()
        if spec.zero == "float":
            zero = zero + torch.rand(out_f, n_groups, 1, generator=gen)  # offsets off the integer lattice
    scale = torch.rand(out_f, n_groups, 1, generator=gen) * 0.1 + 0.01
    return ((codes - zero) * scale).reshape(out_f, in_f)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", [dict(sym=True), dict(sym=False), dict(sym=False, zero="float")])
@pytest.mark.parametrize("group_size", [16, None])
def test_rtn_round_trips_exactly_on_grid(bits, kind, group_size):
    spec = QuantSpec(bits, group_size, **kind)
    w = _on_grid(spec)
    assert torch.allclose(quantize_weight(w, spec), w, atol=1e-6 * float(w.abs().max()), rtol=0)


@pytest.mark.parametrize("kind", [dict(sym=True), dict(sym=False), dict(sym=False, zero="float")])
def test_rtn_error_shrinks_with_bits(kind):
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    errors = [float((quantize_weight(w, QuantSpec(b, 32, **kind)) - w).pow(2).sum()) for b in range(2, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_rtn_partial_last_group_and_levels():
    w = torch.randn(4, 80, generator=torch.Generator().manual_seed(2))  # 80 = 64 + a partial group of 16
    q = quantize_weight(w, QuantSpec(3, 64))
    for row in q:
        assert row[:64].unique().numel() <= 8 and row[64:].unique().numel() <= 8


def _correlated(n: int = 2048, d: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen) / d**0.5 + torch.eye(d)
    x = torch.randn(n, d, generator=gen) @ mix
    return x * (torch.rand(d, generator=gen) * 3 + 0.2)  # uneven channel scales, as in LLMs


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(bits, act_order):
    x = _correlated()
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(3))
    h = 2 * x.t() @ x / x.shape[0]
    spec = QuantSpec(bits, 32)
    q_gptq, _ = gptq_weight(w, h, spec, act_order=act_order)
    q_rtn = quantize_weight(w, spec)

    def err(q):
        return float((x @ (w - q).t()).pow(2).sum())

    assert err(q_gptq) < err(q_rtn)


def test_gptq_output_sits_on_a_grid():
    x = _correlated(512, 32)
    w = torch.randn(8, 32)
    q, _ = gptq_weight(w, 2 * x.t() @ x / 512, QuantSpec(2, 16))
    for row in q:
        assert row[:16].unique().numel() <= 4 and row[16:].unique().numel() <= 4


@pytest.mark.parametrize("bits", [3, 4])
def test_awq_search_never_worse_than_unit_scale(bits):
    x = _correlated(1024, 64, seed=4)
    x[:, :3] *= 20  # salient channels
    weights = [torch.randn(32, 64), torch.randn(16, 64)]
    gram = x.t() @ x
    spec = QuantSpec(bits, 32)
    s, ratio, err, base = search_scales(weights, gram, x.abs().mean(0), spec)
    unit = sum(float(output_error(w, quantize_weight(w, spec), gram)) for w in weights)
    assert err <= base + 1e-6 and abs(base - unit) <= 1e-4 * unit
    assert s.shape == (64,) and 0.0 <= ratio < 1.0


def test_awq_fold_is_an_exact_equivalence():
    block = tiny_model("llama").model.model.layers[0]
    x = torch.randn(1, 8, 64)
    norm, q = block.input_layernorm, block.self_attn.q_proj
    before = q(norm(x))
    s = torch.rand(64) + 0.5
    _fold_into_producer(norm, s)
    q.weight.data.mul_(s)
    assert torch.allclose(q(norm(x)), before, atol=1e-5)


def test_size_accounting_matches_hand_count():
    # 8x64, 4-bit, g32, int zero: 2048 code bits + 16 groups x (16-bit scale + 4-bit zero) = 2368 bits
    assert linear_bits(8, 64, QuantSpec(4, 32)) == 8 * 64 * 4 + 16 * 20
    assert linear_bits(8, 64, QuantSpec(4, 32, sym=True)) == 2048 + 16 * 16
    assert linear_bits(8, 64, QuantSpec(3, None, zero="float")) == 8 * 64 * 3 + 8 * 32
    assert linear_bits(8, 80, QuantSpec(4, 32)) == 8 * 80 * 4 + 8 * 3 * 20  # partial group counts whole
    assert linear_bits(8, 64, QuantSpec(4, 32, act_order_index=True)) == 2368 + 64 * 32

    model = nn.Sequential(nn.Linear(64, 8, bias=False), nn.LayerNorm(8))
    rep = storage(model, {"0": QuantSpec(4, 32)})
    assert rep.quant_bytes == 2368 // 8 and rep.other_bytes == 16 * 2  # LayerNorm weight+bias at fp16
    assert rep.total_bytes == 296 + 32
    assert rep.bits_per_weight == pytest.approx(2368 / 512)
    assert rep.ratio == pytest.approx(1 - 328 / ((512 + 16) * 2))


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_quantizers_touch_only_block_linears(method):
    loaded = tiny_model("llama")
    model = loaded.model
    head = model.lm_head.weight.clone()
    calib = torch.randint(0, 258, (2, 32))
    res = quantize(model, method, bits=3, group_size=32, calib_ids=calib, progress=False)
    assert isinstance(res, QuantResult) and set(res.layers) == set(block_linears(model))
    assert torch.equal(model.lm_head.weight, head)
    for lin in block_linears(model).values():
        assert lin.weight[0, :32].unique().numel() <= 8


def test_smoothquant_w8a8_is_close_to_dense():
    model = tiny_model("llama").model
    ids = torch.randint(0, 258, (2, 32))
    ref = model(ids).logits
    res = quantize(model, "smoothquant", bits=8, calib_ids=ids, progress=False, alpha=0.5)
    assert res.act_bits == 8
    got = model(ids).logits
    assert not torch.equal(got, ref) and torch.allclose(got, ref, atol=0.05)
    x = torch.randn(3, 5, 16)
    fq = fake_quant_per_token(x)
    assert torch.allclose(fq, x, atol=float(x.abs().max()) / 127)
    assert all(t.unique().numel() <= 255 for t in fq.reshape(-1, 16))


@pytest.mark.parametrize("bad", [1, 9, 3.5, "4"])
def test_unsupported_bits_raise_clear_errors(bad):
    with pytest.raises(MPTError, match="bits"):
        quantize(tiny_model("llama").model, "rtn", bits=bad)


def test_other_user_errors():
    model = tiny_model("llama").model
    with pytest.raises(MPTError, match="smoothquant"):
        quantize(model, "smoothquant", bits=4, calib_ids=torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(MPTError, match="calibration"):
        quantize(model, "gptq", bits=4)
    with pytest.raises(MPTError, match="unknown quantizer"):
        QUANTIZERS.get("nf4-magic")
    with pytest.raises(MPTError, match="group_size"):
        quantize(model, "rtn", bits=4, group_size=-7)


def test_awq_with_shared_dense_stats_is_identical():
    from mpt_utils.calibration import collect_stats

    calib = torch.randint(0, 258, (2, 32))
    a, b = tiny_model("llama").model, tiny_model("llama").model
    quantize(a, "awq", bits=3, group_size=32, calib_ids=calib, progress=False)
    quantize(b, "awq", bits=3, group_size=32, stats=collect_stats(b, calib, progress=False), progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_sweep_points_resume_without_loading_the_model(tmp_path):
    from mpt_utils.quant.sweep import Setup, Workbench, quant_point
    from mpt_utils.store import ResultsStore

    loads = []

    def loader():
        loads.append(1)
        return tiny_model("llama")

    store = ResultsStore(tmp_path)
    setup = Setup("tiny-llama", "embedded-wiki", "embedded-wiki", seqlen=32, n_calib=2, max_windows=2)
    first = quant_point(store, Workbench(setup, loader), "gptq", 4, group_size=32, progress=False)
    again = quant_point(store, Workbench(setup, loader), "gptq", 4, group_size=32, progress=False)
    assert loads == [1] and first == again
    metrics = {r["metric"]: r for r in first}
    assert metrics["ppl"]["family"] == "quant" and metrics["ppl"]["bits"] == 4
    assert metrics["bits_per_weight"]["value"] == pytest.approx(4 + 20 / 32)
