"""Run every benchmarks/bench_*.py module's `main(profile, store)` and print their ratios."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from pathlib import Path

from mpt_utils.errors import cli_main
from mpt_utils.store import ResultsStore

HERE = Path(__file__).resolve().parent


@cli_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="embedded")
    parser.add_argument("--only", nargs="*", help="benchmark module names, e.g. bench_pruning")
    args = parser.parse_args()
    store = ResultsStore(HERE.parent / "results" / f"bench-{args.profile}")
    names = sorted(m.name for m in pkgutil.iter_modules([str(HERE)]) if m.name.startswith("bench_"))
    for name in names:
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        importlib.import_module(f"benchmarks.{name}").main(args.profile, store)
    print(f"bench rows: {store.export_csv()}")


if __name__ == "__main__":
    main()
