"""`make reproduce`: run every notebook of a profile through papermill into reports/<profile>/, with
HTML, results.csv and an index page. Results come from the store, so a rerun after an interruption
resumes.

Before any work: the profile is resolved and validated against the notebooks' `parameters` cells
(schema and rules: `mpt_utils/profiles_schema.py`), and the --results / --reports folders are
created and proven writable.

One notebook cannot stop the others: a failing cell, a dead kernel (native crash, OOM kill) or any
other error while executing or exporting it marks that notebook failed with the reason, keeps what
it executed (.ipynb + .html), and the run goes on. results.csv and index.html are always written,
also after Ctrl-C. Exit codes: 0 all notebooks ok, 1 some failed, 2 bad input or a filesystem fault
(one line on stderr), 130 Ctrl-C.

index.html lists per notebook its status, time, key numbers (its computed conclusion) and figures,
all linked relatively (`mpt_utils.report_index`). Reports are fit to share: folders inside the
repository reach the notebooks as repository-relative paths (no machine paths in the parameters
cell), and progress bars go to this terminal (the newest line per notebook every few seconds, see
`mpt_utils.progress`), not into the executed notebooks.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mpt_utils.errors import MPTError, cli_main, describe_os_error
from mpt_utils.paths import RESULTS_ENV, portable_path, repo_root, results_path
from mpt_utils.profiles_schema import ParamSpec, Profile, load_checked_profile, resolve_profile
from mpt_utils.progress import PROGRESS_ENV, read_progress
from mpt_utils.report_index import write_index
from mpt_utils.store import atomic_write_text

REPO = repo_root()
NOTEBOOKS = REPO / "notebooks"
PROGRESS_EVERY = 5.0  # seconds between two progress lines of a notebook on the terminal
# The kernel's environment: the store_dir passed is the location, so $MPT_RESULTS (already applied to
# --results) must not move it again; other libraries' bars are off (ours pass `disable` explicitly),
# and so is tqdm's "IProgress not found" warning, whichever cell first imports tqdm.auto.
KERNEL_ENV = {RESULTS_ENV: None, "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
QUIET_WIDGETS = "ignore:IProgress not found"


def kernel_env(progress_file: Path) -> dict[str, str | None]:
    """The variables a notebook's kernel gets (None: unset), besides what this process has."""
    warn = ",".join(w for w in (os.environ.get("PYTHONWARNINGS"), QUIET_WIDGETS) if w)
    return {**KERNEL_ENV, "PYTHONWARNINGS": warn, PROGRESS_ENV: str(progress_file)}
# Output storage is broken: every later notebook would fail the same way, so the run stops.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def load_profile(name: str) -> dict[str, Any]:
    """A profile as a plain dict (`common`, `notebooks`, `run`), inheritance applied."""
    return resolve_profile(name).as_dict()


def _storage_fault(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in STORAGE_ERRNOS


def prepare_folder(path: Path, option: str) -> Path:
    """Create `path` and prove it writable now, so a bad --results / --reports fails before any work."""
    if path.exists() and not path.is_dir():
        raise MPTError(f"{option} {path} is a file, not a folder", f"pass a folder to {option} (created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-probe.")
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise MPTError(f"{option} {path} cannot be written: {describe_os_error(err, with_fix=False)}",
                       f"pass a writable folder to {option}") from None
    return path


def running_path(out_dir: Path, notebook: str) -> Path:
    """Where papermill writes a notebook while it runs (progressively, cell by cell)."""
    return out_dir / f".{notebook}.running.ipynb"


def to_html(notebook: Path, out: Path) -> None:
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    atomic_write_text(out, body)


def _keep_notebook(src: Path, running: Path, out_nb: Path, note: str) -> None:
    """Move what papermill saved to `out_nb`, with `note` (why it stopped) as a first markdown cell.
    If nothing readable was saved (the kernel never started, the file was cut short), keep the
    unexecuted source with the note, so the report still links to something."""
    import nbformat

    try:
        nb = nbformat.read(running, as_version=4)
    except Exception:  # missing or truncated: any reader error means "nothing usable"
        nb = nbformat.read(src, as_version=4)
        note = (note + "\n\n" if note else "") + "No executed output was saved; this is the source notebook."
    if note:
        cell = nbformat.v4.new_markdown_cell(f"**reproduce:** {note}")
        cell.metadata["tags"] = ["mpt-reproduce-note"]
        nb.cells.insert(0, cell)
    atomic_write_text(out_nb, nbformat.writes(nb))
    running.unlink(missing_ok=True)


def _first_line(text: str, limit: int = 300) -> str:
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


@contextmanager
def environment(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (None: unset) environment variables for the block; the kernel started inside inherits them."""
    old = {k: os.environ.get(k) for k in values}

    def apply(items: Mapping[str, str | None]) -> None:
        for key, value in items.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    apply(values)
    try:
        yield
    finally:
        apply(old)


@contextmanager
def echo_progress(notebook: str, every: float | None = None) -> Iterator[Path]:
    """A fresh progress file for `notebook` (yielded); while the block runs, its newest line is printed
    as `[reproduce] <notebook>: <line>` when it changed, at most every `every` seconds."""
    every = PROGRESS_EVERY if every is None else every
    try:
        fd, name = tempfile.mkstemp(prefix=f"mpt-progress-{notebook}.", suffix=".txt")
        os.close(fd)
    except OSError:  # no temp space: the bars are dropped, the notebook still runs
        yield Path(os.devnull)
        return
    path, stop = Path(name), threading.Event()

    def watch() -> None:
        last = ""
        while not stop.wait(every):
            line = read_progress(path)
            if line and line != last:
                print(f"[reproduce] {notebook}: {line}", flush=True)
                last = line

    thread = threading.Thread(target=watch, name=f"progress-{notebook}", daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join()
        path.unlink(missing_ok=True)


def _figure_stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """(mtime, size) of each PNG in `folder`: what a notebook wrote shows as a changed stamp."""
    try:
        return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.glob("*.png")}
    except OSError:
        return {}


def run_notebook(src: Path, out_dir: Path, params: dict[str, Any], kernel: str = "python3",
                 cwd: Path = REPO) -> dict[str, Any]:
    """Execute one notebook; never raises for what happens inside it. Returns its index row:
    status "ok", "failed" or "interrupted" (Ctrl-C), with the reason in `error`, and the figures it
    wrote into out_dir/figures. A storage fault (disk full, read-only) is raised after the partial
    notebook is kept where possible."""
    import papermill
    from nbclient.exceptions import DeadKernelError

    out_nb, running = out_dir / src.name, running_path(out_dir, src.stem)
    running.unlink(missing_ok=True)  # stale, from a run that was killed
    figures_before = _figure_stamps(out_dir / "figures")
    start = time.perf_counter()
    status, error, note, raised = "ok", "", "", None
    try:
        with echo_progress(src.stem) as progress, environment(kernel_env(progress)):
            papermill.execute_notebook(str(src), str(running), parameters=params, kernel_name=kernel,
                                       cwd=str(cwd), progress_bar=False, log_output=False)
    except papermill.PapermillExecutionError as err:  # papermill marks the failing cell itself
        status, error = "failed", _first_line(f"{err.ename}: {err.evalue}")
    except DeadKernelError as err:
        status, error = "failed", f"kernel died (DeadKernelError): {_first_line(err) or 'no reason given'}"
        note = f"the kernel died while running this notebook ({_first_line(err)}); output up to that point is kept."
    except KeyboardInterrupt:
        status, error, note = "interrupted", "stopped by Ctrl-C", "stopped by Ctrl-C; output up to that point is kept."
    except Exception as err:  # anything else (engine, nbformat, I/O): this notebook's failure, not the run's
        status, error = "failed", _first_line(f"{type(err).__name__}: {err}")
        note = f"execution stopped: {error}"
        raised = err if _storage_fault(err) else None
    html_name = out_nb.with_suffix(".html").name
    try:
        _keep_notebook(src, running, out_nb, note)
        to_html(out_nb, out_dir / html_name)
    except Exception as err:
        if _storage_fault(err):
            raised = raised or err
        reason = _first_line(f"saving the report failed ({type(err).__name__}): {err}")
        status, error = ("failed", reason) if status == "ok" else (status, f"{error}; {reason}")
        if not (out_dir / html_name).exists():
            html_name = ""
    row = {"notebook": src.stem, "status": status, "error": error,
           "seconds": round(time.perf_counter() - start, 1), "ipynb": out_nb.name if out_nb.exists() else "",
           "html": html_name,
           "figures": [f"figures/{name}" for name, stamp in sorted(_figure_stamps(out_dir / "figures").items())
                       if figures_before.get(name) != stamp]}
    if raised is not None:
        raised.mpt_row = row  # type: ignore[attr-defined]  # the caller still lists it in the index
        raise raised
    return row


def _finish(out_dir: Path, store_dir: Path, name: str, runs: list[dict[str, Any]], note: str) -> Path:
    """results.csv then index.html, from whatever ran."""
    from mpt_utils.store import ResultsStore

    try:
        ResultsStore(store_dir).export_csv(out_dir / "results.csv")
    except Exception as err:
        if _storage_fault(err):
            raise
        note = f"{note} results.csv not written: {_first_line(f'{type(err).__name__}: {err}')}".strip()
        print(f"[reproduce] {note}", flush=True)
    return write_index(out_dir, name, runs, note)


def notebook_parameters(profile: Profile, notebook: str, declared: Mapping[str, ParamSpec], store_dir: Path,
                        figures_dir: Path, root: Path | None = None) -> dict[str, Any]:
    """What papermill injects into `notebook`: the profile's values, then the driver's folders, kept to
    the parameters the notebook declares. A folder inside the repository (`root`) is passed relative
    to it (notebooks resolve it with `mpt_utils.paths.notebook_dirs`), so the executed notebook
    names no machine path."""
    dirs = {"store_dir": portable_path(store_dir, root), "figures_dir": portable_path(figures_dir, root),
            "profile": profile.name}
    return {k: v for k, v in {**profile.parameters(notebook), **dirs}.items() if k in declared}


def summary_table(runs: list[dict[str, Any]], indent: str = "  ") -> str:
    """Status and seconds of every notebook, one aligned line each, then the total seconds."""
    width = max([len("notebook"), *(len(r["notebook"]) for r in runs)])
    status = max([len("status"), *(len(r["status"]) for r in runs)])
    lines = [f"{'notebook':<{width}}  {'status':<{status}}  {'seconds':>8}"]
    lines += [f"{r['notebook']:<{width}}  {r['status']:<{status}}  {float(r['seconds']):8.1f}" for r in runs]
    lines.append(f"{'total':<{width}}  {'':<{status}}  {sum(float(r['seconds']) for r in runs):8.1f}")
    return "\n".join(indent + line.rstrip() for line in lines)


RUNS_FILE = "runs.json"


def merged_runs(out_dir: Path, profile: Profile, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The index rows of every notebook of the profile: this run's rows, and for a notebook not run
    this time (`--only`) the row of its last run in `out_dir` (kept in runs.json, marked as earlier),
    so the index never forgets a rendered report. Writes runs.json."""
    path = out_dir / RUNS_FILE
    try:
        kept = {r["notebook"]: r for r in json.loads(path.read_text()) if r.get("status") != "not run"}
    except (OSError, ValueError, TypeError, KeyError):
        kept = {}
    ran = {r["notebook"]: r for r in runs if r["status"] != "not run"}
    kept.update(ran)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(sorted(kept.values(), key=lambda r: r["notebook"]), indent=1))
    except OSError as err:
        if _storage_fault(err):
            raise
    rows = {r["notebook"]: r for r in runs}  # this run's, "not run" included
    for nb, row in kept.items():
        if nb not in ran and (nb in profile.notebooks or nb in rows):
            rows[nb] = {**row, "error": row.get("error") or "from an earlier run (not rerun this time)"}
    return [rows[nb] for nb in sorted(rows)]


def run_profile(profile: Profile, declared: dict[str, dict[str, ParamSpec]], notebooks_dir: Path,
                out_dir: Path, store_dir: Path, kernel: str = "python3") -> tuple[list[dict[str, Any]], Path]:
    """Run the profile's selected notebooks into `out_dir`; returns the index rows and the index path.
    Ctrl-C writes the index of what ran, then re-raises KeyboardInterrupt with the index path."""
    selected = profile.selected()
    for nb in selected:
        running_path(out_dir, nb).unlink(missing_ok=True)
    runs: list[dict[str, Any]] = []
    note, stop = "", None
    started = time.perf_counter()
    try:
        for i, nb in enumerate(selected, 1):
            params = notebook_parameters(profile, nb, declared[nb], store_dir, out_dir / "figures")
            print(f"[reproduce] {nb} ({i}/{len(selected)}) ...", flush=True)
            try:
                run = run_notebook(notebooks_dir / f"{nb}.ipynb", out_dir, params, kernel=kernel)
            except OSError as err:  # storage fault: record it, write what can be written, stop
                if hasattr(err, "mpt_row"):
                    runs.append(err.mpt_row)
                stop = err
                break
            runs.append(run)
            tail = f": {run['error']}" if run["error"] else ""
            print(f"[reproduce] {nb}: {run['status']} in {run['seconds']} s{tail}", flush=True)
            if run["status"] == "interrupted":
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        stop = KeyboardInterrupt()
    done = {r["notebook"] for r in runs}
    runs += [{"notebook": nb, "status": "not run", "error": "", "seconds": 0, "ipynb": "", "html": ""}
             for nb in selected if nb not in done]
    listed = merged_runs(out_dir, profile, runs)  # an --only run updates its notebooks' rows, keeps the rest
    if isinstance(stop, KeyboardInterrupt):
        note = "Stopped by Ctrl-C; rerun to resume (finished points are in the store)."
    elif stop is not None:
        note = f"Stopped: {describe_os_error(stop)}."
    try:
        index = _finish(out_dir, store_dir, profile.name, listed, note)
    except OSError:
        if stop is not None:
            raise stop from None  # the first fault is the one to report
        raise
    print(f"[reproduce] summary\n{summary_table(runs)}", flush=True)
    print(f"[reproduce] {len(selected)} notebook(s) in {time.perf_counter() - started:.1f} s; reports: {index}",
          flush=True)
    if isinstance(stop, KeyboardInterrupt):
        raise KeyboardInterrupt(f"reports of what ran: {index}; rerun to resume")
    if stop is not None:
        raise stop
    return runs, index


@cli_main
def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="embedded", help="built-in profile name or path to a JSON profile")
    parser.add_argument("--only", nargs="*", help="notebook names (without .ipynb) to run")
    parser.add_argument("--reports", default=str(REPO / "reports"))
    parser.add_argument("--results", default=str(results_path()),
                        help="results store root (default: $MPT_RESULTS, else results/ of the repository)")
    parser.add_argument("--notebooks", default=str(NOTEBOOKS), help="folder of the notebooks to run")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name")
    args = parser.parse_args(argv)

    notebooks_dir = Path(args.notebooks)
    if not notebooks_dir.is_dir():
        raise MPTError(f"--notebooks {notebooks_dir} is not a folder", "pass the folder holding the notebooks")
    profile, declared = load_checked_profile(args.profile, notebooks_dir)
    if args.only:
        unknown = sorted(set(args.only) - set(profile.selected()))
        if unknown:
            raise MPTError(f"unknown notebook(s) {unknown} for --only", f"choose from {profile.selected()}")
        profile.run = [nb for nb in profile.selected() if nb in args.only]
    out_dir = prepare_folder(Path(args.reports), "--reports") / profile.name
    store_dir = prepare_folder(Path(args.results), "--results") / profile.name
    prepare_folder(out_dir / "figures", "--reports")
    prepare_folder(store_dir, "--results")

    runs, index = run_profile(profile, declared, notebooks_dir, out_dir, store_dir, kernel=args.kernel)
    failed = [f"{r['notebook']} ({r['error']})" if r["error"] else r["notebook"]
              for r in runs if r["status"] != "ok"]
    if failed:
        print(f"error: {len(failed)} notebook(s) failed: {'; '.join(failed)}; see {index}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
