"""How numbers read in notebook tables: pandas display options, set once by `set_paper_style`.

pandas pads every float of a column to the decimals its most precise value needs, so a count stored
as float next to a perplexity prints as 12264.000000, and a Styler shows 6 decimals for any column
not formatted explicitly. Here a float prints as an integer when it is one, else rounded to 4
significant digits without trailing zeros (no exponent between 1e-4 and 1e15). A Styler given explicit
formats for some columns shows the others with pandas' default precision.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

SIGNIFICANT = 4


def readable_float(x: float) -> str:
    """`x` for reading: 12264.0 -> '12264', 262.714 -> '262.7', 0.012345 -> '0.01235', 0.5 -> '0.5'."""
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    if abs(x) >= 1e15 or abs(x) < 1e-4:
        return f"{x:.{SIGNIFICANT - 1}e}"
    if x.is_integer():
        return f"{x:.0f}"
    rounded = float(f"{x:.{SIGNIFICANT - 1}e}")  # 0.99996 rounds up a decade: count digits from 1.000
    decimals = max(0, SIGNIFICANT - 1 - math.floor(math.log10(abs(rounded))))
    text = f"{x:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def readable_cell(value: Any) -> str:
    """A Styler cell: floats by `readable_float`, anything else as `str` (pandas' own default)."""
    if isinstance(value, (float, np.floating)):
        return readable_float(value)
    return str(value)


def set_table_display() -> None:
    """Readable numbers in DataFrame and Styler output, and room for the suite's wide tables."""
    pd.set_option("display.float_format", readable_float)
    pd.set_option("styler.format.formatter", readable_cell)
    pd.set_option("display.max_columns", 40)
    pd.set_option("display.width", 160)
