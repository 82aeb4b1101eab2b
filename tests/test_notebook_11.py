"""Smoke run of the compression-laws notebook through papermill on two tiny random models."""

import json

import papermill


def test_compression_laws_notebook_runs_on_tiny_models(tmp_path):
    out = tmp_path / "11.ipynb"
    papermill.execute_notebook(
        "notebooks/11_compression_laws.ipynb", str(out), kernel_name="python3", progress_bar=False,
        parameters={"store_dir": str(tmp_path / "store"), "figures_dir": str(tmp_path / "fig"),
                    "models": ["tiny-llama", "tiny-gemma3_text"], "seqlen": 32, "n_calib": 4, "max_eval_windows": 2,
                    "ratios": [0.3, 0.6], "curve_ratios": [0.15, 0.45, 0.75], "rft_tokens": [64, 640],
                    "rft_ratios": [0.3, 0.6], "rft_models": [], "rft_seqlen": 32, "limit": 2, "speed_ratios": [0.6],
                    "speed_seqlen": 16, "speed_rounds": 1},
    )
    text = json.dumps(json.loads(out.read_text()))
    assert "slicegpt skipped" in text  # Gemma-3 blocks are named as unsupported, not crashed on
    assert "bits_per_byte" in text and "critical_ratio" in text
    assert any(f"{verdict}" in text for verdict in ("HOLDS", "DOES NOT HOLD", "INCONCLUSIVE"))
    for name in ("11_ce_vs_ratio", "11_accuracy_vs_ratio", "11_law_fit", "11_rft_budget", "11_speedup"):
        assert (tmp_path / "fig" / f"{name}.png").exists()
    # every point is a recipe point or a measurement of one, keyed by the recipe (the speed run: its recipes)
    configs = [json.loads(p.read_text())["config"] for p in (tmp_path / "store" / "points").glob("*.json")]
    assert {"dense", "random_prunenet@0.3", "slicegpt@0.6"} <= {c.get("recipe") for c in configs}
    assert {c.get("kind") for c in configs} == {None, "ce", "downstream", "rft", "speed"}
    assert all(c.get("recipe") or c.get("points") for c in configs)
    gemma = [c for c in configs if c["model"] == "tiny-gemma3_text"]
    assert gemma and not any("slicegpt" in str(c.get("recipe") or c.get("points")) for c in gemma)
