"""One method over a list of settings, as grid points: a recipe template and one row per point.

`sweep_recipes("wanda@{r}", [0.3, 0.5])` writes the recipes `wanda@0.3` and `wanda@0.5`; `sweep(store,
bench, template, values)` measures each through `grid.grid_point` (stored and resumable, under the same
key as any grid point of that recipe, so `mpt plan` and notebook 09 find them as single-method curves)
and returns one row per point: the value put in the template (column `ratio`, or `bits` when it is a
torch quantizer's width, e.g. `rtn:{r}bit`), PPL with its SE over windows, the paired SE (PPL × SE of
the NLL difference to dense on the same windows, what `curves.measured_curves` fits with), KL to dense
± SE, the share of unchanged top-1 tokens and the three sizes with the nominal compression.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from mpt_utils.combined.grid import GridBench
from mpt_utils.errors import MPTError
from mpt_utils.recipe import SEPARATORS, Recipe
from mpt_utils.store import ResultsStore

PLACEHOLDER = "{r}"
COLUMNS = ("model", "recipe", "ppl", "stderr", "paired_stderr", "kl_mean", "kl_se", "same_top",
           "compression_nominal", "nominal_bytes", "artifact_bytes", "sparse_bytes", "data", "config_hash")
_METHOD = re.compile(r"\s*([A-Za-z][\w\-]*)")


def value_text(value: float) -> str:
    """A setting as a recipe writes it: 0.3, 4 (no exponent, no trailing zeros)."""
    return np.format_float_positional(float(value), trim="-")


def template_axis(template: str) -> str:
    """'bits' when the placeholder is a torch quantizer's bit width (`rtn:{r}bit`), else 'ratio'."""
    from mpt_utils.recipe import method_families

    parts = re.split("|".join(map(re.escape, SEPARATORS)), template)
    for part in parts:
        found = _METHOD.match(part)
        if PLACEHOLDER in part and found and method_families().get(found.group(1)) == "quant":
            return "bits"
    return "ratio"


def sweep_recipes(template: str, values: Iterable[float]) -> list[tuple[float, Recipe]]:
    """(value, recipe) per distinct value, in order: the template with `{r}` replaced by the value.
    Each recipe is checked by `Recipe.parse` (a ratio outside [0, 1), an unknown method or option is
    one MPTError naming the recipe)."""
    if template.count(PLACEHOLDER) != 1:
        raise MPTError(f"the recipe template {template!r} must hold {PLACEHOLDER} exactly once",
                       "write where the swept value goes, e.g. 'wanda@{r}' or 'svd@0.1 > rtn:{r}bit'")
    out: list[tuple[float, Recipe]] = []
    for value in dict.fromkeys(float(v) for v in values):
        if not math.isfinite(value):
            raise MPTError(f"the swept value {value} is not finite", "pass numbers, e.g. --ratios 0.3 0.5")
        text = template.replace(PLACEHOLDER, value_text(value))
        try:
            out.append((value, Recipe.parse(text)))
        except MPTError as err:
            raise MPTError(f"recipe {text!r} (template {template!r}, value {value_text(value)}): {err.message}",
                           err.fix) from None
    if not out:
        raise MPTError("nothing to sweep", "pass at least one value, e.g. --ratios 0.3 0.5")
    return out


def point_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One point's tidy rows (`grid_point`) as one wide row (COLUMNS; NaN where a metric is absent)."""
    by = {r.get("metric"): r for r in rows}
    ppl = by.get("ppl")
    if ppl is None:
        raise MPTError("the point has no ppl row", "pass the rows of one grid point")

    def value(metric: str, key: str = "value") -> float:
        got = by.get(metric, {}).get(key)
        return float(got) if got is not None else math.nan

    return {"model": ppl.get("model"), "recipe": ppl.get("recipe"), "ppl": value("ppl"),
            "stderr": value("ppl", "stderr"), "paired_stderr": value("ppl") * value("nll_diff", "stderr"),
            "kl_mean": value("kl_mean"), "kl_se": value("kl_mean", "stderr"), "same_top": value("same_top"),
            "compression_nominal": value("compression_nominal"), "nominal_bytes": value("nominal_bytes"),
            "artifact_bytes": value("artifact_bytes"), "sparse_bytes": value("sparse_bytes"),
            "data": ppl.get("data"), "config_hash": ppl.get("config_hash")}


def sweep(store: ResultsStore, bench: GridBench, template: str, values: Iterable[float], *, dense: bool = False,
          progress: bool = False, executor: str = "local", max_retries: int = 3) -> pd.DataFrame:
    """One row per point of `template` over `values` (module docstring), in order; `dense` adds the
    uncompressed model first (ratio 0, or 16 bits). Every point is read back when already stored.
    `executor`: "local" (one point after another here) or "ray" (the missing points as Ray tasks,
    each retried up to `max_retries` times when its worker dies; `mpt_utils.distributed`)."""
    from mpt_utils.distributed import run_points

    axis = template_axis(template)
    points = sweep_recipes(template, values)
    if dense:
        points.insert(0, (16.0 if axis == "bits" else 0.0, Recipe.parse("dense")))
    stored = run_points(store, bench, [recipe for _, recipe in points], executor=executor, progress=progress,
                        max_retries=max_retries)
    table = [{axis: value, **point_summary(rows)} for (value, _), rows in zip(points, stored)]
    return pd.DataFrame(table, columns=[axis, *COLUMNS])


__all__ = ["COLUMNS", "point_summary", "sweep", "sweep_recipes", "template_axis", "value_text"]
