"""Smoke run of the low-rank notebook through papermill on a tiny random model."""

import json

import papermill

from mpt_utils.store import ResultsStore


def test_low_rank_notebook_runs_on_tiny_model(tmp_path):
    out = tmp_path / "05.ipynb"
    papermill.execute_notebook(
        "notebooks/05_low_rank.ipynb", str(out), kernel_name="python3", progress_bar=False,
        parameters={"store_dir": str(tmp_path / "store"), "figures_dir": str(tmp_path / "fig"),
                    "model": "tiny-llama", "seqlen": 64, "n_calib": 4, "max_eval_windows": 2,
                    "ratios": [0.0, 0.2, 0.3], "svd_llm_extra_ratios": [0.5], "extra_eval_ratios": [0.2],
                    "sequential_ratios": [0.2], "svd_llm_options": {"update_steps": 1},
                    "asvd_candidates": [0.2, 0.5], "asvd_sens_seqlen": 32,
                    "speed_ratios": [0.3], "speed_seqlen": 32, "speed_rounds": 1,
                    "method_options": {"sola": {"skip_layers": 0}}},  # the tiny model has too few blocks to skip 2+2
    )
    text = json.dumps(json.loads(out.read_text()))
    assert "SVD-LLM (seq)" in text and "speedup" in text
    assert "SVD-LLM V2" in text and "FLAT-LLM" in text and "SoLA" in text  # every curve of the default methods
    assert "not implemented here: SFSD" in text and "here: SFSD, SoLA" not in text  # Fig. 5 methods the suite lacks
    assert "same-top-1 %" in text and "Paired metric. " in text  # KL beside PPL, and its computed sentence
    for name in ("05_lowrank_ptp", "05_lowrank_modes", "05_lowrank_speed", "05_asvd_allocation", "05_lowrank_kl"):
        assert (tmp_path / "fig" / f"{name}.png").exists()
    assert (tmp_path / "store" / "05_ptp_lowrank.csv").exists()
    recipes = {json.loads(p.read_text())["config"].get("recipe") for p in (tmp_path / "store" / "points").glob("*.json")}
    # svd_llm_options reach both SVD-LLM curves; the extra corpus scores the same recipe at 20%
    assert {"svd_llm@0.2[update_steps=1]", "svd_llm@0.2[sequential=true,update_steps=1]", "dense"} <= recipes
    stored = ResultsStore(tmp_path / "store").frame()
    assert set(stored.loc[stored.recipe == "svd@0.2", "data"].dropna()) == {"embedded-wiki", "embedded-news"}
