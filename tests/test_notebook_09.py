"""Smoke run of the phase-avoidance planner notebook through papermill on a tiny random model, twice."""

import json

import papermill

PARAMETERS = {"model": "tiny-llama", "seqlen": 32, "n_calib": 4, "max_eval_windows": 2, "epsilon": 3.0,
              "budget_bytes": 150000, "single_recipes": ["wanda@0.3", "wanda@0.6", "gguf:Q8_0", "gguf:Q4_K_M"],
              "speed_rounds": 1, "big_model": ""}


def run(tmp_path, name):
    out = tmp_path / name
    papermill.execute_notebook("notebooks/09_phase_avoidance_planner.ipynb", str(out), kernel_name="python3",
                               progress_bar=False,
                               parameters={"store_dir": str(tmp_path / "store"), "figures_dir": str(tmp_path / "fig"),
                                           "build_dir": str(tmp_path / "builds"), **PARAMETERS})
    return json.dumps(json.loads(out.read_text()))


def test_planner_notebook_builds_the_plan_and_reruns_from_the_store(tmp_path):
    text = run(tmp_path, "09.ipynb")
    assert "Conclusion (computed from the builds above)" in text and "the planner chose" in text
    assert "single-step points" in text  # the store had no curve: the minimal set was measured
    assert "Safe zone" in text and "big_model is empty: section skipped" in text
    for name in ("09_plan_epsilon", "09_predicted_vs_measured"):
        assert (tmp_path / "fig" / f"{name}.png").exists()
    cards = sorted((tmp_path / "builds").glob("*.json"))
    assert len(cards) == 2  # ε and budget
    points = sorted(p.name for p in (tmp_path / "store" / "points").iterdir())
    run(tmp_path, "09-again.ipynb")
    assert sorted(p.name for p in (tmp_path / "store" / "points").iterdir()) == points  # nothing recomputed
    assert sorted((tmp_path / "builds").glob("*.json")) == cards
