"""Smoke run of the unstructured-pruning notebook through papermill on a tiny random model."""

import json

import papermill


def test_pruning_notebook_runs_on_tiny_model(tmp_path):
    out = tmp_path / "02.ipynb"
    papermill.execute_notebook(
        "notebooks/02_unstructured_pruning.ipynb", str(out), kernel_name="python3", progress_bar=False,
        parameters={"store_dir": str(tmp_path / "store"), "figures_dir": str(tmp_path / "fig"),
                    "model": "tiny-llama", "eval_data": "embedded-news", "calib_data": "embedded-news",
                    "alt_calib_data": "embedded-wiki", "seqlen": 64, "n_calib": 2, "max_eval_windows": 1,
                    "methods": ["magnitude", "wanda", "sparsegpt", "owl:wanda", "dsnot:wanda", "besa"],
                    "alt_calib_methods": ["wanda"],
                    "sparsities": [0.2, 0.4, 0.6, 0.8], "patterns": ["2:4"],
                    "method_opts": {"sparsegpt": {"blocksize": 32}, "besa": {"epochs": 2}},
                    "method_sparsities": {"besa": [0.6]},  # a method at fewer sparsities leaves gaps
                    "sequential_checks": [0.4, 0.6]},
    )
    text = json.dumps(json.loads(out.read_text()))
    assert "achieved sparsity" in text and "PTP" in text
    assert "At sparsity 0.6 (best first)" in text and "besa at sparsity 0.6: PPL" in text  # BESA beside Wanda
    assert "PPL(dense statistics) / PPL(sequential)" in text  # the drift of the dense shortcut
    assert "pruning mode: sequential" in text  # the published protocol is the default
    assert "dense-statistics shortcut changes PPL by" in text  # the computed conclusion
    assert "same-top-1 %" in text and "Paired metric." in text  # KL beside PPL, and its sentence
    assert (tmp_path / "fig" / "02_unstructured_ptp_curves.png").exists()
    assert (tmp_path / "fig" / "02_unstructured_50pct_bars.png").exists()
    assert (tmp_path / "fig" / "02_unstructured_mode_drift.png").exists()
    assert (tmp_path / "fig" / "02_unstructured_kl.png").exists()
