"""The phase-transition notebook runs end to end on the published tables (no model, no network)."""

import json

import pandas as pd
import papermill


def test_phase_transition_notebook_fits_every_published_curve(tmp_path):
    out = tmp_path / "00.ipynb"
    papermill.execute_notebook(
        "notebooks/00_phase_transition_fits.ipynb", str(out), kernel_name="python3", progress_bar=False,
        parameters={"store_dir": str(tmp_path / "store"), "figures_dir": str(tmp_path / "fig"), "profile": "test"},
    )
    text = json.dumps(json.loads(out.read_text()))
    assert "agreement" in text and "SparseGPT" in text and "Traceback" not in text
    for family in ("structured", "unstructured", "lowrank", "quantization"):
        assert (tmp_path / "fig" / f"00_ptp_{family}.png").exists()
    table = pd.read_csv(tmp_path / "store" / "ptp_published.csv")
    assert set(table["family"]) == {"structured", "unstructured", "lowrank", "quantization"}
    assert table["agreement"].notna().all() and table["verdict"].notna().all()
