"""One results location whatever the working directory; $MPT_RESULTS moves the results root."""

from pathlib import Path

import pytest

from mpt_utils.paths import notebook_dirs, portable_path, repo_path, repo_root, results_path
from mpt_utils.store import ResultsStore

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("MPT_RESULTS", raising=False)


def test_repo_root_is_the_checkout():
    assert repo_root() == ROOT and (ROOT / "pyproject.toml").is_file()


def test_notebook_defaults_resolve_the_same_from_root_and_notebooks(no_env, monkeypatch):
    expected = (ROOT / "results" / "embedded", ROOT / "reports" / "embedded" / "figures")
    seen = []
    for cwd in (ROOT, ROOT / "notebooks"):
        monkeypatch.chdir(cwd)
        seen.append(notebook_dirs("results/embedded", "reports/embedded/figures"))
    assert seen == [expected, expected]


def test_one_store_from_root_and_from_notebooks(monkeypatch, tmp_path):
    monkeypatch.setenv("MPT_RESULTS", str(tmp_path / "shared"))
    config = {"model": "m", "method": "dense", "family": "dense", "ratio": 0.0, "bits": None, "seed": 0}
    monkeypatch.chdir(ROOT / "notebooks")
    ResultsStore(notebook_dirs("results/embedded", "x")[0]).put(config, [{"metric": "ppl", "value": 3.5}])
    monkeypatch.chdir(ROOT)
    frame = ResultsStore(notebook_dirs("results/embedded", "x")[0]).frame()
    assert frame.value.tolist() == [3.5]
    assert list((tmp_path / "shared" / "embedded" / "points").glob("*.json"))


def test_mpt_results_moves_only_the_results_root(monkeypatch, tmp_path):
    monkeypatch.setenv("MPT_RESULTS", str(tmp_path / "elsewhere"))
    assert results_path("results/embedded") == tmp_path / "elsewhere" / "embedded"
    assert results_path() == results_path("results") == tmp_path / "elsewhere"
    assert results_path("mine/embedded") == ROOT / "mine" / "embedded"  # not under results/
    assert results_path(tmp_path / "abs") == tmp_path / "abs"
    assert notebook_dirs("results/p", "reports/p/figures")[1] == ROOT / "reports" / "p" / "figures"


def test_relative_mpt_results_is_taken_from_the_repository(monkeypatch, tmp_path):
    monkeypatch.setenv("MPT_RESULTS", "runs")
    monkeypatch.chdir(tmp_path)
    assert results_path("results/embedded") == ROOT / "runs" / "embedded"


def test_results_path_without_the_variable(no_env, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert results_path() == ROOT / "results"
    assert repo_path("reports") == ROOT / "reports"


def test_portable_path(monkeypatch, tmp_path):
    assert portable_path(ROOT / "results" / "embedded") == "results/embedded"
    assert portable_path(tmp_path / "x") == str((tmp_path / "x").resolve())
    monkeypatch.chdir(ROOT / "notebooks")
    assert portable_path("../reports/embedded") == "reports/embedded"  # relative to the cwd first
    assert portable_path(tmp_path / "r" / "s", root=tmp_path / "r") == "s"
