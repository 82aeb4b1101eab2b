"""`make reproduce`: run every notebook of a profile through papermill into reports/, with HTML and
an index page. Results come from the store, so a rerun after an interruption resumes."""

from __future__ import annotations

import argparse
import html
import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

from mpt_utils.errors import MPTError, cli_main
from mpt_utils.store import atomic_write_text

REPO = Path(__file__).resolve().parent.parent


def load_profile(name: str) -> dict[str, Any]:
    """A profile is a JSON parameter set: `common` parameters plus per-notebook overrides."""
    path = Path(name)
    if not path.suffix:
        candidates = [p.name.removesuffix(".json") for p in resources.files("mpt_utils.profiles").iterdir()
                      if p.name.endswith(".json")]
        if name not in candidates:
            raise MPTError(f"unknown profile {name!r}", f"use one of: {', '.join(sorted(candidates))}")
        return json.loads(resources.files("mpt_utils.profiles").joinpath(f"{name}.json").read_text())
    if not path.exists():
        raise MPTError(f"profile file {path} does not exist", "pass a profile name or an existing JSON file")
    return json.loads(path.read_text())


def notebook_parameters(profile: dict[str, Any], notebook: str, dirs: dict[str, str]) -> dict[str, Any]:
    params = {**profile.get("common", {}), **profile["notebooks"].get(notebook, {}), **dirs}
    return params


def _declared_parameters(path: Path) -> set[str]:
    import papermill

    return set(papermill.inspect_notebook(str(path)).keys())


def to_html(notebook: Path, out: Path) -> None:
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    atomic_write_text(out, body)


def run_notebook(src: Path, out_dir: Path, params: dict[str, Any], kernel: str = "python3") -> dict[str, Any]:
    import papermill

    declared = _declared_parameters(src)
    used = {k: v for k, v in params.items() if k in declared}
    out_nb = out_dir / src.name
    tmp_nb = out_dir / f".{src.stem}.running.ipynb"
    start = time.perf_counter()
    status = "ok"
    error = ""
    try:
        papermill.execute_notebook(str(src), str(tmp_nb), parameters=used, kernel_name=kernel,
                                   cwd=str(REPO), progress_bar=False, log_output=False)
    except papermill.PapermillExecutionError as err:
        status, error = "failed", f"{err.ename}: {err.evalue}"
    tmp_nb.replace(out_nb)  # the executed (or partially executed) notebook, kept either way
    to_html(out_nb, out_nb.with_suffix(".html"))
    return {"notebook": src.stem, "status": status, "error": error,
            "seconds": round(time.perf_counter() - start, 1), "ipynb": out_nb.name,
            "html": out_nb.with_suffix(".html").name}


def write_index(out_dir: Path, profile: str, runs: list[dict[str, Any]]) -> Path:
    rows = "\n".join(
        f"<tr><td><a href='{html.escape(r['html'])}'>{html.escape(r['notebook'])}</a></td>"
        f"<td><a href='{html.escape(r['ipynb'])}'>ipynb</a></td><td>{r['status']}</td>"
        f"<td>{r['seconds']}</td><td>{html.escape(r['error'])}</td></tr>" for r in runs)
    figures = sorted((out_dir / "figures").glob("*.png"))
    thumbs = "\n".join(f"<figure><img src='figures/{f.name}' width='420'><figcaption>{f.stem}</figcaption>"
                       f"</figure>" for f in figures)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>MPT reports ({profile})</title>"
            "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px}"
            "figure{display:inline-block;margin:8px}</style></head><body>"
            f"<h1>MPT suite reports: profile <code>{profile}</code></h1>"
            "<table><tr><th>notebook</th><th>executed</th><th>status</th><th>seconds</th><th>error</th></tr>"
            f"{rows}</table><p>Tidy results: <a href='results.csv'>results.csv</a></p>"
            f"<h2>Figures</h2>{thumbs}</body></html>")
    index = out_dir / "index.html"
    atomic_write_text(index, page)
    return index


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="embedded")
    parser.add_argument("--only", nargs="*", help="notebook names (without .ipynb) to run")
    parser.add_argument("--reports", default=str(REPO / "reports"))
    parser.add_argument("--results", default=str(REPO / "results"))
    args = parser.parse_args(argv)

    profile = load_profile(args.profile)
    name = Path(args.profile).stem
    out_dir = Path(args.reports) / name
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    dirs = {"store_dir": str(Path(args.results) / name), "figures_dir": str(out_dir / "figures"),
            "profile": name}
    notebooks = sorted(profile["notebooks"])
    if args.only:
        unknown = set(args.only) - set(notebooks)
        if unknown:
            raise MPTError(f"unknown notebook(s) {sorted(unknown)}", f"choose from {notebooks}")
        notebooks = [n for n in notebooks if n in args.only]
    runs = []
    for nb in notebooks:
        src = REPO / "notebooks" / f"{nb}.ipynb"
        if not src.exists():
            raise MPTError(f"profile lists {nb} but {src} is missing", "restore the notebook or edit the profile")
        print(f"[reproduce] {nb} ...", flush=True)
        run = run_notebook(src, out_dir, notebook_parameters(profile, nb, dirs))
        print(f"[reproduce] {nb}: {run['status']} in {run['seconds']} s {run['error']}", flush=True)
        runs.append(run)
    from mpt_utils.store import ResultsStore

    ResultsStore(dirs["store_dir"]).export_csv(out_dir / "results.csv")
    index = write_index(out_dir, name, runs)
    print(f"[reproduce] reports: {index}")
    failed = [r["notebook"] for r in runs if r["status"] != "ok"]
    if failed:
        raise MPTError(f"notebooks failed: {failed}", f"open the executed notebooks in {out_dir} for the error")
    return 0


if __name__ == "__main__":
    main()
