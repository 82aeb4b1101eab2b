"""Compression laws (mpt_utils.laws): the OLS law fit, r-shape selection, RandomPruneNet, LoRA RFT on
a token budget, the grid as recipe points and measurements of one session per model, the chunked GGUF
assembly and bits per byte. Tiny models only."""

from __future__ import annotations

import hashlib
import math
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from mpt_utils.errors import MPTError
from mpt_utils.laws import assets
from mpt_utils.laws.critical import crossing, recovery_fraction
from mpt_utils.laws.fit import fit_law, law_predict
from mpt_utils.laws.shape import compare_shapes
from mpt_utils.prune.structured.random_prunenet import kept_channels, random_prunenet
from mpt_utils.testing import tiny_model

TRUE = {"alpha": 0.9, "beta": 1.8, "gamma": 0.35}


def _synthetic(seed: int, noise: float = 0.02):
    rng = np.random.default_rng(seed)
    l0 = np.repeat([2.5, 3.0, 3.6, 4.2], 20)
    r = np.tile(np.repeat([0.1, 0.3, 0.5, 0.7, 0.9], 4), 4)
    d = np.tile([0, 1_000, 10_000, 100_000], 20)
    clean = law_predict([TRUE[t] for t in ("alpha", "beta", "gamma")], l0, r, d)
    return l0, r, d, clean * np.exp(rng.normal(0, noise, l0.size))


def test_ols_recovers_known_exponents_with_standard_errors():
    fit = fit_law(*_synthetic(seed=0))
    for term, true in TRUE.items():
        assert fit.se[term] > 0
        assert abs(fit.coef[term] - true) < 2.5 * fit.se[term], (term, fit.coef[term], fit.se[term])
        lo, hi = fit.ci[term]
        assert lo < fit.coef[term] < hi
    assert fit.r2 > 0.95 and fit.n == 80
    assert set(fit.table()["term"]) == set(TRUE)


def test_ols_standard_errors_are_calibrated():
    # the 95% intervals should cover the true exponent ~95% of the time over independent noise draws
    hits = {t: 0 for t in TRUE}
    draws = 200
    for seed in range(draws):
        fit = fit_law(*_synthetic(seed=seed + 1, noise=0.05))
        for t, true in TRUE.items():
            hits[t] += fit.ci[t][0] <= true <= fit.ci[t][1]
    for t in TRUE:
        assert 0.90 <= hits[t] / draws <= 0.99, (t, hits[t] / draws)


def test_law_fit_rejects_collinear_or_tiny_inputs():
    l0 = [3.0] * 6
    with pytest.raises(MPTError, match="collinear"):  # gamma cannot be told apart without several D
        fit_law(l0, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0] * 6, np.linspace(3, 4, 6))
    with pytest.raises(MPTError, match="points cannot fit"):
        fit_law([3.0, 3.5], [0.1, 0.2], [0, 10], [3.1, 3.9])


def test_shape_selection_finds_the_generating_curve():
    r = np.linspace(0, 0.9, 10)
    wins = {"quadratic": 0, "linear": 0}
    for seed in range(20):  # BIC's penalty lets noise pass for curvature now and then (~13% at n=10)
        rng = np.random.default_rng(seed)
        quad = 3.0 + 0.2 * r + 2.5 * r ** 2 + rng.normal(0, 0.01, r.size)
        line = 0.6 - 0.4 * r + rng.normal(0, 0.01, r.size)
        wins["quadratic"] += bool(compare_shapes(r, quad).set_index("shape")["best_bic"]["quadratic"])
        wins["linear"] += bool(compare_shapes(r, line).set_index("shape")["best_bic"]["linear"])
    assert wins["quadratic"] == 20
    assert wins["linear"] >= 15
    with pytest.raises(MPTError, match="at least 4"):
        compare_shapes([0, 0.5, 0.5], [1, 2, 3])


def test_random_prunenet_removes_the_stated_share_and_is_reproducible():
    a, b, c = (tiny_model("llama", seed=0).model for _ in range(3))
    before = sum(p.numel() for p in a.parameters())
    dense_gates = [layer.mlp.gate_proj.weight.clone() for layer in a.model.layers]
    d_ff = a.config.intermediate_size
    detail = random_prunenet(a, 0.6, seed=3)
    keep = kept_channels(d_ff, 0.6)
    gen = torch.Generator().manual_seed(3)  # one permutation per block, in block order, from one stream
    for gate, layer in zip(dense_gates, a.model.layers):
        assert torch.equal(layer.mlp.gate_proj.weight, gate[torch.randperm(d_ff, generator=gen)[:keep].sort().values])
    assert keep == int(0.4 * d_ff)
    assert all(layer.mlp.gate_proj.out_features == keep for layer in a.model.layers)
    assert detail["ffn_channel_reduction"] == pytest.approx(1 - keep / d_ff)
    hidden = a.config.hidden_size
    removed = len(a.model.layers) * (d_ff - keep) * 3 * hidden  # gate row, up row, down column per channel
    assert detail["param_reduction"] == pytest.approx(removed / before)
    assert a.config.intermediate_size == keep  # the config describes the pruned tensors
    random_prunenet(b, 0.6, seed=3)
    random_prunenet(c, 0.6, seed=4)
    same = all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert same
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    ids = torch.randint(0, 250, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(a(input_ids=ids).logits).all()


def test_random_prunenet_reaches_ratios_beyond_the_ffn_share():
    m = tiny_model("llama", seed=0).model
    detail = random_prunenet(m, 0.9, seed=0)  # PruneNet's ratio counts FFN channels, so 0.9 is allowed
    assert detail["ffn_channel_reduction"] > 0.85
    with pytest.raises(MPTError):
        random_prunenet(m, 1.0)


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "model", "prune", "law", "token", "loss", "the", "of", "a"]
    paragraphs = [" ".join(rng.choice(words, 60)) + "." for _ in range(80)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    return str(path)


def test_lora_rft_lowers_training_loss_of_a_pruned_tiny_model(corpus):
    from mpt_utils.laws.rft import lora_rft

    loaded = tiny_model("llama", seed=0)
    random_prunenet(loaded.model, 0.5, seed=0)
    shapes = {n: tuple(p.shape) for n, p in loaded.model.named_parameters()}
    info = lora_rft(loaded.model, loaded.tokenizer, 2048, corpus, seqlen=64, batch_size=4, lr=1e-2, seed=0)
    assert info["tokens"] == 32 * 64 and info["rft_steps"] == 8 and info["rft_rank"] == 16
    assert info["train_loss_after"] < info["train_loss_before"] - 0.05
    assert {n: tuple(p.shape) for n, p in loaded.model.named_parameters()} == shapes  # merged, plain model
    with pytest.raises(MPTError, match="exceeds"):
        lora_rft(loaded.model, loaded.tokenizer, 10**9, corpus, seqlen=64)


def test_lora_rft_point_is_stored_and_resumed(corpus, tmp_path, monkeypatch):
    from mpt_utils.laws import sweep
    from mpt_utils.store import ResultsStore

    calls = []
    real = sweep.lora_rft

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "lora_rft", counting)
    settings = sweep.LawSettings(eval_data=[corpus], calib_data=corpus, seqlen=32, n_calib=4, max_eval_windows=2,
                                 ratios=[0.5], tokens=[256], tasks=None, rft={"seqlen": 32, "batch_size": 2})
    models = {"tiny-llama": tiny_model("llama", seed=0)}
    store = ResultsStore(tmp_path / "store")
    first = sweep.law_sweep(models, store, settings, methods=["random_prunenet"], log=None)
    assert len(calls) == 1
    rft = first[first["recovered"]]
    assert set(rft["metric"]) == {"ce", "bpb"} and (rft["recovery"] == "lora_rft").all()
    assert (rft["tokens"] == 256).all()
    configs = [c for c in (pd.read_json(p, typ="series")["config"] for p in store.points.glob("*.json"))
               if c.get("kind") == "rft"]
    assert len(configs) == 1 and configs[0]["recipe"] == "random_prunenet@0.5" and configs[0]["tokens"] == 256
    assert configs[0]["rft"]["data"] == corpus and configs[0]["eval"] == [corpus]
    again = sweep.law_sweep(models, store, settings, methods=["random_prunenet"], log=None)
    assert len(calls) == 1  # resumed from the store, nothing retrained
    key = ["kind", "method", "ratio", "tokens", "metric"]
    pd.testing.assert_series_equal(first.sort_values(key)["value"].reset_index(drop=True),
                                   again.sort_values(key)["value"].reset_index(drop=True))


def test_law_points_and_fit_from_sweep_rows(corpus, tmp_path):
    from mpt_utils.laws import analysis, sweep
    from mpt_utils.laws.points import law_points
    from mpt_utils.store import ResultsStore

    settings = sweep.LawSettings(eval_data=[corpus], calib_data=corpus, seqlen=32, n_calib=4, max_eval_windows=2,
                                 ratios=[0.3, 0.6], curve_ratios=[0.1, 0.45, 0.9], tokens=[64, 512], tasks=None,
                                 rft={"seqlen": 32, "batch_size": 2})
    rows = sweep.law_sweep({"tiny-llama": tiny_model("llama", seed=0)}, ResultsStore(tmp_path / "s"), settings,
                           methods=["random_prunenet"], log=None)
    points = law_points(rows)
    assert set(points["ratio"]) == {0.1, 0.3, 0.45, 0.6, 0.9}
    assert set(points["tokens"]) == {0, 64, 512}
    assert (points["L0"] > 0).all()
    fits = analysis.fit_laws(points)
    assert set(fits[("random_prunenet", "intrinsic")].coef) == {"alpha", "beta", "gamma"}


def _law_settings(corpus, **kw):
    from mpt_utils.laws.sweep import LawSettings

    base = dict(eval_data=[corpus], calib_data=corpus, seqlen=32, n_calib=4, max_eval_windows=2, ratios=[0.3, 0.6],
                tokens=[], tasks=None, seed=0, device="cpu")
    return LawSettings(**{**base, **kw})


def test_a_recipe_point_is_random_prunenet_called_by_hand_on_a_copy(corpus, tmp_path):
    import copy

    from mpt_utils.laws.intrinsic import ce_rows
    from mpt_utils.laws.sweep import law_sweep
    from mpt_utils.recipe import Recipe
    from mpt_utils.session import Session
    from mpt_utils.store import ResultsStore

    settings = _law_settings(corpus, ratios=[0.6])
    session = Session("tiny-llama", ResultsStore(tmp_path / "s"), device="cpu", loaded=tiny_model("llama", seed=0))
    rows = law_sweep({"tiny-llama": session}, session.store, settings, methods=["random_prunenet"], log=None)
    by_hand = copy.deepcopy(session.dense)
    detail = random_prunenet(by_hand, 0.6, seed=0)
    model, reports = session.bench(settings.protocol("tiny-llama")).compressed_model(Recipe.parse("random_prunenet@0.6"))
    assert reports[0]["detail"]["kept_channels"] == detail["kept_channels"]
    for ours, theirs in zip(model.model.layers, by_hand.model.layers):  # the same channels, in the same order
        assert torch.equal(ours.mlp.gate_proj.weight, theirs.mlp.gate_proj.weight)
        assert torch.equal(ours.mlp.down_proj.weight, theirs.mlp.down_proj.weight)
    expected = next(r["value"] for r in ce_rows(by_hand, session.tokenizer, [corpus], 32, 2) if r["metric"] == "ce")
    ce = rows[(rows.method == "random_prunenet") & (rows.kind == "ce") & (rows.metric == "ce")]
    assert ce.value.tolist() == [expected]  # bit for bit
    assert ce.param_reduction.item() == detail["param_reduction"] and ce.n_params.item() == detail["n_params"]
    dense = rows[(rows.method == "dense") & (rows.metric == "ce")]
    assert dense.n_params.item() == sum(p.numel() for p in session.dense.parameters())
    assert dense.value.item() < ce.value.item()


def test_a_finished_sweep_loads_and_prunes_nothing_when_rerun(corpus, tmp_path, monkeypatch):
    import mpt_utils.prune.structured as structured
    from mpt_utils.laws.sweep import law_sweep
    from mpt_utils.store import ResultsStore

    loads, pruned = [], []
    real = structured.structured_prune
    monkeypatch.setattr(structured, "structured_prune", lambda *a, **k: pruned.append(a[1:3]) or real(*a, **k))
    loaded = tiny_model("llama", seed=0)

    def loader():
        loads.append(1)
        return loaded

    settings = _law_settings(corpus, tokens=[64], rft_ratios=[0.3], rft={"seqlen": 32, "batch_size": 2},
                             speed_ratios=[0.6], speed={"seqlen": 16, "rounds": 1})
    store = ResultsStore(tmp_path / "s")
    first = law_sweep({"tiny-llama": loader}, store, settings, log=None)
    # one pruned model per (method, ratio) serves its recipe point, ce, RFT and the speed run
    assert loads == [1] and sorted(pruned) == [("random_prunenet", 0.3), ("random_prunenet", 0.6),
                                               ("slicegpt", 0.3), ("slicegpt", 0.6)]
    assert set(first.kind) == {"ce", "speed"} and first.recovered.any()
    assert set(first[first.kind == "speed"].ratio) == {0.0, 0.6}
    n_points = len(list(store.points.glob("*.json")))
    again = law_sweep({"tiny-llama": loader}, store, settings, log=None)
    assert loads == [1] and len(pruned) == 4  # read back: nothing loaded, nothing pruned
    assert len(list(store.points.glob("*.json"))) == n_points
    key = ["kind", "method", "ratio", "tokens", "data", "metric"]
    pd.testing.assert_frame_equal(first.sort_values(key).reset_index(drop=True),
                                  again.sort_values(key).reset_index(drop=True), check_like=True)


def test_bad_methods_and_settings_fail_before_any_load(corpus, tmp_path):
    from mpt_utils.laws.sweep import law_sweep
    from mpt_utils.store import ResultsStore

    loads = []
    models = {"tiny-llama": lambda: loads.append(1) or tiny_model("llama")}
    with pytest.raises(MPTError, match="unknown compression-law methods"):
        law_sweep(models, ResultsStore(tmp_path / "s"), _law_settings(corpus), methods=["random_prunenet", "wanda"])
    with pytest.raises(MPTError, match="unknown RFT settings"):
        _law_settings(corpus, rft={"epochz": 2})
    with pytest.raises(MPTError):
        _law_settings(corpus, ratios=[1.2])
    assert loads == [] and not list((tmp_path / "s" / "points").glob("*.json"))


def test_unsupported_slicegpt_on_gemma3_blocks_is_named_before_work():
    from mpt_utils.laws.sweep import unsupported

    why = unsupported("slicegpt", tiny_model("gemma3_text", seed=0).model)
    assert why and "SliceGPT" in why
    assert unsupported("random_prunenet", tiny_model("gemma3_text", seed=0).model) is None
    assert unsupported("slicegpt", tiny_model("llama", seed=0).model) is None


def test_critical_ratio_crossing():
    assert crossing([0.1, 0.3, 0.5], [0.9, 0.7, 0.3], 0.5) == (pytest.approx(0.4), "interpolated")
    assert math.isnan(crossing([0.1, 0.3], [0.9, 0.8])[0])
    frac = recovery_fraction([4.0, 5.0], [3.5, 4.8], 3.0)
    assert frac.tolist() == pytest.approx([0.5, 0.1])


def test_scored_bytes_of_a_byte_tokenizer():
    from mpt_utils.laws.intrinsic import scored_bytes

    tok = tiny_model("llama").tokenizer
    ids = tok("plain ascii text " * 40, return_tensors="pt", add_special_tokens=False).input_ids[0]
    assert scored_bytes(tok, ids, 32, 3) == 3 * 31  # one byte per token, the first of each window unscored


def test_chunked_gguf_is_assembled_and_checked(tmp_path, monkeypatch):
    parts = [b"GGUF" + bytes(range(50)), bytes(range(100, 180)), b"tail"]
    for i, data in enumerate(parts):
        pkg = tmp_path / f"fakemodel_part{i + 1}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"m.gguf.part{i:02d}").write_bytes(data)
    main = tmp_path / "fakemodel"
    (main / "data").mkdir(parents=True)
    (main / "__init__.py").write_text("")
    whole = b"".join(parts)
    (main / "data" / "SHA256SUMS").write_text(f"{hashlib.sha256(whole).hexdigest()}  m.gguf\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(assets.CHUNKED, "fake", ("fakemodel", "m.gguf",
                                                 tuple((f"fakemodel_part{i + 1}", f"data/m.gguf.part{i:02d}")
                                                       for i in range(3))))
    path = assets.assemble_embedded("fake")
    assert path == main / "m.gguf" and path.read_bytes() == whole
    assert "fakemodel" not in sys.modules  # located, never imported
    path.unlink()
    (main / "data" / "SHA256SUMS").write_text(f"{'0' * 64}  m.gguf\n")
    with pytest.raises(MPTError, match="sha256"):
        assets.assemble_embedded("fake")
    assert not path.exists() and not list(main.glob(".m.gguf.*"))  # no half-written file left behind


def test_cross_entropy_matches_the_protocol_and_puts_bos_in_front(monkeypatch):
    from mpt_utils.eval.perplexity import perplexity
    from mpt_utils.laws import intrinsic

    loaded = tiny_model("llama", seed=0)
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(1))
    plain = intrinsic.cross_entropy(loaded.model, loaded.tokenizer, ids, 32, 4)
    assert plain.nll == pytest.approx(perplexity(loaded.model, ids, 32, max_windows=4, progress=False).nll)
    monkeypatch.setattr(intrinsic, "bos_id", lambda tok: 256)  # a tokenizer that starts texts with BOS
    with_bos = intrinsic.cross_entropy(loaded.model, loaded.tokenizer, ids, 32, 4)
    windows = ids[:128].view(4, 32)
    full = torch.cat([torch.full((4, 1), 256), windows], dim=1)
    with torch.no_grad():
        logits = loaded.model(input_ids=full).logits[:, 1:-1]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert with_bos.n_tokens == plain.n_tokens == 4 * 31
    assert with_bos.nll == pytest.approx(float(expected), rel=1e-5)
    assert with_bos.nll != pytest.approx(plain.nll)
