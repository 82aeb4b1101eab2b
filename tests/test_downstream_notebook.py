"""Smoke run of the downstream notebook through papermill on a tiny random model."""

import json

import papermill


def test_downstream_notebook_runs_on_tiny_model(tmp_path):
    out = tmp_path / "06.ipynb"
    papermill.execute_notebook(
        "notebooks/06_downstream.ipynb", str(out), kernel_name="python3", progress_bar=False,
        parameters={"store_dir": str(tmp_path / "store"), "figures_dir": str(tmp_path / "fig"),
                    "model": "tiny-llama", "limit": 8, "gguf": False},
    )
    text = json.dumps(json.loads(out.read_text()))
    assert "acc_minus_chance_in_se" in text and "standard tasks skipped" in text
    assert (tmp_path / "fig" / "06_downstream_offline.png").exists()
    assert (tmp_path / "fig" / "06_published_downstream.png").exists()
    assert list((tmp_path / "store" / "points").glob("*.json"))
