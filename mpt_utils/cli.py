"""`mpt`: the suite's command line (installed as a console script by `pip install -e .`).

    mpt reproduce [--profile embedded] [--only 02_unstructured_pruning ...]   every notebook -> reports/
    mpt sweep --model M --recipe-template "wanda@{r}" --ratios 0.3 0.5     one method over ratios
    mpt fit --csv curve.csv  |  mpt fit --results DIR --model M            eq. 5 fit and its PTP
    mpt plan --model M --results DIR --epsilon 2 [--build --out DIR]       the phase-avoidance plan

Each subcommand is a thin layer over the library: `mpt_utils.reproduce.main`, `combined.sweep.sweep`
(grid points through the results store), `ptp.fit_ptp` on a CSV or on `combined.build.curves_from_rows`,
and `combined.build.plan_target` / the build's own command line. Bad input is one line on stderr and
exit code 2; a failed notebook in `mpt reproduce` is 1; Ctrl-C is 130.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from mpt_utils.errors import MPTError, describe_os_error

PROG = "mpt"
DEFAULT_RESULTS = "results/cli"
COMMANDS = ("reproduce", "sweep", "fit", "plan")
SWEEP_SHOWN = ("recipe", "ppl", "stderr", "kl_mean", "same_top", "compression_nominal", "nominal_bytes")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse prints the whole usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line(err: MPTError) -> str:
    text = f"{err.message}; fix: {err.fix}" if err.fix else err.message
    return " ".join(text.split())


# -- mpt sweep -------------------------------------------------------------------------------------------
def _protocol_arguments(p: argparse.ArgumentParser) -> None:
    """The evaluation protocol, with the build's defaults so `mpt plan` finds `mpt sweep`'s points."""
    p.add_argument("--eval-data", default="embedded-wiki",
                   help="evaluation corpus: embedded-wiki (default), embedded-news, wikitext2, ptb, c4 or a text file")
    p.add_argument("--calib-data", default=None, help="calibration corpus (default: --eval-data)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--n-calib", type=int, default=8, help="calibration windows (default 8)")
    p.add_argument("--max-windows", type=int, default=4, help="evaluation windows at most (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default 0)")
    p.add_argument("--device", default=None, help="torch device (default: CUDA when present, else CPU)")


def _setup(args: argparse.Namespace):
    from mpt_utils.combined.grid import GridSetup

    for name in ("seqlen", "n_calib", "max_windows"):
        if getattr(args, name) < 1:
            raise MPTError(f"--{name.replace('_', '-')} {getattr(args, name)} is not positive", "pass a count ≥ 1")
    return GridSetup(model=args.model, eval_data=args.eval_data, calib_data=args.calib_data or args.eval_data,
                     seqlen=args.seqlen, n_calib=args.n_calib, max_windows=args.max_windows, seed=args.seed,
                     device=args.device, stream=bool(getattr(args, "stream", False)))


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")[:80] or "sweep"


def run_sweep(args: argparse.Namespace) -> int:
    """`mpt sweep`: the points of one recipe template, stored, printed as a table and written as CSV."""
    import pandas as pd

    from mpt_utils.combined.grid import GridBench
    from mpt_utils.combined.sweep import sweep, sweep_recipes
    from mpt_utils.store import ResultsStore

    sweep_recipes(args.recipe_template, args.ratios)  # bad template or value: fail before loading anything
    setup = _setup(args)
    out = Path(args.csv) if args.csv else Path(args.results) / f"sweep_{_slug(Path(args.model).name)}__" \
                                                                 f"{_slug(args.recipe_template.replace('{r}', 'r'))}.csv"
    if out.is_dir():
        raise MPTError(f"--csv {out} is a folder", "pass a file name, e.g. --csv sweep.csv")
    store = ResultsStore(args.results)
    table = sweep(store, GridBench(setup, n_threads=args.threads), args.recipe_template, args.ratios,
                  dense=args.dense, progress=args.progress, executor=args.executor, max_retries=args.max_retries)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    shown = [table.columns[0], *SWEEP_SHOWN]
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table[shown].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"{len(table)} point(s) of {args.model} on {setup.eval_data}; table: {out}; points: {store.points}")
    return 0


# -- mpt fit ---------------------------------------------------------------------------------------------
def _numbers(frame, column: str, path: Path):
    import pandas as pd

    values = pd.to_numeric(frame[column], errors="coerce")
    bad = values.isna() & frame[column].notna()
    if bad.any():
        raise MPTError(f"column {column!r} of {path} holds non-numbers, e.g. {frame[column][bad].iloc[0]!r}",
                       "write numbers (empty or nan for a collapsed point)")
    return values.to_numpy(dtype=float)


def csv_curves(path: str | Path, x: str | None = None, y: str = "ppl", se: str | None = None,
               by: str | None = None) -> list[tuple[str, Any, Any, Any, str]]:
    """Curves to fit from a CSV (plain `pandas.read_csv`): (label, x, y, y_se or None, axis) per group
    of `by` (one curve without it). Defaults: x = `ratio`, else `bits` (then on the bit axis); y =
    `ppl`; se = `paired_stderr` where the CSV has one (what `mpt sweep` writes), else `stderr`, else
    none ("none" forces none)."""
    import numpy as np
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise MPTError(f"no CSV at {path}", "pass --csv FILE with ratio (or bits) and ppl columns")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise MPTError(f"{path} is not a readable CSV ({' '.join(str(err).split())})",
                       "pass a comma-separated file with a header row") from None
    cols = list(frame.columns)
    x = x or next((c for c in ("ratio", "bits") if c in cols), None)
    for name, column in (("--x", x), ("--y", y), ("--by", by)):
        if name != "--by" and column is None:
            raise MPTError(f"{path} has neither a ratio nor a bits column", f"pass --x COLUMN (columns: {', '.join(cols)})")
        if column is not None and column not in cols:
            raise MPTError(f"{path} has no column {column!r} ({name})", f"use one of: {', '.join(cols)}")
    if se is None:
        se = next((c for c in ("paired_stderr", "stderr") if c in cols and frame[c].notna().any()), "none")
    if se != "none" and se not in cols:
        raise MPTError(f"{path} has no column {se!r} (--se)", f"use one of: {', '.join(cols)}, or none")
    axis = "bits" if x == "bits" else "sparsity"
    groups = [(str(k), part) for k, part in frame.groupby(by, sort=False)] if by else [(path.stem, frame)]
    out = []
    for label, part in groups:
        ses = _numbers(part, se, path) if se != "none" else None
        out.append((label, _numbers(part, x, path), _numbers(part, y, path),
                    None if ses is None or not np.isfinite(ses).any() else ses, axis))
    return out


def store_curves(results: str | Path, model: str, eval_data: str, calib_data: str | None = None,
                 methods: dict[str, str] | None = None, dimensions: Sequence[str] | None = None
                 ) -> list[tuple[str, Any, Any, Any, str]]:
    """The model's single-method curves in a results store, as the planner reads them
    (`combined.build.curves_from_rows`: notebooks 02 / 03 / 05 points, or `mpt sweep` grid points)."""
    from mpt_utils.combined.build import DIMENSIONS, curves_from_rows, missing_curve_error
    from mpt_utils.store import ResultsStore

    if not (Path(results) / "points").is_dir():
        raise MPTError(f"no results store at {results} (no points/ folder)",
                       "pass --results DIR, a store written by mpt sweep or the notebooks")
    unknown = [d for d in (dimensions or ()) if d not in DIMENSIONS]
    if unknown:
        raise MPTError(f"unknown dimension(s) {unknown}", f"choose among {', '.join(DIMENSIONS)}")
    found, why = curves_from_rows(ResultsStore(results).frame(), model, eval_data, calib_data=calib_data,
                                  methods=methods)
    wanted = list(dimensions) if dimensions else [d for d in DIMENSIONS if d in found]
    missing = [d for d in (wanted or DIMENSIONS) if d not in found]
    if missing and (dimensions or not wanted):
        raise missing_curve_error(missing, why, model, eval_data, f"the results store {results}")
    return [(f"{d}: {found[d].method} ({found[d].source})", found[d].x, found[d].y, found[d].y_se, found[d].axis)
            for d in wanted]


def fit_rows(curves: Sequence[tuple[str, Any, Any, Any, str]]) -> list[dict[str, Any]]:
    """`fit_ptp` per curve, one summary row each (the PTP on the curve's own axis and its interval)."""
    from mpt_utils.ptp import fit_ptp

    rows = []
    for label, x, y, y_se, axis in curves:
        fit = fit_ptp(x, y, y_se=y_se, axis=axis)
        ptp = (fit.ptp_bits if axis == "bits" else fit.s0) if fit.has_ptp else math.nan
        rows.append({"curve": label, "axis": axis, "n": fit.n_points, "has_ptp": fit.has_ptp, "ptp": ptp,
                     "ptp_ci": fit.ptp_ci_text if fit.has_ptp else "", "s0": fit.s0, "delta_bic": fit.delta_bic,
                     "model": fit.model, "verdict": fit.verdict})
    return rows


def run_fit(args: argparse.Namespace) -> int:
    """`mpt fit`: eq. 5 on a CSV curve or on a model's curves in a results store; prints each PTP."""
    import pandas as pd

    from mpt_utils.combined.build import parse_methods

    if (args.csv is None) == (args.results is None):
        raise MPTError("mpt fit reads one source", "pass --csv FILE, or --results DIR with --model")
    if args.csv is not None:
        curves = csv_curves(args.csv, args.x, args.y, args.se, args.by)
    else:
        if not args.model:
            raise MPTError("--results needs --model", "pass --model, e.g. --model smollm2-135m")
        curves = store_curves(args.results, args.model, args.eval_data, args.calib_data,
                              parse_methods(args.method), args.dimensions)
    if args.axis:
        curves = [(label, x, y, se, args.axis) for label, x, y, se, _ in curves]
    rows = fit_rows(curves)
    for row in rows:
        unit = " bits" if row["axis"] == "bits" else ""
        head = (f"PTP {row['ptp']:.4g}{unit} (95% CI {row['ptp_ci']})" if row["has_ptp"] else "no PTP")
        print(f"{row['curve']}: {head}; n={row['n']}, ΔBIC={row['delta_bic']:.3g}, model {row['model']}")
        print(f"  {row['verdict']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(args.out, index=False)
        print(f"fits: {args.out}")
    return 0


# -- mpt plan --------------------------------------------------------------------------------------------
def run_plan(args: argparse.Namespace) -> int:
    """`mpt plan`: the plan for ε and/or a byte budget on the model's own curves; --build builds it."""
    from mpt_utils.combined import build
    from mpt_utils.combined.grid import GridBench
    from mpt_utils.combined.plan import BASELINE_BITS
    from mpt_utils.store import ResultsStore

    if args.build:
        return build.run(args)
    build.check_arguments(args)
    target = build.plan_target(ResultsStore(args.results), GridBench(_setup(args), n_threads=args.threads),
                               epsilon=args.epsilon, budget_bytes=args.budget_bytes,
                               methods=build.parse_methods(args.method), dimensions=args.dimensions)
    print(f"plan: {target.plan.describe()}")
    print(f"recipe: {target.recipe}")
    for dim in target.dims:
        c = target.curves[dim.name]
        bits = f" = {BASELINE_BITS * (1 - dim.ptp):.3g} bits" if dim.name == "quant" else ""
        print(f"  {dim.name}: {c.method} ({c.source}, {c.x.size} points), safe below ratio {dim.ptp:.4g}{bits} "
              f"({dim.bound}), planned {target.plan.ratios[dim.name]:.4g}")
    print("build it: the same command with --build --out DIR")
    return 0


# -- the parser ------------------------------------------------------------------------------------------
def _reproduce(argv: list[str]) -> int:
    from mpt_utils.reproduce import main as reproduce_main

    try:
        return reproduce_main(argv, prog=f"{PROG} reproduce")
    except SystemExit as stop:  # its own errors are printed already (one line, exit code 2)
        return stop.code if isinstance(stop.code, int) else 2


def build_parser() -> argparse.ArgumentParser:
    """The `mpt` parser with its four subcommands."""
    from mpt_utils.combined.build import add_arguments

    raw = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog=PROG, description=__doc__, formatter_class=raw)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.add_parser("reproduce", add_help=False, help="run every notebook of a profile (see mpt reproduce --help)",
                   description="Delegates to python -m mpt_utils.reproduce with the same arguments.")

    p = sub.add_parser("sweep", help="one method over ratios on a model: a table and a CSV, one row per point",
                       formatter_class=raw, description=(
                           "Measure a recipe template at each value through the grid machinery\n"
                           "(mpt_utils.combined.grid.grid_point): each point is stored in --results and read\n"
                           "back on a rerun. Prints a table and writes a CSV (one row per point: the value,\n"
                           "PPL, its SE, the paired SE, KL to dense, sizes) that `mpt fit --csv` reads.\n\n"
                           "example:\n  mpt sweep --model smollm2-135m --recipe-template \"wanda@{r}\" "
                           "--ratios 0.3 0.5 \\\n      --eval-data embedded-wiki --results results/cli"))
    p.add_argument("--model", required=True, help="model spec: smollm2-135m, a hub id, a local folder or a .gguf")
    p.add_argument("--recipe-template", required=True,
                   help="a recipe with {r} where the value goes: 'wanda@{r}', 'svd@0.1 > wanda@{r}', 'rtn:{r}bit'")
    p.add_argument("--ratios", required=True, nargs="+", type=float, metavar="R",
                   help="values put in the template (ratios in [0, 1), or bit widths for a quantizer)")
    _protocol_arguments(p)
    p.add_argument("--results", default=DEFAULT_RESULTS, help=f"results store (default {DEFAULT_RESULTS})")
    p.add_argument("--csv", default=None, help="table to write (default: <results>/sweep_<model>__<template>.csv)")
    p.add_argument("--dense", action="store_true", help="add the uncompressed model as the first point")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (GGUF steps)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: points one after another here (default); ray: one Ray task per missing point "
                        "on the cluster at $RAY_ADDRESS, else a local one")
    p.add_argument("--max-retries", type=int, default=3,
                   help="Ray: reruns of a point whose worker died (default 3)")
    p.add_argument("--stream", action="store_true",
                   help="keep the model on CPU and move one decoder block at a time to --device while compressing")

    p = sub.add_parser("fit", help="eq. 5 PTP fit of a curve from a CSV or a results store",
                       formatter_class=raw, description=(
                           "Fit the piecewise power-law / exponential law (eq. 5) and report the PTP with\n"
                           "its 95% interval and the BIC verdict (mpt_utils.ptp.fit_ptp). The curve comes\n"
                           "from a CSV (columns ratio or bits, ppl, optionally stderr; one curve per --by\n"
                           "group) or from a model's single-method curves in a results store.\n\n"
                           "examples:\n  mpt fit --csv results/cli/sweep.csv\n"
                           "  mpt fit --results results/embedded --model smollm2-135m --dimensions prune"))
    p.add_argument("--csv", default=None, help="CSV holding the curve")
    p.add_argument("--x", default=None, help="x column (default: ratio, else bits)")
    p.add_argument("--y", default="ppl", help="y column (default: ppl)")
    p.add_argument("--se", default=None, help="SE column of y (default: paired_stderr, else stderr; none: unweighted)")
    p.add_argument("--by", default=None, help="column whose groups are separate curves (e.g. method)")
    p.add_argument("--axis", choices=("sparsity", "bits"), default=None,
                   help="x axis (default: bits for a bits column, else sparsity)")
    p.add_argument("--results", default=None, help="results store holding the model's curves (instead of --csv)")
    p.add_argument("--model", default=None, help="model spec of the store's curves")
    p.add_argument("--eval-data", default="embedded-wiki", help="corpus the store's points were scored on")
    p.add_argument("--calib-data", default=None, help="prefer points calibrated on this corpus")
    p.add_argument("--method", action="append", default=[], help="DIMENSION=METHOD, e.g. prune=wanda (repeatable)")
    p.add_argument("--dimensions", nargs="*", help="fit only these of lowrank, prune, quant")
    p.add_argument("--out", default=None, help="write the fits as a CSV")

    p = sub.add_parser("plan", help="the phase-avoidance plan for ε or a byte budget (--build builds it)",
                       formatter_class=raw, description=(
                           "Plan eq. 6 on the model's own curves in --results (notebooks 02 / 03 / 05 points or\n"
                           "mpt sweep points): each curve fitted with eq. 5 and bounded below its PTP interval,\n"
                           "damages added, sizes multiplied; prints the plan and its recipe. The dense point of\n"
                           "the protocol anchors the predictions (measured once, then read from the store).\n"
                           "--build --out DIR builds it (python -m mpt_utils.combined.build): GGUF or model,\n"
                           "measured, with its model card.\n\n"
                           "example:\n  mpt plan --model smollm2-135m --results results/embedded --epsilon 2"))
    add_arguments(p, out_required=False)
    p.add_argument("--build", action="store_true", help="build the plan into --out (GGUF and model card)")
    return parser


RUNNERS = {"sweep": run_sweep, "fit": run_fit, "plan": run_plan}


def main(argv: Sequence[str] | None = None) -> int:
    """The `mpt` console script: returns the exit code (0 ok, 1 a notebook failed, 2 bad input, 130 Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "reproduce":
        return _reproduce(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0) or a bad argument (2, one line printed)
        return stop.code if isinstance(stop.code, int) else 2
    if args.command is None:
        print(f"{PROG}: error: choose a command: {', '.join(COMMANDS)} (see {PROG} --help)", file=sys.stderr)
        return 2
    try:
        return RUNNERS[args.command](args)
    except MPTError as err:
        print(f"{PROG} {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno is None:
            raise
        print(f"{PROG} {args.command}: error: {describe_os_error(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
