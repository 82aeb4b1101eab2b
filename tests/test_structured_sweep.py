"""Side-by-side speed measurement and the resumable structured-pruning sweep (tiny models)."""

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from mpt_utils.errors import MPTError
from mpt_utils.eval.speed import measure_speed
from mpt_utils.prune.structured import sweep as sweep_mod
from mpt_utils.prune.structured.sweep import recovery_effect, structured_sweep
from mpt_utils.store import ResultsStore
from mpt_utils.testing import tiny_model


def test_measure_speed_reports_every_model_against_the_reference():
    a, b = tiny_model("llama").model, tiny_model("llama", layers=1).model
    for mode in ("prefill", "decode"):
        res = measure_speed({"dense": a, "small": b}, mode=mode, seqlen=16, new_tokens=4, rounds=2)
        by = {r.name: r for r in res}
        assert set(by) == {"dense", "small"} and by["dense"].speedup == pytest.approx(1.0)
        assert all(r.tokens_per_s > 0 and r.mode == mode for r in res)
        assert by["small"].n_params < by["dense"].n_params
    calls = []
    res = measure_speed({"fn": lambda ids: calls.append(ids.shape)}, seqlen=8, rounds=3, warmup=1)
    assert len(calls) == 4 and res[0].tokens == 8
    with pytest.raises(MPTError):
        measure_speed({})
    with pytest.raises(MPTError):
        measure_speed({"a": a}, mode="train")


@pytest.fixture
def corpus(tmp_path):
    rng = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north"]
    paras = []
    for _ in range(40):
        idx = torch.randint(0, len(words), (40,), generator=rng).tolist()
        paras.append(" ".join(words[i] for i in idx) + ".")
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paras))
    return str(path)


def _protocol(corpus, **kw):
    from mpt_utils.combined.grid import GridSetup

    return GridSetup(model="tiny-llama", eval_data=corpus, calib_data=corpus, seqlen=32, n_calib=4, max_windows=2,
                     seed=0, device="cpu", **kw)


def _session(tmp_path, loads=None):
    from mpt_utils.session import Session

    loaded = tiny_model("llama")

    def loader():
        if loads is not None:
            loads.append(1)
        return loaded

    return Session("tiny-llama", ResultsStore(tmp_path / "store"), device="cpu", loader=loader)


def test_sweep_prunes_each_model_once_for_every_measurement_and_resumes(tmp_path, corpus, monkeypatch):
    import mpt_utils.prune.structured as structured

    loads, pruned = [], []
    real = structured.structured_prune
    monkeypatch.setattr(structured, "structured_prune", lambda *a, **k: pruned.append(a[1:3]) or real(*a, **k))
    session, protocol = _session(tmp_path, loads), _protocol(corpus)
    extra = str(Path(corpus).with_name("extra.txt"))
    Path(extra).write_text(Path(corpus).read_text()[::-1])
    recipes = sweep_mod.structured_recipes(["shortgpt", "random"], [0.5], protocol=protocol)
    kw = dict(extra_eval_data=extra, speed={"ratios": [0.5], "rounds": 1, "seqlen": 16},
              recovery={"methods": ["random"], "steps": 2, "windows": 2, "seqlen": 32})
    df = structured_sweep(session, protocol, recipes, **kw)
    # one pruned model per recipe serves both corpora, the speed run and the recovery run
    assert sorted(pruned) == [("random", 0.5), ("shortgpt", 0.5)] and loads == [1]
    ppl = df[df.metric == "ppl"]
    assert len(ppl) == 6 and set(ppl.data) == {corpus, extra}  # 2 methods x 2 corpora + recovered random x 2
    assert set(ppl[ppl.recovered].method) == {"random"}
    assert set(df.metric) >= {"ppl", "kl_mean", "param_reduction", "block_reduction", "speedup", "n_params"}
    short = df[(df.method == "shortgpt") & (df.metric == "param_reduction")].value
    assert len(short) == 1 and 0.2 < short.item() < 0.5  # one size row per pruned model
    assert (df[df.method == "shortgpt"].param_reduction == short.item()).all()
    n_points = len(list(session.store.points.glob("*.json")))

    again = structured_sweep(_session(tmp_path, loads), protocol, recipes, **kw)
    assert loads == [1] and len(pruned) == 2  # read back: nothing loaded, nothing pruned
    assert len(again) == len(df) and len(list(session.store.points.glob("*.json"))) == n_points


def test_a_recipe_point_is_the_method_called_by_hand_on_its_share_of_the_windows(tmp_path, corpus):
    import copy

    from mpt_utils.eval.paired import PairedEvaluator
    from mpt_utils.prune.structured import structured_prune

    session, protocol = _session(tmp_path), _protocol(corpus)
    unprotected = {"early_barrier": 0, "latter_barrier": 0}  # the tiny model has 2 blocks
    recipe = sweep_mod.structured_recipes(["sleb"], [0.5], protocol=protocol, options={"sleb": unprotected},
                                          calibration={"sleb": {"n_calib": 2, "calib_seqlen": 16}})[0]
    assert recipe == "sleb@0.5[calib_seqlen=16,early_barrier=0,latter_barrier=0,n_calib=2]"
    rows = structured_sweep(session, protocol, [recipe])
    by_hand = copy.deepcopy(session.dense)
    windows = session.calib_ids(corpus, 4, 32, 0)[:2, :16]
    result = structured_prune(by_hand, "sleb", 0.5, windows, progress=False, **unprotected)
    step = rows[rows.metric == "prune_seconds"].detail.item()
    assert len(result.detail["removed_blocks"]) == 1 and step["removed_blocks"] == result.detail["removed_blocks"]
    paired = PairedEvaluator("tiny-llama", session.tokenizer, 32, 2)
    paired.prepare(session.dense, [corpus])
    ppl = next(r for r in paired.rows(by_hand, [corpus]) if r["metric"] == "ppl")["value"]
    assert rows[rows.metric == "ppl"].value.item() == pytest.approx(ppl, rel=1e-6)
    assert rows[rows.metric == "param_reduction"].value.item() == pytest.approx(result.param_reduction)


def test_calibration_shares_are_checked_before_any_work(corpus):
    from mpt_utils.recipe import Recipe

    protocol = _protocol(corpus)
    share = {"slicegpt": {"n_calib": 4}, "sleb": {"n_calib": 2, "calib_seqlen": 32}}
    # a share that is the whole protocol is no share: one computation, one key
    assert sweep_mod.structured_recipes(["slicegpt", "sleb", "random"], [0.2], calibration=share,
                                        protocol=protocol) == ["slicegpt@0.2", "sleb@0.2[n_calib=2]", "random@0.2"]
    with pytest.raises(MPTError, match="the protocol has 4"):
        sweep_mod.structured_recipes(["sleb"], [0.2], calibration={"sleb": {"n_calib": 8}}, protocol=protocol)
    with pytest.raises(MPTError, match="takes no calibration windows"):
        Recipe.parse("random@0.2[n_calib=2]")
    with pytest.raises(MPTError, match="positive whole number"):
        Recipe.parse("sleb@0.2[calib_seqlen=0]")
    with pytest.raises(MPTError, match="calibration windows of 64 tokens, the protocol has 4 of 32"):
        Recipe.parse("sleb@0.2[calib_seqlen=64]")[0].calibration(torch.zeros(4, 32, dtype=torch.long))
    assert sweep_mod.structured_step("llm_pruner", 0.2, {"n_samples": 10, "sample_len": 64}).options == ()


def test_recovery_effect_compares_each_point_with_and_without_lora():
    def row(label, ratio, recovered, value, data="wiki", metric="ppl"):
        return {"label": label, "ratio": ratio, "recovered": recovered, "value": value, "data": data, "metric": metric}

    rows = pd.DataFrame([row("A", 0.2, False, 20.0), row("A", 0.2, True, 15.0), row("A", 0.4, False, 40.0),
                         row("B", 0.2, False, 30.0), row("B", 0.2, True, 27.0), row("B", 0.4, False, math.inf),
                         row("B", 0.4, True, 50.0), row("A", 0.2, True, 1.0, data="news")])
    text = recovery_effect(rows, "wiki")
    assert text == ("LoRA recovery on 2 points: PPL ×0.82 of the unrecovered model (median; ×0.75 to ×0.90), "
                    "most for A at 0.2.")  # B at 0.4 collapsed without recovery: no ratio
    assert recovery_effect(rows[rows.label == "B"], "wiki") == ("LoRA recovery on 1 point: PPL ×0.90 of the "
                                                                 "unrecovered model (B at 0.2).")
    assert "No point was measured both" in recovery_effect(rows[~rows.recovered], "wiki")
    assert "No point was recovered" in recovery_effect(rows.drop(columns="recovered"), "wiki")
