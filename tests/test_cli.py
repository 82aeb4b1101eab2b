"""The `mpt` command line: help, a sweep on a tiny model, eq. 5 fits of CSV and stored curves, a plan,
and bad input as one line with exit code 2."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mpt_utils.cli import main
from mpt_utils.combined.sweep import sweep_recipes, template_axis
from mpt_utils.errors import MPTError
from mpt_utils.store import ResultsStore

MODEL = "tiny-llama"
TINY = ["--seqlen", "32", "--n-calib", "4", "--max-windows", "2", "--device", "cpu"]


def eq5(s, s0=0.5, a=40.0, alpha=2.0, b=266.0, beta=8.0, gamma=30.0):
    """The continuous eq. 5: a power law up to s0, then a collapse."""
    s = np.asarray(s, float)
    at = a * s0**alpha + b
    return np.where(s <= s0, a * s**alpha + b, at * np.exp(beta * (s - s0) + gamma * (s - s0) ** 2))


@pytest.fixture(scope="module")
def swept(tmp_path_factory, corpus):
    """`mpt sweep` of Wanda at two ratios plus the dense point on the tiny model: (code, store, csv, out)."""
    root = tmp_path_factory.mktemp("sweep")
    args = ["sweep", "--model", MODEL, "--recipe-template", "wanda@{r}", "--ratios", "0.3", "0.5", "0.3",
            "--dense", "--eval-data", corpus, "--results", str(root / "store"), "--csv", str(root / "sweep.csv"), *TINY]
    return args, root


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("argv", [["--help"], ["reproduce", "--help"], ["sweep", "--help"], ["fit", "--help"],
                                  ["plan", "--help"]])
def test_help_exits_zero(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mpt {argv[0] if argv[0] != '--help' else ''}".rstrip())
    if argv == ["--help"]:
        assert all(cmd in out for cmd in ("reproduce", "sweep", "fit", "plan"))


def test_sweep_writes_one_row_per_point_and_reads_them_back(swept, capsys):
    args, root = swept
    assert main(args) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(root / "sweep.csv")
    assert list(table["recipe"]) == ["dense", "wanda@0.3", "wanda@0.5"]  # the repeated 0.3 is one point
    assert list(table["ratio"]) == [0.0, 0.3, 0.5] and table["model"].eq(MODEL).all()
    assert np.isfinite(table[["ppl", "stderr", "kl_mean", "nominal_bytes"]].to_numpy()).all()
    assert table["config_hash"].is_unique and "wanda@0.5" in printed
    assert table["nominal_bytes"].is_monotonic_decreasing and table.loc[0, "kl_mean"] == 0

    # the CSV's numbers are the stored points', and a rerun measures nothing
    stored = ResultsStore(root / "store").frame()
    ppl = stored[stored.metric == "ppl"].set_index("recipe")["value"]
    assert np.allclose(table.set_index("recipe")["ppl"], ppl.reindex(table["recipe"]))
    before = sorted(p.name for p in (root / "store" / "points").iterdir())
    assert main(args) == 0
    assert sorted(p.name for p in (root / "store" / "points").iterdir()) == before
    pd.testing.assert_frame_equal(pd.read_csv(root / "sweep.csv"), table)


def test_fit_on_a_stored_sweep_reads_it_as_the_planner_does(swept, corpus, capsys):
    args, root = swept
    assert main(args) == 0
    capsys.readouterr()
    code = main(["fit", "--results", str(root / "store"), "--model", MODEL, "--eval-data", corpus,
                 "--out", str(root / "fits.csv")])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("prune: wanda (grid points): no PTP") and "too few points" in out
    assert pd.read_csv(root / "fits.csv")["n"].tolist() == [3]


@pytest.mark.parametrize("axis", ["ratio", "bits"])
def test_fit_recovers_the_ptp_of_a_synthetic_eq5_curve(tmp_path, axis, capsys):
    s = np.linspace(0, 0.8, 17)
    y = eq5(s)
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"ratio": s, "ppl": y * np.exp(rng.normal(0, 0.002, s.size)), "stderr": 0.01 * y})
    if axis == "bits":
        frame = frame.assign(bits=16 * (1 - frame.pop("ratio")))[["bits", "ppl", "stderr"]]
    frame.to_csv(tmp_path / "curve.csv", index=False)
    assert main(["fit", "--csv", str(tmp_path / "curve.csv"), "--out", str(tmp_path / "fits.csv")]) == 0
    assert "PTP" in capsys.readouterr().out
    fit = pd.read_csv(tmp_path / "fits.csv").iloc[0]
    assert fit["has_ptp"] and fit["axis"] == ("bits" if axis == "bits" else "sparsity") and fit["n"] == 17
    assert fit["s0"] == pytest.approx(0.5, abs=0.03)
    assert fit["ptp"] == pytest.approx(8.0 if axis == "bits" else 0.5, rel=0.06)


def test_fit_groups_a_csv_by_a_column(tmp_path, capsys):
    s = np.linspace(0, 0.8, 17)
    rows = [pd.DataFrame({"method": m, "ratio": s, "ppl": eq5(s, s0=s0)}) for m, s0 in (("a", 0.4), ("b", 0.6))]
    pd.concat(rows).to_csv(tmp_path / "two.csv", index=False)
    assert main(["fit", "--csv", str(tmp_path / "two.csv"), "--by", "method", "--out", str(tmp_path / "f.csv")]) == 0
    fits = pd.read_csv(tmp_path / "f.csv").set_index("curve")
    assert fits.loc["a", "s0"] == pytest.approx(0.4, abs=0.03) and fits.loc["b", "s0"] == pytest.approx(0.6, abs=0.03)


def test_plan_prints_a_safe_plan_from_the_store(tmp_path, corpus, capsys):
    store = ResultsStore(tmp_path / "store")
    for s in np.linspace(0, 0.8, 17):  # a notebook-02-like Wanda curve with its PTP at 0.5
        store.put({"model": MODEL, "family": "unstructured", "method": "wanda", "ratio": float(s), "data": corpus,
                   "seqlen": 32, "n_windows": 2},
                  [{"metric": "ppl", "value": float(eq5(s)), "stderr": 0.01 * float(eq5(s)), "sparsity": float(s),
                    "pattern": "unstructured", "data": corpus, "seqlen": 32, "n_windows": 2}])
    code = main(["plan", "--model", MODEL, "--results", str(tmp_path / "store"), "--epsilon", "20",
                 "--eval-data", corpus, *TINY])
    out = capsys.readouterr().out
    assert code == 0, out
    recipe = next(line for line in out.splitlines() if line.startswith("recipe: ")).removeprefix("recipe: ")
    ratio = float(recipe.removeprefix("wanda@"))
    assert 0 < ratio < 0.5 and "prune: wanda" in out and "--build" in out
    assert not (tmp_path / "out").exists()  # nothing built


@pytest.mark.parametrize("argv, says", [
    (["sweep", "--model", MODEL, "--recipe-template", "wanda@{r}", "--ratios", "abc"], "invalid float value"),
    (["sweep", "--model", MODEL, "--recipe-template", "wanda@0.5", "--ratios", "0.3"], "exactly once"),
    (["sweep", "--model", MODEL, "--recipe-template", "wanda@{r}", "--ratios", "1.5"], "wanda@1.5"),
    (["sweep", "--model", MODEL, "--recipe-template", "wandda@{r}", "--ratios", "0.5"], "wandda"),
    (["sweep", "--model", MODEL, "--recipe-template", "wanda@{r}"], "--ratios"),
    (["sweep", "--model", MODEL, "--recipe-template", "wanda@{r}", "--ratios", "0.5", "--executor", "dask"],
     "invalid choice"),
    (["fit", "--csv", "no/such.csv"], "no CSV at"),
    (["fit"], "one source"),
    (["plan", "--model", MODEL, "--results", "no/such/store", "--epsilon", "1"], "no results store"),
    (["plan", "--model", MODEL, "--results", "no/such/store"], "nothing to plan for"),
    (["frobnicate"], "invalid choice"),
    ([], "choose a command"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, says, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written where the tests run
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert says in err and err.startswith("mpt")
    assert not any(tmp_path.iterdir())


def test_fit_names_a_missing_column(tmp_path, capsys):
    pd.DataFrame({"sparsity": [0.1, 0.2], "ppl": [5.0, 6.0]}).to_csv(tmp_path / "c.csv", index=False)
    assert main(["fit", "--csv", str(tmp_path / "c.csv")]) == 2
    assert "neither a ratio nor a bits column" in one_line_error(capsys)
    assert main(["fit", "--csv", str(tmp_path / "c.csv"), "--x", "sparsity", "--y", "loss"]) == 2
    assert "no column 'loss'" in one_line_error(capsys)


def test_templates():
    assert [str(r) for _, r in sweep_recipes("svd@0.1 > wanda@{r}", [0.25, 0.5])] == ["svd@0.1 > wanda@0.25",
                                                                                       "svd@0.1 > wanda@0.5"]
    assert [str(r) for _, r in sweep_recipes("rtn:{r}bit/g32", [4, 3])] == ["rtn:4bit/g32", "rtn:3bit/g32"]
    assert template_axis("svd@0.1 > rtn:{r}bit") == "bits" and template_axis("svd@{r} -> rtn:4bit") == "ratio"
    with pytest.raises(MPTError, match="nothing to sweep"):
        sweep_recipes("wanda@{r}", [])
