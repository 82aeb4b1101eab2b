"""Smoke run of the quantization notebook through papermill on a tiny random model."""

import json

import papermill
import pytest

from mpt_utils.native import has_llama_cpp

pytestmark = pytest.mark.skipif(not has_llama_cpp(), reason="the notebook's GGUF ladder needs llama-cpp-python")


def test_quantization_notebook_runs_on_tiny_model(tmp_path):
    out = tmp_path / "03.ipynb"
    papermill.execute_notebook(
        "notebooks/03_quantization.ipynb", str(out), kernel_name="python3", progress_bar=False,
        parameters={"store_dir": str(tmp_path / "store"), "figures_dir": str(tmp_path / "fig"),
                    "model": "tiny-llama", "seqlen": 64, "n_calib": 2, "max_eval_windows": 2,
                    "bits_list": [2, 4, 8], "rtn_extra_bits": [3, 5, 6],
                    "gguf_schemes": ["F32", "F16", "Q8_0", "Q4_0", "Q2_K", "IQ2_XXS"]},
    )
    text = json.dumps(json.loads(out.read_text()))
    assert "round trip" in text and "PTP" in text
    assert "same-top-1 %" in text and "paired metric: " in text  # KL beside PPL, and its sentence
    for name in ("03_quant_ptp_bits", "03_fig4_ppl_vs_size", "03_quant_kl_bits"):
        assert (tmp_path / "fig" / f"{name}.png").exists()
    assert list((tmp_path / "store" / "points").glob("*.json"))
