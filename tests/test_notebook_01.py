"""Smoke run of the dense-baseline notebook through papermill on a tiny random model."""

import json

import papermill


def test_dense_baseline_notebook_runs_on_tiny_model(tmp_path):
    out = tmp_path / "01.ipynb"
    papermill.execute_notebook(
        "notebooks/01_dense_baseline.ipynb", str(out), kernel_name="python3", progress_bar=False,
        parameters={"store_dir": str(tmp_path / "store"), "figures_dir": str(tmp_path / "fig"),
                    "model": "tiny-llama", "seqlen": 64, "max_eval_windows": 2},
    )
    text = json.dumps(json.loads(out.read_text()))
    assert "tokens_scored" in text
    assert (tmp_path / "fig" / "01_dense_ppl.png").exists()
    assert list((tmp_path / "store" / "points").glob("*.json"))
