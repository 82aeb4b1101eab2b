"""Torch quantizers: RTN grid, GPTQ vs RTN, AWQ search, SmoothQuant, size accounting, errors."""

import copy

import pytest
import torch
from torch import nn

from mpt_utils.calibration import linear_layers
from mpt_utils.errors import MPTError
from mpt_utils.quant import QUANTIZERS, QuantResult, quantize
from mpt_utils.quant.awq import _fold_into_producer, grid_scales, linears_loss, output_error, search_scales
from mpt_utils.quant.gptq import block_stats, gptq_block, gptq_weight
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
    s, ratio, err, base = search_scales(weights, x.abs().mean(0), spec, linears_loss(weights, gram))
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
    quantize(a, "awq", bits=3, group_size=32, calib_ids=calib, progress=False, objective="linear")
    quantize(b, "awq", bits=3, group_size=32, stats=collect_stats(b, calib, progress=False), progress=False,
             objective="linear")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(MPTError, match="objective"):  # the default objective needs the blocks re-run
        quantize(b, "awq", bits=3, calib_ids=calib, stats=collect_stats(b, calib, progress=False), progress=False)


def test_recipe_points_resume_without_loading_the_model(tmp_path):
    from mpt_utils.combined.grid import GridSetup
    from mpt_utils.quant.sweep import quant_rows
    from mpt_utils.session import Session

    loads = []

    def loader():
        loads.append(1)
        return tiny_model("llama")

    protocol = GridSetup("tiny-llama", "embedded-wiki", "embedded-wiki", seqlen=32, n_calib=2, max_windows=2)
    first = Session("tiny-llama", tmp_path, loader=loader).point("gptq:4bit/g32", protocol)
    again = Session("tiny-llama", tmp_path, loader=loader).point("gptq:4bit/g32", protocol)
    assert loads == [1] and first == again
    rows = quant_rows(first)
    metrics = rows.set_index("metric")
    assert metrics.loc["ppl", "method"] == "gptq" and metrics.loc["ppl", "bits"] == 4
    assert metrics.loc["ppl", "scheme"] == "GPTQ w4 g32 asym"
    assert metrics.loc["bits_per_weight", "value"] == pytest.approx(4 + 20 / 32)  # 4-bit codes, fp16 scale, 4-bit zero
    assert metrics.loc["gptq_obs_loss", "value"] > 0


def test_a_recipe_point_is_quantizing_a_copy_by_hand(tmp_path):
    """The recipe engine adds nothing to the quantizer: same weights as `quantize` on a copy, same PPL
    as scoring that copy, and the bits per weight of the storage accounting."""
    from mpt_utils.combined.grid import GridSetup, metric
    from mpt_utils.data import calibration_windows
    from mpt_utils.eval.paired import PairedEvaluator
    from mpt_utils.quant.size import storage
    from mpt_utils.quant.sweep import quant_rows
    from mpt_utils.recipe import Recipe
    from mpt_utils.session import Session

    loaded = tiny_model("llama")
    calib = calibration_windows(loaded.tokenizer, "embedded-wiki", 2, 32, 0)
    paired = PairedEvaluator("tiny-llama", loaded.tokenizer, 32, 2, device="cpu")
    paired.prepare(loaded.model, ["embedded-wiki"])
    protocol = GridSetup("tiny-llama", "embedded-wiki", "embedded-wiki", seqlen=32, n_calib=2, max_windows=2,
                         device="cpu")
    session = Session("tiny-llama", tmp_path / "store", device="cpu", loader=lambda: loaded)
    for recipe, method, bits, kwargs in (("gptq:3bit/g32", "gptq", 3, {"group_size": 32}),
                                         ("rtn:4bit/g0[sym=true]", "rtn", 4, {"group_size": None, "sym": True}),
                                         ("nf4:4bit", "nf4", 4, {})):
        rows = session.point(recipe, protocol)
        by_hand = copy.deepcopy(loaded.model)
        result = quantize(by_hand, method, bits=bits, calib_ids=calib, device="cpu", progress=False, **kwargs)
        model, _ = session.bench(protocol).compressed_model(Recipe.parse(recipe))  # the point's own model
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), by_hand.state_dict().values()))
        hand_ppl = paired.rows(by_hand, ["embedded-wiki"])[0]["value"]
        assert metric(rows, "ppl")["value"] == pytest.approx(hand_ppl, rel=1e-6)
        bpw = quant_rows(rows).set_index("metric").loc["bits_per_weight", "value"]
        assert bpw == storage(by_hand, result.layers).bits_per_weight


# -- reference fidelity: AWQ (llm-awq), GPTQ (IST-DASLab/gptq), SmoothQuant (mit-han-lab/smoothquant) ---------
def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _call_with(module: nn.Module, args: tuple, kwargs: dict, x: torch.Tensor):
    """Re-run a recorded call of `module` with its hidden-state input replaced by `x`."""
    if args:
        return module(x, *args[1:], **kwargs)
    return module(**{**kwargs, "hidden_states": x})


def _calls(model: nn.Module, module: nn.Module, ids: torch.Tensor) -> list:
    """(args, kwargs) of every call of `module` while the model runs each window of `ids`."""
    calls = []
    handle = module.register_forward_pre_hook(lambda _m, a, k: calls.append((a, k)), with_kwargs=True)
    with torch.no_grad():
        for window in ids:
            model(input_ids=window.unsqueeze(0), use_cache=False)
    handle.remove()
    return calls


def test_awq_qkv_objective_is_the_attention_output_error():
    model = tiny_model("llama").model
    calib = torch.randint(0, 258, (2, 32), generator=torch.Generator().manual_seed(5))
    attn = copy.deepcopy(model.model.layers[0].self_attn)  # dense copy, to measure by hand
    calls = _calls(model, model.model.layers[0].self_attn, calib)
    spec = QuantSpec(3, 32)
    res = quantize(model, "awq", bits=3, group_size=32, calib_ids=calib, progress=False)
    rec = res.extra["searches"]["0:self_attn.q_proj+self_attn.k_proj+self_attn.v_proj"]
    assert rec["inspected"] == "self_attn"

    with torch.no_grad():
        x = torch.cat([_input(a, k) for a, k in calls]).reshape(-1, 64)
        dense_out = [_first(attn(*a, **k)) for a, k in calls]

        @torch.no_grad()
        def attention_error(ratio: float) -> float:  # mean squared error of the attention output
            s = grid_scales(x.abs().mean(0), ratio)
            trial = copy.deepcopy(attn)
            for lin in (trial.q_proj, trial.k_proj, trial.v_proj):
                lin.weight.data = quantize_weight(lin.weight * s, spec) / s
            diffs = [(_first(trial(*a, **k)) - ref).pow(2) for (a, k), ref in zip(calls, dense_out)]
            return float(sum(d.sum() for d in diffs) / sum(d.numel() for d in diffs))

    assert rec["error"] == pytest.approx(attention_error(rec["ratio"]), rel=1e-4)
    assert rec["error_scale1"] == pytest.approx(attention_error(0.0), rel=1e-4)  # s = 1: plain RTN
    assert rec["error"] <= rec["error_scale1"]
    assert 0.0 <= rec["ratio"] < 1.0


def test_awq_module_objective_changes_the_search_and_keeps_the_model_usable():
    calib = torch.randint(0, 258, (2, 32), generator=torch.Generator().manual_seed(6))
    ids = torch.randint(0, 258, (1, 32), generator=torch.Generator().manual_seed(7))
    dense = tiny_model("llama").model
    with torch.no_grad():
        ref = dense(ids).logits
    searches = {}
    for objective in ("module", "linear"):
        model = tiny_model("llama").model
        res = quantize(model, "awq", bits=4, group_size=32, calib_ids=calib, progress=False, objective=objective)
        assert res.extra["objective"] == objective
        searches[objective] = res.extra["searches"]
        with torch.no_grad():
            logits = model(ids).logits
        assert torch.isfinite(logits).all() and float((logits - ref).abs().max()) < 0.5 * float(ref.abs().max())
    assert set(searches["module"]) == set(searches["linear"])
    inspected = {key.split(":", 1)[1]: rec["inspected"] for key, rec in searches["module"].items()}
    assert inspected["mlp.gate_proj+mlp.up_proj"] == "mlp" and inspected["mlp.down_proj"] == "mlp.down_proj"
    with pytest.raises(MPTError, match="objective"):
        quantize(tiny_model("llama").model, "awq", bits=4, calib_ids=calib, objective="block")


def _outlier_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = _correlated(seed=seed)
    gen = torch.Generator().manual_seed(100 + seed)
    x[:, torch.randperm(64, generator=gen)[:4]] *= 20  # a few outlier input columns, anywhere
    return x, torch.randn(48, 64, generator=gen)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spec", [QuantSpec(3, None), QuantSpec(4, None), QuantSpec(3, 32)])
def test_gptq_act_order_lowers_the_error_with_outlier_columns(seed, spec):
    x, w = _outlier_inputs(seed)
    h = 2 * x.t() @ x / x.shape[0]

    def err(q):
        return float((x @ (w - q).t()).pow(2).sum())

    plain = err(gptq_weight(w, h, spec)[0])
    for static in (False, True):
        assert err(gptq_weight(w, h, spec, act_order=True, static_groups=static)[0]) < 0.95 * plain


def test_gptq_static_groups_keep_contiguous_groups_under_act_order():
    x, w = _outlier_inputs(0)
    h = 2 * x.t() @ x / x.shape[0]
    spec = QuantSpec(2, 16)
    static, _ = gptq_weight(w, h, spec, act_order=True, static_groups=True)
    for row in static:  # each original run of 16 columns shares one 2-bit grid
        assert all(row[j : j + 16].unique().numel() <= 4 for j in range(0, 64, 16))
    dynamic, _ = gptq_weight(w, h, spec, act_order=True, static_groups=False)
    perm = torch.argsort(torch.diagonal(h), descending=True)
    for row in dynamic[:, perm]:  # dynamic groups are runs of the visiting order instead
        assert all(row[j : j + 16].unique().numel() <= 4 for j in range(0, 64, 16))

    model = tiny_model("llama").model
    calib = torch.randint(0, 258, (2, 32))
    kinds = {s: quantize(copy.deepcopy(model), "gptq", bits=4, group_size=32, calib_ids=calib, progress=False,
                         static_groups=s).spec for s in (True, False)}
    assert not kinds[True].act_order_index and kinds[False].act_order_index  # a group index per column


def test_gptq_true_sequential_recalibrates_later_linears():
    model = tiny_model("llama").model
    calib = torch.randint(0, 258, (4, 48), generator=torch.Generator().manual_seed(8))
    block = model.model.layers[0]
    calls = _calls(model, block, calib)
    names = list(linear_layers(block))
    stats = block_stats(block, names, calls)
    spec = QuantSpec(3, 32)
    with torch.no_grad():
        dense_out = [_first(block(*a, **k)) for a, k in calls]

    def block_error(b: nn.Module) -> float:
        with torch.no_grad():
            return float(sum((_first(b(*a, **k)) - ref).pow(2).sum() for (a, k), ref in zip(calls, dense_out)))

    together, sequential = copy.deepcopy(block), copy.deepcopy(block)
    _, used_together = gptq_block(together, stats, spec)
    _, used = gptq_block(sequential, stats, spec, calls=calls)
    # q/k/v come first and see the dense block; o_proj sees the block with q/k/v quantized
    assert used["self_attn.q_proj"] is stats["self_attn.q_proj"]
    assert all(used_together[n] is stats[n] for n in names)
    by_hand = copy.deepcopy(block)
    for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        lin = by_hand.get_submodule(n)
        lin.weight.data = gptq_weight(lin.weight, stats[n].hessian, spec, act_order=True, static_groups=True)[0]
    o_stats = block_stats(by_hand, ["self_attn.o_proj"], calls)["self_attn.o_proj"]
    assert torch.allclose(used["self_attn.o_proj"].gram, o_stats.gram, rtol=1e-5, atol=1e-6)
    for n in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert not torch.allclose(used[n].gram, stats[n].gram, rtol=1e-4)
    assert block_error(sequential) <= block_error(together)


def test_gptq_defaults_follow_the_reference_llama_recipe():
    model = tiny_model("llama").model
    res = quantize(model, "gptq", bits=4, group_size=32, calib_ids=torch.randint(0, 258, (2, 32)), progress=False)
    assert res.extra["act_order"] and res.extra["true_sequential"] and res.extra["static_groups"]
    assert set(res.layers) == set(block_linears(model))


def test_smoothquant_scales_are_the_formula_by_hand():
    model = tiny_model("llama").model
    ids = torch.randint(0, 258, (2, 32), generator=torch.Generator().manual_seed(9))
    block = model.model.layers[0]
    inputs = [_input(a, k) for a, k in _calls(model, block.self_attn.q_proj, ids)]
    x_max = torch.cat(inputs).reshape(-1, 64).abs().amax(0)
    attn = block.self_attn
    w_max = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).abs().amax(0)
    expected = (x_max**0.85 / w_max**0.15).detach()
    norm = block.input_layernorm.weight.detach().clone()
    res = quantize(model, "smoothquant", bits=8, calib_ids=ids, progress=False)
    assert res.extra["alpha"] == 0.85
    assert torch.allclose(norm / block.input_layernorm.weight.detach(), expected, rtol=1e-5)


def test_smoothquant_bmm_inputs_are_int8():
    ids = torch.randint(0, 258, (2, 32), generator=torch.Generator().manual_seed(10))
    dense, on, off = (tiny_model("llama").model for _ in range(3))
    res_on = quantize(on, "smoothquant", bits=8, calib_ids=ids, progress=False)
    res_off = quantize(off, "smoothquant", bits=8, calib_ids=ids, progress=False, quantize_bmm_input=False)
    assert res_on.extra["quantize_bmm_input"] is True and res_off.extra["quantize_bmm_input"] is False

    calls = _calls(dense, dense.model.layers[0].self_attn, ids)  # dense attention inputs
    outs = {}
    for name, model in (("dense", dense), ("on", on), ("off", off)):
        attn = model.model.layers[0].self_attn
        # inputs of the smoothed attention: the dense ones / s (the norm's weight moved into q/k/v)
        s = dense.model.layers[0].input_layernorm.weight / model.model.layers[0].input_layernorm.weight
        with torch.no_grad():
            xs = [_input(a, k) / s for a, k in calls]
            q_out = [attn.q_proj(x) for x in xs]
            outs[name] = torch.cat([_first(_call_with(attn, a, k, x)) for (a, k), x in zip(calls, xs)])
        if name == "on":  # q/k/v outputs sit on their per-token int8 grid
            assert all(torch.allclose(fake_quant_per_token(q), q, atol=1e-6) for q in q_out)
    size = outs["dense"].norm()
    bmm = (outs["on"] - outs["off"]).norm() / size
    total = (outs["on"] - outs["dense"]).norm() / size
    # int8 per token: each q/k/v element moves by at most half a step (max|row| / 254); through the
    # attention that stays within about one step of the output's scale
    assert 0 < bmm < 2 / 127
    assert bmm < total < 4 / 127  # W8A8 + int8 BMM inputs against float
