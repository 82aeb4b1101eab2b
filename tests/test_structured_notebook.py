"""Smoke run of the structured-pruning notebook through papermill on a tiny random model."""

import json

import papermill


def test_structured_notebook_runs_on_tiny_model(tmp_path):
    out = tmp_path / "04.ipynb"
    papermill.execute_notebook(
        "notebooks/04_structured_pruning.ipynb", str(out), kernel_name="python3", progress_bar=False,
        parameters={"store_dir": str(tmp_path / "store"), "figures_dir": str(tmp_path / "fig"),
                    "model": "tiny-llama", "seqlen": 64, "n_calib": 4, "max_eval_windows": 2,
                    "ratios": [0.25, 0.5], "extra_eval_ratios": [0.25], "sleb_windows": 2, "sleb_seqlen": 32,
                    "slicegpt_windows": 4, "llm_pruner_samples": 2, "llm_pruner_sample_len": 32,
                    "recovery_ratios": [0.5], "recovery_steps": 2, "recovery_seqlen": 32, "recovery_windows": 2,
                    "speed_ratios": [0.5], "speed_seqlen": 16, "speed_rounds": 1, "downstream_limit": 2,
                    "downstream_ratios": [0.5], "downstream_methods": ["random"],
                    "save_example": ["slicegpt", 0.25]},
    )
    text = json.dumps(json.loads(out.read_text()))
    assert "with LoRA" in text and "max_logit_diff" in text and "speedup" in text
    assert "same-top-1 %" in text and "Paired metric. " in text  # KL beside PPL, and its computed sentence
    for name in ("04_structured_ptp", "04_structured_recovery_size", "04_structured_speed", "04_structured_kl"):
        assert (tmp_path / "fig" / f"{name}.png").exists()
    import pandas as pd

    from mpt_utils.combined.grid import step_reports
    from mpt_utils.store import ResultsStore

    ptp = pd.read_csv(tmp_path / "store" / "04_ptp_structured.csv")
    ours = ptp[ptp.source == "tiny-llama"]
    assert set(ours.axis_unit) == {"weight bytes removed (measured)"} and "ptp (knob)" in ptp.columns
    # the curves' x values are the measured reductions, which differ from the requested knob values
    rows = ResultsStore(tmp_path / "store").frame()
    reports = step_reports(rows[rows.recipe.str.startswith("slicegpt@", na=False)].to_dict("records"))
    measured = {round(r["param_reduction"], 6) for r in reports}
    assert measured and not measured <= {0.25, 0.5}
    # every point is a recipe; SLEB's calibration share is part of it
    assert {"sleb@0.25[calib_seqlen=32,n_calib=2]", "random@0.5", "dense"} <= set(rows.recipe.dropna())
