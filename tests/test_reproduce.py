"""The `make reproduce` driver and its profiles, on tiny generated notebooks (never the real ones)."""

import errno
import json
import os
import shutil
import time
from pathlib import Path

import nbformat
import pytest

from mpt_utils import reproduce
from mpt_utils.errors import MPTError
from mpt_utils.profiles_schema import check_profile, declared_parameters, param_spec, resolve_profile
from mpt_utils.progress import PROGRESS_ENV

REPO_NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def make_notebook(folder: Path, name: str, params: str, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, *(nbformat.v4.new_code_cell(c) for c in cells)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.fixture
def tiny(tmp_path):
    """Three tiny notebooks, a standalone profile for them, and the driver's arguments."""
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    params = 'store_dir = "s"\nfigures_dir = "f"\nprofile = "p"\nvalue = 1'
    for name in ("a_first", "b_second", "c_third"):
        make_notebook(nbs, name, params, "print('ran', value)")
    profile = tmp_path / "tiny.json"
    profile.write_text(json.dumps({"extends": None, "common": {"value": 2},
                                   "notebooks": {"a_first": {}, "b_second": {}, "c_third": {}}}))
    args = ["--profile", str(profile), "--notebooks", str(nbs),
            "--reports", str(tmp_path / "reports"), "--results", str(tmp_path / "results")]
    return {"root": tmp_path, "notebooks": nbs, "args": args, "out": tmp_path / "reports" / "tiny"}


def fake_execute(fail: dict | None = None):
    """A stand-in for papermill.execute_notebook: copies the source as the 'executed' notebook, or
    raises the exception given for that notebook (after or without writing it)."""
    fail = fail or {}

    def execute(src, out, **_):
        name = Path(src).stem
        if name in fail:
            exc, write_first = fail[name]
            if write_first:
                shutil.copy(src, out)
            raise exc
        shutil.copy(src, out)

    return execute


def one_line_error(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[0].startswith(("error:", "interrupted")), err
    return lines[0]


# ---------------------------------------------------------------- real kernels


def test_dead_kernel_is_a_failure_and_the_run_goes_on(tiny, capsys):
    make_notebook(tiny["notebooks"], "b_second", 'store_dir = "s"\nfigures_dir = "f"\nprofile = "p"\nvalue = 1',
                  "print('before death', flush=True)", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    out = tiny["out"]
    out.mkdir(parents=True)
    stale = reproduce.running_path(out, "c_third")
    stale.write_text("{ half a notebook from a killed run")

    code = reproduce.main(tiny["args"])

    assert code == 1
    err = one_line_error(capsys.readouterr().err)
    assert "b_second (kernel died (DeadKernelError)" in err
    kept = nbformat.read(out / "b_second.ipynb", as_version=4)
    texts = json.dumps(kept)
    assert "before death" in texts and "kernel died" in kept.cells[0].source
    assert (out / "b_second.html").exists()
    after = nbformat.read(out / "c_third.ipynb", as_version=4)
    assert "ran 2" in json.dumps(after.cells[-1].outputs)  # ran, with the profile's value
    assert (out / "c_third.html").exists() and not stale.exists()
    index = (out / "index.html").read_text()
    assert "kernel died (DeadKernelError)" in index and "c_third" in index
    assert (out / "results.csv").exists()
    assert not list(out.glob(".*.running.ipynb"))


def test_progress_reaches_the_terminal_not_the_report(tiny, monkeypatch, capsys):
    make_notebook(tiny["notebooks"], "a_first", 'store_dir = "s"\nfigures_dir = "f"\nprofile = "p"\nvalue = 1',
                  "import time\nimport tqdm.auto\nfrom mpt_utils.progress import progress_bar\n"
                  "for _ in progress_bar(range(8), desc='sweep', mininterval=0):\n    time.sleep(0.1)")
    monkeypatch.setattr(reproduce, "PROGRESS_EVERY", 0.05)
    assert reproduce.main([*tiny["args"], "--only", "a_first"]) == 0
    out = capsys.readouterr().out
    assert "[reproduce] a_first: sweep " in out and "/8 [" in out
    executed = nbformat.read(tiny["out"] / "a_first.ipynb", as_version=4)
    streams = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in streams if o.get("name") == "stderr"], streams  # no bar, no IProgress warning


# ---------------------------------------------------------------- driver logic (papermill stubbed)


def test_parameters_name_no_machine_path_inside_the_repository(tmp_path):
    profile = resolve_profile("embedded")
    repo = reproduce.REPO
    for nb in profile.selected():
        declared = declared_parameters(REPO_NOTEBOOKS / f"{nb}.ipynb")
        params = reproduce.notebook_parameters(profile, nb, declared, repo / "results" / "embedded",
                                               repo / "reports" / "embedded" / "figures")
        assert params["store_dir"] == "results/embedded", nb
        assert params["figures_dir"] == "reports/embedded/figures", nb
        assert set(params) <= set(declared)
        text = json.dumps(params)
        assert str(repo) not in text and '"/' not in text, nb
    outside = reproduce.notebook_parameters(profile, "01_dense_baseline", declared_parameters(
        REPO_NOTEBOOKS / "01_dense_baseline.ipynb"), tmp_path / "store", tmp_path / "figures")
    assert outside["store_dir"] == str((tmp_path / "store").resolve())  # outside: where it really is


def test_the_kernel_environment(tiny, monkeypatch, capsys):
    import papermill

    seen = {}

    def execute(src, out, parameters=None, **_):
        seen[Path(src).stem] = (dict(parameters), {k: os.environ.get(k) for k in
                                                   (PROGRESS_ENV, "MPT_RESULTS", "TQDM_DISABLE", "PYTHONWARNINGS")})
        from mpt_utils.progress import progress_bar

        bar = progress_bar(total=49, desc="sparsegpt 0.6")
        bar.update(12)
        bar.refresh()
        time.sleep(0.3)
        shutil.copy(src, out)

    monkeypatch.setenv("MPT_RESULTS", "/somewhere/else")
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    monkeypatch.setattr(reproduce, "PROGRESS_EVERY", 0.05)
    monkeypatch.setattr(papermill, "execute_notebook", execute)
    assert reproduce.main(tiny["args"]) == 0
    params, env = seen["b_second"]
    assert params["store_dir"] == str((tiny["root"] / "results" / "tiny").resolve())  # outside the repo
    assert env["MPT_RESULTS"] is None and env["TQDM_DISABLE"] == "1"  # store_dir is the location as given
    assert env["PYTHONWARNINGS"].endswith("ignore:IProgress not found")
    assert env[PROGRESS_ENV] and not Path(env[PROGRESS_ENV]).exists()  # removed after the notebook
    assert len({e[PROGRESS_ENV] for _, e in seen.values()}) == 3  # one file per notebook
    assert os.environ["MPT_RESULTS"] == "/somewhere/else" and PROGRESS_ENV not in os.environ  # restored
    out = capsys.readouterr().out
    assert "[reproduce] b_second: sparsegpt 0.6 12/49 [" in out
    summary = out[out.index("[reproduce] summary"):].splitlines()
    assert summary[1].split() == ["notebook", "status", "seconds"]
    assert [line.split()[:2] for line in summary[2:5]] == [["a_first", "ok"], ["b_second", "ok"], ["c_third", "ok"]]
    assert summary[5].split()[0] == "total"
    assert "b_second: ok in" in out  # the per-notebook lines stay


def test_summary_table():
    runs = [{"notebook": "00_phase_transition_fits", "status": "ok", "seconds": 14.93},
            {"notebook": "01_dense_baseline", "status": "failed", "seconds": 2},
            {"notebook": "02_unstructured_pruning", "status": "not run", "seconds": 0}]
    lines = reproduce.summary_table(runs).splitlines()
    assert lines == ["  notebook                  status    seconds",
                     "  00_phase_transition_fits  ok           14.9",
                     "  01_dense_baseline         failed        2.0",
                     "  02_unstructured_pruning   not run       0.0",
                     "  total                                  16.9"]


def test_echo_progress_prints_changes_only(monkeypatch, capsys):
    with reproduce.echo_progress("nb", every=0.02) as path:
        path.write_text("step 1/3\n")
        time.sleep(0.15)
        path.write_text("step 2/3\n")
        time.sleep(0.15)
    assert not path.exists()
    assert capsys.readouterr().out.splitlines() == ["[reproduce] nb: step 1/3", "[reproduce] nb: step 2/3"]


def test_no_temp_space_drops_the_bars_not_the_notebook(monkeypatch):
    def no_space(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(reproduce.tempfile, "mkstemp", no_space)
    with reproduce.echo_progress("nb", every=0.01) as path:
        assert path == Path(os.devnull)
    assert Path(os.devnull).exists()


def test_missing_partial_notebook_still_gives_a_report(tiny, monkeypatch):
    import papermill
    from nbclient.exceptions import DeadKernelError

    monkeypatch.setattr(papermill, "execute_notebook",
                        fake_execute({"a_first": (DeadKernelError("Kernel died"), False)}))
    stale = reproduce.running_path(tiny["out"], "a_first")  # a readable leftover of an earlier killed run
    tiny["out"].mkdir(parents=True)
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("STALE")]), stale)
    assert reproduce.main(tiny["args"]) == 1
    kept = nbformat.read(tiny["out"] / "a_first.ipynb", as_version=4)
    assert "No executed output was saved" in kept.cells[0].source and "STALE" not in json.dumps(kept)
    assert not stale.exists()
    assert (tiny["out"] / "a_first.html").exists() and (tiny["out"] / "c_third.html").exists()


def test_other_errors_are_that_notebooks_failure(tiny, monkeypatch, capsys):
    import papermill

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute({"a_first": (RuntimeError("engine broke"), True)}))
    real_html = reproduce.to_html

    def html_fails_for_b(notebook, out):
        if notebook.stem == "b_second":
            raise ValueError("nbconvert broke")
        real_html(notebook, out)

    monkeypatch.setattr(reproduce, "to_html", html_fails_for_b)
    assert reproduce.main(tiny["args"]) == 1
    err = one_line_error(capsys.readouterr().err)
    assert "a_first (RuntimeError: engine broke)" in err and "nbconvert broke" in err
    index = (tiny["out"] / "index.html").read_text()
    assert "engine broke" in index and "nbconvert broke" in index
    assert (tiny["out"] / "c_third.html").exists()


def test_ctrl_c_writes_the_index_and_exits_130(tiny, monkeypatch, capsys):
    import papermill

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute({"b_second": (KeyboardInterrupt(), True)}))
    with pytest.raises(SystemExit) as exit_:
        reproduce.main(tiny["args"])
    assert exit_.value.code == 130
    err = capsys.readouterr().err
    assert one_line_error(err).startswith("interrupted (Ctrl-C)") and len(err.strip().splitlines()) == 1
    index = (tiny["out"] / "index.html").read_text()
    assert "interrupted" in index and "not run" in index  # b stopped, c never started
    assert (tiny["out"] / "b_second.ipynb").exists() and not (tiny["out"] / "c_third.ipynb").exists()
    assert (tiny["out"] / "results.csv").exists()


def test_full_disk_mid_run_is_one_line(tiny, monkeypatch, capsys):
    import papermill

    full = OSError(errno.ENOSPC, "No space left on device", "x.ipynb")
    monkeypatch.setattr(papermill, "execute_notebook", fake_execute({"a_first": (full, False)}))
    monkeypatch.setattr(reproduce, "atomic_write_text", lambda path, text: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device", str(path))))
    with pytest.raises(SystemExit) as exit_:
        reproduce.main(tiny["args"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "ENOSPC" in one_line_error(err) and len(err.strip().splitlines()) == 1
    assert not (tiny["out"] / "b_second.ipynb").exists()  # the run stopped


def test_results_pointing_at_a_file(tiny, capsys):
    target = tiny["root"] / "a_file"
    target.write_text("not a folder")
    args = [*tiny["args"], "--results", str(target)]
    with pytest.raises(SystemExit) as exit_:
        reproduce.main(args)
    assert exit_.value.code == 2
    assert one_line_error(capsys.readouterr().err) == f"error: --results {target} is a file, not a folder"
    assert not (tiny["root"] / "reports" / "tiny" / "index.html").exists()  # nothing ran


def test_reports_below_a_file(tiny, capsys):
    target = tiny["root"] / "a_file"
    target.write_text("x")
    with pytest.raises(SystemExit) as exit_:
        reproduce.main([*tiny["args"], "--reports", str(target / "sub")])
    assert exit_.value.code == 2
    assert "ENOTDIR" in one_line_error(capsys.readouterr().err)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes through chmod")
def test_read_only_reports_folder(tiny, capsys):
    folder = tiny["root"] / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(SystemExit) as exit_:
            reproduce.main([*tiny["args"], "--reports", str(folder)])
    finally:
        folder.chmod(0o755)
    assert exit_.value.code == 2
    assert "--reports" in one_line_error(capsys.readouterr().err)


def test_read_only_filesystem_simulated(tiny, monkeypatch, capsys):
    def read_only(*_, dir=None, **__):
        raise OSError(errno.EROFS, "Read-only file system", str(dir))

    monkeypatch.setattr(reproduce.tempfile, "mkstemp", read_only)
    with pytest.raises(SystemExit) as exit_:
        reproduce.main(tiny["args"])
    assert exit_.value.code == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith("error: --reports") and "Read-only file system (EROFS)" in line


# ---------------------------------------------------------------- profiles


def write(tmp_path, text, name="mine.json"):
    path = tmp_path / name
    path.write_text(text if isinstance(text, str) else json.dumps(text))
    return str(path)


def check(spec):
    profile = resolve_profile(spec)
    return profile, check_profile(profile, REPO_NOTEBOOKS, label=spec)


def test_builtin_profiles_and_example_are_valid():
    for spec in ("embedded", "paper", str(REPO_NOTEBOOKS.parent / "mpt_utils/profiles/example_user.json")):
        check(spec)


def test_profile_without_common_inherits_the_embedded_defaults(tmp_path):
    profile, _ = check(write(tmp_path, {"notebooks": {"01_dense_baseline": {"max_eval_windows": 2}}}))
    embedded = resolve_profile("embedded")
    assert profile.common == embedded.common and profile.common["model"] == "smollm2-135m"
    assert profile.parameters("01_dense_baseline")["max_eval_windows"] == 2
    assert profile.parameters("02_unstructured_pruning") == embedded.parameters("02_unstructured_pruning")
    assert profile.selected() == embedded.selected()


def test_per_notebook_entries_merge_and_run_restricts(tmp_path):
    spec = write(tmp_path, {"common": {"seed": 3}, "run": ["02_unstructured_pruning"],
                            "notebooks": {"02_unstructured_pruning": {"sparsities": [0.5]}}})
    profile, _ = check(spec)
    params = profile.parameters("02_unstructured_pruning")
    assert params["sparsities"] == [0.5] and params["seed"] == 3
    assert params["alt_calib_data"] == "embedded-news"  # inherited from embedded's entry
    assert profile.selected() == ["02_unstructured_pruning"]


@pytest.mark.parametrize(("profile", "expected"), [
    ({"notebooks": {"02_unstructured_pruning": {"sparsitys": [0.5]}}},
     "notebooks.02_unstructured_pruning.sparsitys: 02_unstructured_pruning declares no such parameter; "
     "did you mean 'sparsities'?"),
    ({"common": {"max_eval_windws": 4}},
     "common.max_eval_windws: no notebook declares this parameter; did you mean 'max_eval_windows' "
     "(declared by 01_dense_baseline"),
    ({"common": {"seqlen": "512"}}, 'common.seqlen: "512" is a string, expected an integer or null'),
    ({"notebooks": {"06_downstream": {"gguf": "yes"}}}, '"yes" is a string, expected true or false'),
    ({"notebooks": {"02_unstructured_pruning": {"sparsities": [0.5, "0.6"]}}},
     'item [1] "0.6" is a string, expected a list of numbers'),
    ({"run": ["01_dense_baselin"]},
     "notebook '01_dense_baselin' is listed but"),
    ({"notebooks": {"08_missing": {}}}, "08_missing.ipynb does not exist"),
    ({"common": {"store_dir": "x"}}, "common.store_dir is set by the driver"),
    ({"comon": {}}, "unknown top-level key 'comon'; did you mean 'common'?"),
])
def test_bad_profile_gives_one_clear_message(tmp_path, profile, expected):
    with pytest.raises(MPTError) as err:
        check(write(tmp_path, profile))
    assert expected in str(err.value)
    assert str(err.value).startswith(f"invalid profile {tmp_path / 'mine.json'}")


def test_every_problem_is_listed_at_once(tmp_path):
    with pytest.raises(MPTError, match=r"\(2 problems\)"):
        check(write(tmp_path, {"common": {"max_eval_windws": 4, "seqlen": 1.5}}))


def test_invalid_json_names_line_and_column(tmp_path):
    with pytest.raises(MPTError, match=r"not valid JSON: .* at line 2, column 18"):
        check(write(tmp_path, '{"common":\n  {"seqlen": 512,}}'))


def test_duplicate_keys_and_unknown_builtin(tmp_path):
    with pytest.raises(MPTError, match="duplicate key"):
        check(write(tmp_path, '{"common": {"seed": 1, "seed": 2}}'))
    with pytest.raises(MPTError, match="did you mean 'paper'"):
        resolve_profile("papr")


def test_bad_profile_stops_before_anything_runs(tiny, monkeypatch, capsys):
    import papermill

    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: pytest.fail("ran a notebook"))
    bad = write(tiny["root"], {"extends": None, "common": {"valeu": 3}, "notebooks": {"a_first": {}}}, "bad.json")
    with pytest.raises(SystemExit) as exit_:
        reproduce.main([*tiny["args"], "--profile", bad])
    assert exit_.value.code == 2
    assert "did you mean 'value'" in one_line_error(capsys.readouterr().err)
    assert not (tiny["root"] / "reports").exists()


def test_declared_types():
    assert param_spec("n", "24").accepts == {"int", "null"}
    assert param_spec("x", "0.5").accepts == {"int", "float", "null"}
    assert param_spec("t", '"a"', "str | list").accepts == {"str", "list"}
    assert param_spec("t", "None", "Optional[int]").accepts == {"int", "null"}
    assert param_spec("l", "[1, 2]").items == {"int"}
    assert param_spec("m", '["a", 1]').items is None
    assert param_spec("any", "None").accepts is None and param_spec("f", "make()").accepts is None


def test_an_only_run_keeps_the_other_notebooks_in_the_index(tiny, monkeypatch, capsys):
    import papermill

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute())
    assert reproduce.main(tiny["args"]) == 0
    first = {r["notebook"]: r for r in json.loads((tiny["out"] / reproduce.RUNS_FILE).read_text())}
    assert set(first) == {"a_first", "b_second", "c_third"}

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute({"b_second": (RuntimeError("now broken"), True)}))
    assert reproduce.main([*tiny["args"], "--only", "b_second"]) == 1
    index = (tiny["out"] / "index.html").read_text()
    assert "now broken" in index  # b_second's new row
    assert "a_first" in index and "c_third" in index and "from an earlier run" in index  # the others are kept
    kept = {r["notebook"]: r for r in json.loads((tiny["out"] / reproduce.RUNS_FILE).read_text())}
    assert kept["b_second"]["status"] == "failed" and kept["a_first"] == first["a_first"]
