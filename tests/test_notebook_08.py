"""Smoke run of the combined-compression notebook through papermill on a tiny random model, twice."""

import json

import papermill

PARAMETERS = {"model": "tiny-llama", "seqlen": 32, "n_calib": 4, "max_eval_windows": 2,
              "wanda_sparsities": [0.0, 0.5], "gguf_schemes": ["F16", "Q8_0"],
              "sparsegpt_sparsities": [0.0, 0.5], "gptq_bits": [16, 4], "asvd_ratios": [0.0, 0.1], "rtn_bits": [16, 8],
              "path3d": ["asvd@0.05 > admm@0.3 > gguf:Q8_0"],
              "method_options": {"asvd": {"granularity": "part", "sens_windows": 1, "sens_seqlen": 32},
                                 "admm": {"iters": 4, "gradual_iters": 3}}}


def run(tmp_path, name):
    out = tmp_path / name
    papermill.execute_notebook("notebooks/08_combined_compression.ipynb", str(out), kernel_name="python3",
                               progress_bar=False,
                               parameters={"store_dir": str(tmp_path / "store"), "figures_dir": str(tmp_path / "fig"),
                                           **PARAMETERS})
    return json.dumps(json.loads(out.read_text()))


def test_combined_compression_notebook_runs_and_reruns_from_the_store(tmp_path):
    text = run(tmp_path, "08.ipynb")
    assert "Conclusion (computed from the points above)" in text and "compression limit of the" in text
    assert "becomes in real bytes" in text and "nominal % of dense" in text and "artifact % of dense" in text
    for name in ("08_surface_sparsegpt", "08_surface_asvd", "08_frontier"):
        assert (tmp_path / "fig" / f"{name}.png").exists()
    points = sorted(p.name for p in (tmp_path / "store" / "points").iterdir())
    assert len(points) >= 8
    run(tmp_path, "08-again.ipynb")
    assert sorted(p.name for p in (tmp_path / "store" / "points").iterdir()) == points  # nothing recomputed
