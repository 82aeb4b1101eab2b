"""Side-by-side speed measurement and the resumable structured-pruning sweep (tiny models)."""

import math

import pandas as pd
import pytest
import torch

from mpt_utils.errors import MPTError
from mpt_utils.eval.speed import measure_speed
from mpt_utils.prune.structured import sweep as sweep_mod
from mpt_utils.prune.structured.sweep import SweepSettings, recovery_effect, structured_sweep
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


def test_sweep_stores_points_and_resumes(tmp_path, corpus, monkeypatch):
    loaded = tiny_model("llama")
    store = ResultsStore(tmp_path / "store")
    settings = SweepSettings(model="tiny-llama", eval_data=corpus, calib_data=corpus, seqlen=32, n_calib=4,
                             max_eval_windows=2, speed={"ratios": [0.5], "rounds": 1, "seqlen": 16},
                             recovery={"methods": ["random"], "steps": 2, "windows": 2, "seqlen": 32})
    df = structured_sweep(loaded, store, settings, ["shortgpt", "random"], [0.5], log=None)
    ppl = df[(df.metric == "ppl")]
    assert len(ppl) == 3 and set(ppl.recovered) == {False, True}
    assert set(df.metric) >= {"ppl", "param_reduction", "block_reduction", "speedup", "n_params"}
    short = df[(df.method == "shortgpt") & (df.metric == "param_reduction")].value.item()
    assert 0.2 < short < 0.5
    n_points = len(list(store.points.glob("*.json")))

    def boom(*a, **k):
        raise AssertionError("a finished point was recomputed")

    monkeypatch.setattr(sweep_mod, "structured_prune", boom)
    again = structured_sweep(loaded, store, settings, ["shortgpt", "random"], [0.5], log=None)
    assert len(again) == len(df) and len(list(store.points.glob("*.json"))) == n_points


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
