"""Tables and curves of notebook 03 from stored rows: Table 4, the per-point table, the GGUF ladder
(Tables 5/6), the bit-axis curves for eq. 5 and the published Qwen2.5 / LLaMA-2 / Gemma-3 ladders to
overlay. The torch points' rows are those of `quant.sweep.quant_rows` (recipe points as method / bits)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mpt_utils.catalogue import display_names, method_info
from mpt_utils.ptp import NEAR_LOSSLESS_REL

# Table 4's GGUF row: the scheme behind each nominal bit width (Table 5's ladder)
TABLE4_GGUF = {2: "Q2_K", 3: "Q3_K_M", 4: "Q4_K_M", 8: "Q8_0"}
TABLE4_ROWS = ("rtn", "gptq", "awq", "nf4", "fp4", "llm_int8", "smoothquant", "gguf")  # the paper's rows


def _metric(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    return rows[rows["metric"] == metric]


def table4(torch_rows: pd.DataFrame, gguf_rows: pd.DataFrame | None = None,
           bits: tuple[int, ...] = (2, 3, 4, 8)) -> pd.DataFrame:
    """PPL per method (rows) x bit width (columns), GGUF through its Table 5 schemes; methods the paper
    does not list come after its rows, in the order of `torch_rows`."""
    ppl = _metric(torch_rows, "ppl")
    ppl = ppl[ppl["method"] != "dense"]
    table = ppl.pivot_table(index="method", columns="bits", values="value", aggfunc="first")
    if gguf_rows is not None and len(gguf_rows):
        g = _metric(gguf_rows, "ppl").set_index("scheme")["value"]
        table.loc["gguf"] = {b: g.get(s, np.nan) for b, s in TABLE4_GGUF.items()}
    table = table.reindex(columns=[b for b in bits if b in table.columns or b in TABLE4_GGUF])
    methods = list(dict.fromkeys(ppl["method"]))
    order = [m for m in TABLE4_ROWS if m in table.index] + [m for m in methods if m not in TABLE4_ROWS]
    table = table.loc[order].rename(index=display_names(names=order))
    table.columns = [f"{int(b)} bits" for b in table.columns]
    return table


POINT_METRICS = ("bits_per_weight", "size_gb", "compression", "quant_seconds")


def per_point_table(torch_rows: pd.DataFrame) -> pd.DataFrame:
    """One line per (method, bits) point: PPL ± SE | KL ± SE | same-top-1 % (`curves.metric_table`),
    then bits per weight, size in GB, compression against FP16 and the quantizer's wall time."""
    from mpt_utils.curves import metric_table

    found = torch_rows[torch_rows["metric"].isin(POINT_METRICS)]
    sizes = found.pivot_table(index=["method", "bits"], columns="metric", values="value", aggfunc="first")
    return metric_table(torch_rows, ["method", "bits"]).join(sizes[[m for m in POINT_METRICS if m in sizes]])


def ladder_table(gguf_rows: pd.DataFrame) -> pd.DataFrame:
    """One line per GGUF scheme: PPL (llama.cpp), tokens/s, size, real bits/weight, tensor types."""
    rows = gguf_rows[gguf_rows["method"] == "gguf"]
    wide = rows.pivot_table(index="scheme", columns="metric", values="value", aggfunc="first")
    info = rows.drop_duplicates("scheme").set_index("scheme")[["bits", "types", "imatrix"]]
    out = info.join(wide).rename(columns={"bits": "nominal_bits"})
    cols = ["nominal_bits", "ppl", "tokens_per_s", "size_gb", "bits_per_weight", "matrix_bits_per_weight",
            "n_fallback", "imatrix", "types", "quant_seconds"]
    order = list(dict.fromkeys(rows["scheme"]))
    return out.loc[order, [c for c in cols if c in out.columns]]


def torch_curves(torch_rows: pd.DataFrame, x: str = "bits") -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label, x, PPL) per weight-only method with the dense 16-bit point appended; x = nominal
    'bits' or measured 'bits_per_weight' (scales and zeros included)."""
    ppl = _metric(torch_rows, "ppl")
    dense = ppl[ppl["method"] == "dense"]["value"]
    curves = []
    for method in ("rtn", "gptq", "awq"):
        part = ppl[ppl["method"] == method]
        if part.empty:
            continue
        if x == "bits":
            xs = part["bits"].to_numpy(dtype=float)
        else:
            bpw = _metric(torch_rows, "bits_per_weight")
            bpw = bpw[bpw["method"] == method].set_index("bits")["value"]
            xs = part["bits"].map(bpw).to_numpy(dtype=float)
        ys = part["value"].to_numpy(dtype=float)
        if len(dense):
            xs, ys = np.append(xs, 16.0), np.append(ys, float(dense.iloc[0]))
        order = np.argsort(-xs)
        curves.append((method_info(method).display, xs[order], ys[order]))
    return curves


def gguf_curve(gguf_rows: pd.DataFrame, x: str = "bits", schemes: tuple[str, ...] | None = None,
               label: str = "GGUF") -> tuple[str, np.ndarray, np.ndarray]:
    """(label, x, PPL) of the GGUF ladder; x = nominal 'bits' or measured 'bits_per_weight'.
    F32 is left out (it is the export, not a compression level)."""
    rows = gguf_rows[(gguf_rows["method"] == "gguf") & (gguf_rows["scheme"] != "F32")]
    if schemes is not None:
        rows = rows[rows["scheme"].isin(schemes)]
    ppl = _metric(rows, "ppl").set_index("scheme")["value"]
    if x == "bits":
        xs = _metric(rows, "ppl").set_index("scheme")["bits"]
    else:
        xs = _metric(rows, x).set_index("scheme")["value"]
    xs = xs.reindex(ppl.index).to_numpy(dtype=float)
    order = np.argsort(-xs, kind="stable")
    return label, xs[order], ppl.to_numpy(dtype=float)[order]


def published_ladders() -> pd.DataFrame:
    """Published GGUF ladders (Tables 5 and 6): model, scheme, nominal bits, PPL, size in GB."""
    from mpt_utils.published import load_published

    frames = []
    for table, size_metric in (("table5", "param_gb"), ("table6", "param_gb")):
        df = load_published(table)
        ppl = df[df["metric"] == "wikitext2_ppl"][["model", "scheme", "bits", "value"]].rename(columns={"value": "ppl"})
        size = df[df["metric"] == size_metric][["model", "scheme", "value"]].rename(columns={"value": "size_gb"})
        merged = ppl.merge(size, on=["model", "scheme"], how="left")
        merged["table"] = table
        frames.append(merged)
    return pd.concat(frames, ignore_index=True)


def size_at_bits(xs_bits: np.ndarray, sizes: np.ndarray, bits: float) -> float:
    """Size of a curve at a (fitted, fractional) bit width, by linear interpolation."""
    order = np.argsort(xs_bits)
    return float(np.interp(bits, np.asarray(xs_bits)[order], np.asarray(sizes)[order]))


def size_curve(rows: pd.DataFrame, method: str) -> pd.DataFrame:
    """bits, PPL and size in GB of one method's points (GGUF: one per scheme), smallest first."""
    part = rows[rows["method"] == method]
    key = "scheme" if method == "gguf" else "bits"
    ppl = part[part["metric"] == "ppl"]
    size = part[part["metric"] == "size_gb"].set_index(key)["value"]
    out = pd.DataFrame({"point": ppl[key].to_numpy(), "bits": ppl["bits"].to_numpy(dtype=float),
                        "ppl": ppl["value"].to_numpy(dtype=float),
                        "size_gb": ppl[key].map(size).to_numpy(dtype=float)})
    return out.sort_values("size_gb").reset_index(drop=True)


def ladder_sentence(ladder: pd.DataFrame, dense_ppl: float, tolerance: float = NEAR_LOSSLESS_REL) -> str:
    """One sentence on a `ladder_table`: the PPL from its largest to its smallest file (real bits per
    weight) and the smallest scheme still within dense × (1 + `tolerance`), the Perspective's
    near-lossless regime (ΔPPL ≈ 1.5 on LLaMA-2-7B, carried as a ratio)."""
    ok = ladder.dropna(subset=["ppl", "bits_per_weight"]) if len(ladder) else ladder
    if ok.empty:
        return "No GGUF scheme was evaluated: the ladder is empty."
    ok = ok.sort_values("bits_per_weight", ascending=False)
    big, small = ok.iloc[0], ok.iloc[-1]
    within = ok[ok["ppl"] <= dense_ppl * (1.0 + tolerance)]
    limit = (f"the smallest file within dense × {1 + tolerance:.2f} is {within.index[-1]} "
             f"({within['bits_per_weight'].iloc[-1]:.2f} bits/weight)" if len(within)
             else f"no scheme within dense × {1 + tolerance:.2f}")
    return (f"GGUF ladder through llama.cpp ({len(ok)} schemes): PPL {big['ppl']:.4g} at {big.name} "
            f"({big['bits_per_weight']:.2f} bits/weight) to {small['ppl']:.4g} at {small.name} "
            f"({small['bits_per_weight']:.2f} bits/weight); {limit}.")
