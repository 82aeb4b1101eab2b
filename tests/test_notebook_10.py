"""Smoke run of the failure-mode notebook through papermill on a tiny random model."""

import json

import papermill


def test_failure_mode_notebook_runs_on_tiny_model(tmp_path):
    out = tmp_path / "10.ipynb"
    params = {"store_dir": str(tmp_path / "store"), "figures_dir": str(tmp_path / "fig"), "model": "tiny-llama",
              "n_facts": 2, "probe_size": 3, "quant_bits": [2, 8], "inject_bits": [2],
              "prune_points": [["wanda", 0.5]], "lowrank_points": [["svd_llm", 0.3]], "diag_n_calib": 2,
              "diag_seqlen": 64, "ppl_windows": 1, "subspace_k": 4, "n_threads": 1}
    papermill.execute_notebook("notebooks/10_failure_modes.ipynb", str(out), kernel_name="python3",
                               progress_bar=False, parameters=params)
    text = json.dumps(json.loads(out.read_text()))
    assert "PTP vs onset of Computation Collapse" in text and "Paper claims reproduced" in text
    for name in ("10_layer_sensitivity", "10_logit_lens", "10_similarity_entropy_gates", "10_patching_restore",
                 "10_patching_inject"):
        assert (tmp_path / "fig" / f"{name}.png").exists(), name
    points = len(list((tmp_path / "store" / "points").glob("*.json")))
    # a rerun reads every point back from the store and computes nothing new
    papermill.execute_notebook("notebooks/10_failure_modes.ipynb", str(tmp_path / "10b.ipynb"),
                               kernel_name="python3", progress_bar=False, parameters=params)
    assert len(list((tmp_path / "store" / "points").glob("*.json"))) == points
