"""The phase-avoidance notebook runs on the published curves (no model needed)."""

import json

import papermill


def test_phase_avoidance_notebook_runs(tmp_path):
    out = tmp_path / "07.ipynb"
    papermill.execute_notebook("notebooks/07_phase_avoidance.ipynb", str(out), kernel_name="python3",
                               progress_bar=False, parameters={"figures_dir": str(tmp_path / "fig")})
    text = json.dumps(json.loads(out.read_text()))
    assert "predicted PPL" in text and (tmp_path / "fig" / "07_trajectory.png").exists()
