"""The published numbers of the Model Phase Transitions work (data/published/*.csv) as DataFrames
and as curves to fit.

Every CSV is plain (`pandas.read_csv(path)` reads it: a header row, then data); where its numbers come
from and how they were transcribed is one row of the sidecar `sources.csv` in the same folder (paper,
authors, venue, DOI, repository, table or figure, transcription notes). Values are copied as printed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mpt_utils.errors import MPTError

PUBLISHED_DIR = Path(__file__).resolve().parent.parent / "data" / "published"
SOURCES = "sources.csv"  # the provenance sidecar: one row per published CSV, not a table itself
Curve = tuple[str, np.ndarray, np.ndarray]


def published_dir() -> Path:
    """The folder of published CSVs; `MPT_PUBLISHED` overrides it (e.g. for an installed package)."""
    return Path(os.environ.get("MPT_PUBLISHED", PUBLISHED_DIR))


def available_tables() -> list[str]:
    return sorted(p.stem for p in published_dir().glob("*.csv") if p.name != SOURCES)


def _resolve(table: str) -> Path:
    """'table2', 'table2_unstructured' and 'table2_unstructured.csv' all name the same file."""
    name = Path(str(table)).name.removesuffix(".csv")
    stems = available_tables()
    matches = [s for s in stems if s == name] or [s for s in stems if s.startswith(f"{name}_")]
    if len(matches) != 1:
        raise MPTError(f"unknown published table {table!r}", f"choose one of: {', '.join(stems)}")
    return published_dir() / f"{matches[0]}.csv"


def load_published(table: str) -> pd.DataFrame:
    """One published table as a tidy DataFrame."""
    return pd.read_csv(_resolve(table))


def published_sources() -> pd.DataFrame:
    """The provenance sidecar: per CSV (`file`), the paper (`title`, `authors`, `venue`, `doi`, `arxiv`),
    the upstream `repository`, the `location` (table or figure) and transcription `notes`."""
    path = published_dir() / SOURCES
    if not path.exists():
        raise MPTError(f"the provenance file {path} is missing",
                       "restore data/published/sources.csv, or point MPT_PUBLISHED at a complete folder")
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def source_notes(table: str) -> list[str]:
    """Where a table's numbers come from (first line, 'Source: ...') and how they were transcribed."""
    path = _resolve(table)
    rows = published_sources()
    rows = rows[rows["file"] == path.name]
    if len(rows) != 1:
        raise MPTError(f"{path.name} has {len(rows)} rows in {SOURCES} (expected 1)",
                       f"add one row for {path.name} to {published_dir() / SOURCES}")
    row = rows.iloc[0].to_dict()
    ids = "".join(f"; {tag}{row[key]}" for key, tag in (("doi", "doi:"), ("arxiv", "arXiv:")) if row[key])
    cite = f'"{row["title"]}", {row["authors"]}, {row["venue"]}{ids}'
    return [f"Source: {cite}; repository {row['repository']}; {row['location']}.", row["notes"]]


def _select(df: pd.DataFrame, where: Mapping[str, Any] | None) -> pd.DataFrame:
    for col, want in (where or {}).items():
        if col not in df.columns:
            raise MPTError(f"column {col!r} is not in this table", f"use one of: {', '.join(df.columns)}")
        values = want if isinstance(want, (list, tuple, set)) else [want]
        df = df[df[col].isin(values)]
    return df


def published_curves(table: str, *, metric: str = "wikitext2_ppl", x: str = "ratio", by: str = "method",
                     where: Mapping[str, Any] | None = None, suffix: str = "",
                     rename: Mapping[str, str] | None = None, min_points: int = 1) -> Iterator[Curve]:
    """Yield (label, x, y) per group of `by` (in table order), for `metric` against column `x`.

    NaN values stay in (the fit keeps them as censored collapses); groups with fewer than `min_points`
    finite values are skipped. `where` filters rows, e.g. {"pattern": "unstructured"}; a label is
    `rename.get(group, group) + suffix`.
    """
    df = load_published(table)
    for col in (x, by, "metric", "value"):
        if col not in df.columns:
            raise MPTError(f"table {table!r} has no column {col!r}", f"use one of: {', '.join(df.columns)}")
    df = _select(df[df["metric"] == metric], where)
    if df.empty:
        metrics = sorted(load_published(table)["metric"].unique())
        raise MPTError(f"no rows for metric {metric!r} in {table!r}", f"metrics here: {', '.join(metrics)}")
    for key in pd.unique(df[by]):
        part = df[df[by] == key].sort_values(x, kind="stable")
        xs, ys = part[x].to_numpy(dtype=float), part["value"].to_numpy(dtype=float)
        if np.isfinite(ys).sum() >= min_points:
            yield f"{(rename or {}).get(key, key)}{suffix}", xs, ys


def published_families(min_points: int = 3) -> dict[str, list[Curve]]:
    """The single-method curves behind the Perspective's PTP figures, grouped by family.

    structured: Table 1; unstructured: Tables 2 and 3 (unstructured columns only, N:M excluded) plus
    the single-method FP16 columns of Tables 9 (SparseGPT) and 10 (Wanda); low-rank: Table 7 on
    WikiText-2 and PTB; quantization (bit axis, nominal bits of each GGUF scheme): Tables 4-6.
    """
    unstructured = {"pattern": "unstructured"}
    fams: dict[str, list[Curve]] = {
        "structured": list(published_curves("table1", min_points=min_points)),
        "unstructured": [
            *published_curves("table2", where=unstructured, min_points=min_points),
            *published_curves("table3", where=unstructured, suffix=" (PTB calib)", min_points=min_points),
            *published_curves("table9", where={"quant": "FP16"}, rename={"SparseGPT+GPTQ": "SparseGPT"},
                              suffix=" (T9, FP16)", min_points=min_points),
            *published_curves("table10", where={"scheme": "FP16"}, rename={"Wanda+GGUF": "Wanda"},
                              suffix=" (T10, FP16)", min_points=min_points),
        ],
        "lowrank": [
            *published_curves("table7", min_points=min_points),
            *published_curves("table7", metric="ptb_ppl", suffix=" (PTB eval)", min_points=min_points),
        ],
        "quantization": [
            *published_curves("table4", x="bits", suffix=" (T4)", min_points=min_points),
            *published_curves("table5", x="bits", by="model", min_points=min_points),
            *published_curves("table6", x="bits", by="model", min_points=min_points),
        ],
    }
    return fams


def published_dense(tables: tuple[str, ...] = ("table5", "table6")) -> pd.DataFrame:
    """The uncompressed (16-bit) models of the published GGUF tables, one row each: `model`, WikiText-2
    `ppl` with its `stderr` and the FP16 `param_gb`, with the `table` it comes from. Models printed
    without a 16-bit row (LLaMA-2 in Table 6) are not in it."""
    rows = []
    for table in tables:
        df = load_published(table)
        dense = df[df["bits"] == 16]
        for model, part in dense.groupby("model", sort=False):
            ppl = part[part["metric"] == "wikitext2_ppl"]
            size = part[part["metric"] == "param_gb"]
            if len(ppl):
                rows.append({"model": model, "ppl": float(ppl["value"].iloc[0]),
                             "stderr": float(ppl["stderr"].iloc[0]) if "stderr" in ppl else math.nan,
                             "param_gb": float(size["value"].iloc[0]) if len(size) else math.nan, "table": table})
    return pd.DataFrame(rows, columns=["model", "ppl", "stderr", "param_gb", "table"])


def change_from_dense(table: pd.DataFrame, metrics: Iterable[str], by: str = "bits", dense=16) -> pd.DataFrame:
    """Per model and metric, each value minus the model's uncompressed one (`by` == `dense`, e.g. the
    16-bit row of a GGUF table): columns model, metric, `by`, value, dense, change. Models without an
    uncompressed row are left out."""
    df = table[table["metric"].isin(list(metrics))]
    base = df[df[by] == dense].groupby(["model", "metric"])["value"].first().rename("dense")
    out = df[df[by] != dense].join(base, on=["model", "metric"], how="inner")
    out = out[["model", "metric", by, "value", "dense"]].assign(change=lambda d: d["value"] - d["dense"])
    return out.reset_index(drop=True)
