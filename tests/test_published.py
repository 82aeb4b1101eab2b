"""The published tables load with a plain read_csv, cite their source, and hold the printed numbers."""

import math
import re

import numpy as np
import pandas as pd
import pytest

from mpt_utils.errors import MPTError
from mpt_utils.published import (
    available_tables,
    change_from_dense,
    load_published,
    published_curves,
    published_dense,
    published_dir,
    published_families,
    published_sources,
    source_notes,
)

TABLES = {
    "table1_structured": ["model", "method", "ratio", "pattern", "metric", "value"],
    "table2_unstructured": ["model", "method", "calibration", "ratio", "pattern", "metric", "value"],
    "table3_unstructured_ptb_calib": ["model", "method", "calibration", "ratio", "pattern", "metric", "value"],
    "table4_quant_methods": ["model", "method", "bits", "ratio", "metric", "value"],
    "table5_qwen_gguf": ["model", "scheme", "bits", "ratio", "metric", "value", "stderr"],
    "table6_llama_gemma_gguf": ["model", "scheme", "bits", "ratio", "metric", "value", "stderr"],
    "table7_lowrank": ["model", "method", "ratio", "metric", "value"],
    "table8_asvd_rtn": ["model", "method", "quant", "bits", "ratio", "metric", "value"],
    "table9_sparsegpt_gptq": ["model", "method", "quant", "bits", "ratio", "budget_pct", "metric", "value"],
    "table10_wanda_gguf": ["model", "method", "scheme", "bits", "ratio", "size_pct", "metric", "value"],
    "perspective_table3": ["group", "model", "config", "metric", "value", "line"],
    "perspective_ptp_claims": ["family", "method", "axis", "lo", "hi", "point", "line"],
}


def value(table, **match):
    df = load_published(table)
    for col, want in match.items():
        df = df[np.isclose(df[col], want)] if isinstance(want, float) else df[df[col] == want]
    assert len(df) == 1, (table, match, len(df))
    return df.iloc[0]


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_table_loads_with_plain_read_csv_and_its_columns(table):
    path = published_dir() / f"{table}.csv"
    plain = pd.read_csv(path)  # no comment=, skiprows=, ...: the first line is the header
    assert len(plain) > 0 and set(TABLES[table]) <= set(plain.columns)
    assert not any(str(c).startswith(("#", "Unnamed")) for c in plain.columns)
    assert "#" not in path.read_text(encoding="utf-8")  # nothing a comment= reader would cut
    pd.testing.assert_frame_equal(load_published(table), plain)


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_table_has_one_provenance_entry(table):
    sources = published_sources()
    row = sources[sources["file"] == f"{table}.csv"]
    assert len(row) == 1
    row = row.iloc[0]
    for col in ("title", "authors", "venue", "repository", "location", "notes"):
        assert row[col].strip(), col
    assert row["repository"] == "github.com/whucs21Mzy/Model-Phase-Transitions"
    assert re.search(r"\bTable \d+|\bFig\. \d+|Typical PTPs", row["location"])
    assert row["doi"] or row["arxiv"]
    notes = source_notes(table)
    assert notes[0].startswith("Source:") and row["title"] in notes[0] and row["location"] in notes[0]


def test_provenance_names_no_file_outside_the_project():
    text = (published_dir() / "sources.csv").read_text(encoding="utf-8")
    assert not re.search(r"\b\w+\.(txt|md|pdf|json)\b", text.replace("README.md", ""))
    assert "seed" not in text.lower()


def test_the_folder_holds_exactly_the_listed_tables_and_their_sources():
    assert set(available_tables()) == set(TABLES)
    assert (published_dir() / "table2_unstructured.csv").exists()
    assert set(published_sources()["file"]) == {f"{t}.csv" for t in TABLES}


def test_a_table_without_provenance_is_named(tmp_path, monkeypatch):
    (tmp_path / "table1_structured.csv").write_text("model,ratio\nx,0.1\n", encoding="utf-8")
    monkeypatch.setenv("MPT_PUBLISHED", str(tmp_path))
    with pytest.raises(MPTError, match="sources.csv"):
        source_notes("table1")
    (tmp_path / "sources.csv").write_text("file,title\nother.csv,t\n", encoding="utf-8")
    with pytest.raises(MPTError, match="table1_structured.csv has 0 rows"):
        source_notes("table1")


@pytest.mark.parametrize("table, match, expected", [
    ("table1", dict(method="slicegpt", ratio=0.8), 34.9808),
    ("table1", dict(method="LLM_Pruner w/o", ratio=0.5), 316.6549),
    ("table2", dict(method="SparseGPT", ratio=0.5, pattern="unstructured"), 6.0882),
    ("table2", dict(method="ADMM", ratio=0.5, pattern="2:4"), 7.5892),
    ("table2", dict(method="Wanda", ratio=0.5, pattern="4:8"), 7.6748),
    ("table2", dict(method="BESA-layer", ratio=0.7), 9.0709),
    ("table3", dict(method="Wanda", ratio=0.8, pattern="unstructured"), 12142.1484),
    ("table4", dict(method="GPTQ", bits=2), 1784.1625),
    ("table5", dict(model="Qwen2.5-72B", scheme="IQ1_M", metric="wikitext2_ppl"), 7.25),
    ("table5", dict(model="Qwen2.5-14B", scheme="Q4_K_M", metric="mmlu"), 0.79),
    ("table6", dict(model="Gemma-3-1B-IT", scheme="Q2_K", metric="wikitext2_ppl"), 30.69),
    ("table6", dict(model="LLaMA-2-13B", scheme="Q8_K_0", metric="param_gb"), 13.80),
    ("table7", dict(method="ASVD", ratio=0.27, metric="wikitext2_ppl"), 259.05),
    ("table7", dict(method="SVD-LLM", ratio=0.6, metric="wikitext2_ppl"), 108.13),
    ("table8", dict(quant="RTN_INT6", ratio=0.17, metric="ptb_ppl"), 132.180),
    ("table9", dict(quant="3-bit", ratio=0.8), 109.4458),
    ("table10", dict(scheme="Q2_K", ratio=0.7), 86.6058),
])
def test_spot_values_match_the_printed_tables(table, match, expected):
    assert value(table, **match)["value"] == pytest.approx(expected, abs=1e-9)


def test_transcription_rules():
    t2 = load_published("table2")
    magnitude = t2[(t2.method == "Magnitude") & np.isclose(t2.ratio, 0.8)]
    assert len(magnitude) == 1 and math.isnan(magnitude.iloc[0]["value"])  # printed "nan" stays nan
    assert t2[t2.method == "Wanda_owl"].shape[0] == 9  # its 4:8 cell is "-": omitted
    assert set(t2.loc[t2.pattern != "unstructured", "ratio"]) == {0.5}
    assert value("table5", model="Qwen2.5-0.5B", scheme="Q2_K", metric="wikitext2_ppl")["stderr"] == 0.11
    assert value("table9", quant="4-bit", ratio=0.6)["budget_pct"] == 11.6
    assert value("table10", scheme="Q3_K_M", ratio=0.5)["size_pct"] == 11.4
    assert value("table4", method="GGUF", bits=3)["ratio"] == 1 - 3 / 16


def test_perspective_table3_quotes():
    ppl = load_published("perspective_table3")
    ptp = ppl[(ppl.model == "LLaMA2-7B-chat-PTP")]
    assert set(ptp[ptp.metric == "wikitext2_ppl"]["value"]) == {6.91, 6.92}
    assert ptp[ptp.metric == "size_gb"]["value"].item() == 1.89
    assert value("perspective_table3", model="LLaMA-3.2-1B-Instruct", metric="bertscore")["value"] == 73.21
    assert value("perspective_table3", model="LLaMA-3.1-8B", metric="arc_c")["value"] == 72.0


def test_unknown_table_lists_the_available_ones():
    with pytest.raises(MPTError, match="table2_unstructured"):
        load_published("table11")
    with pytest.raises(MPTError, match="unknown published table"):
        load_published("table")  # a prefix of every table is ambiguous


def test_published_curves():
    curves = {label: (x, y) for label, x, y in published_curves("table2", where={"pattern": "unstructured"})}
    x, y = curves["SparseGPT"]
    assert np.allclose(x, np.arange(1, 9) / 10) and y[4] == 6.0882
    assert np.isnan(curves["Magnitude"][1]).sum() == 1
    labels = [label for label, *_ in published_curves("table2", where={"pattern": "unstructured"}, min_points=3)]
    assert "BESA-row" not in labels and "Wanda" in labels
    bits = dict((label, x) for label, x, _ in published_curves("table5", x="bits", by="model"))
    assert list(bits["Qwen2.5-0.5B"]) == [2, 3, 4, 5, 6, 8, 16]
    with pytest.raises(MPTError, match="metrics here"):
        list(published_curves("table1", metric="ptb_ppl"))


def test_published_families_cover_the_papers_figures():
    fams = published_families()
    assert set(fams) == {"structured", "unstructured", "lowrank", "quantization"}
    assert len(fams["structured"]) == 6
    labels = {label for label, *_ in fams["lowrank"]}
    assert labels == {"ASVD", "SVD-LLM", "ASVD (PTB eval)"}
    assert {"SparseGPT (T9, FP16)", "Wanda (T10, FP16)"} <= {label for label, *_ in fams["unstructured"]}
    assert all(np.isfinite(y).sum() >= 3 for curves in fams.values() for _, _, y in curves)


def test_published_dense_models_and_changes_from_dense():
    dense = published_dense()
    row = dense.set_index("model").loc["Qwen2.5-0.5B"]
    assert (row.ppl, row.stderr, row.param_gb, row.table) == (13.64, 0.10, 1.27, "table5")
    assert "LLaMA-2-7B" not in set(dense.model)  # Table 6 prints no 16-bit LLaMA-2 row
    table = pd.DataFrame({"model": ["m"] * 4 + ["n"], "metric": ["acc", "acc", "acc", "ppl", "acc"],
                          "bits": [16, 4, 2, 4, 4], "value": [0.6, 0.55, 0.3, 9.0, 0.4]})
    change = change_from_dense(table, ["acc"])
    assert change[["model", "bits"]].values.tolist() == [["m", 4], ["m", 2]]  # n has no 16-bit row
    assert np.allclose(change["change"], [-0.05, -0.3]) and np.allclose(change["dense"], 0.6)
