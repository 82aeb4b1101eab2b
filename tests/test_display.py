"""Numbers in notebook tables print for reading (set once by set_paper_style)."""

import math

import numpy as np
import pandas as pd
import pytest

from mpt_utils.display import readable_cell, readable_float, set_table_display


@pytest.mark.parametrize(("value", "text"), [
    (12264.0, "12264"), (262.714, "262.7"), (21.3456, "21.35"), (0.012345, "0.01235"), (0.5, "0.5"),
    (15686.3, "15686"), (0.99996, "1"), (-3.0, "-3"), (0.0, "0"), (1e-6, "1.000e-06"), (2e20, "2.000e+20"),
    (math.inf, "inf"), (math.nan, "nan"), (np.float32(0.25), "0.25"),
])
def test_readable_float(value, text):
    assert readable_float(value) == text


OPTIONS = ("display.float_format", "styler.format.formatter", "display.max_columns", "display.width")


@pytest.fixture
def pandas_options():
    saved = {name: pd.get_option(name) for name in OPTIONS}
    yield
    for name, value in saved.items():
        pd.set_option(name, value)


def test_tables_print_counts_as_integers(pandas_options):
    set_table_display()
    frame = pd.DataFrame({"metric": ["ppl", "n_tokens"], "value": [21.3456, 12264.0]})
    text = frame.to_string()
    assert "12264" in text and "12264.0" not in text and "21.35" in text
    html = frame.style.to_html()
    assert ">12264<" in html and ">21.35<" in html and ">ppl<" in html
    assert readable_cell("text") == "text" and readable_cell(7) == "7"
