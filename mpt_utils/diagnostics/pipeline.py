"""Every diagnostic of one (dense, compressed) pair from two recorded runs, its label, and the store.

`diagnose` traces both models once, derives the tables (answers and ParaRel metrics, logit lens,
representation similarity, attention entropy, gate flips, patching both ways, high-precision
injection) and classifies the failure mode. `Diagnosis.rows()` melts the tables into the results
store's tidy rows (`table`, key columns, `metric`, `value`), `Diagnosis.from_rows` rebuilds them, so
`diagnose_point` can go through `ResultsStore.get_or_compute` and a rerun recomputes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from torch import nn

from mpt_utils.diagnostics.classify import (
    INDICATORS,
    TOP_K_PATCH,
    classify_failure,
    failure_evidence,
    is_intact,
    recovery_metric,
)
from mpt_utils.diagnostics.internals import attention_entropy, gate_flip_rate, has_attention, has_gates
from mpt_utils.diagnostics.lens import logit_lens
from mpt_utils.diagnostics.metrics import answer_prob, kl_to
from mpt_utils.diagnostics.patching import activation_patching, restore_sites, top_sites
from mpt_utils.diagnostics.prompts import PromptBatch
from mpt_utils.diagnostics.runner import Trace, trace
from mpt_utils.diagnostics.sensitivity import high_precision_injection
from mpt_utils.diagnostics.similarity import representation_similarity
from mpt_utils.diagnostics.subsets import answer_table, pararel_metrics

DIAGNOSTICS_VERSION = 1  # part of every stored config: bump when a diagnostic's numbers would change
# the columns that identify a row of each table; every other column is a measured value
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "answers": ("index", "fact_id", "relation", "subject", "answer", "paraphrase", "subset"),
    "pararel": ("model_kind", "relation"),
    "lens": ("model_kind", "layer"),
    "similarity": ("layer",),
    "attention": ("layer",),
    "gates": ("layer",),
    "restore": ("direction", "layer", "part"),
    "inject": ("direction", "layer", "part"),
    "injection": ("kept", "blocks"),
    "sensitivity": ("layer",),
    "quality": (),
}
TEXT_EVIDENCE = ("label", "reason")
# stored as floats, given back their type when a table is rebuilt
BOOL_COLUMNS = ("dense_correct", "comp_correct")
INT_COLUMNS = ("layer", "n_blocks", "index", "paraphrase", "dense_rank", "comp_rank", "n_sites", "n_facts")


def frame_rows(df: pd.DataFrame, table: str, keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Melt a table into store rows: its key columns, then one row per other column (`metric`, `value`)."""
    keys = list(TABLE_KEYS.get(table, ()) if keys is None else keys)
    out = []
    for rec in df.to_dict("records"):
        base = {"table": table, **{k: rec[k] for k in keys}}
        for col, value in rec.items():
            if col not in keys and col != "prompt":
                out.append({**base, "metric": col, "value": float(value) if value is not None else math.nan})
    return out


def rows_frame(rows: Sequence[Mapping[str, Any]] | pd.DataFrame, table: str,
               keys: Sequence[str] | None = None) -> pd.DataFrame:
    """The inverse of `frame_rows`: one table back in wide form (empty when the rows hold none of it)."""
    keys = list(TABLE_KEYS.get(table, ()) if keys is None else keys)
    df = pd.DataFrame(list(rows)) if not isinstance(rows, pd.DataFrame) else rows
    if df.empty or "table" not in df:
        return pd.DataFrame()
    part = df[df["table"] == table]
    if part.empty:
        return pd.DataFrame()
    if not keys:  # a one-row table
        wide = pd.DataFrame([dict(zip(part["metric"], part["value"]))])
    else:
        wide = part.set_index([*keys, "metric"])["value"].unstack("metric").reset_index()
    wide.columns.name = None
    for col in wide.columns:
        if col in BOOL_COLUMNS:
            wide[col] = wide[col].astype(bool)
        elif col in INT_COLUMNS:
            wide[col] = wide[col].astype(int)
    sort = [k for k in ("model_kind", "direction", "index", "layer", "part", "relation") if k in wide]
    return wide.sort_values(sort).reset_index(drop=True) if sort else wide


@dataclass
class Diagnosis:
    """The label, its evidence row, and every table of one (dense, compressed) pair."""

    label: str
    evidence: dict[str, Any]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    def __getitem__(self, table: str) -> pd.DataFrame:
        return self.tables.get(table, pd.DataFrame())

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for name, df in self.tables.items():
            out += frame_rows(df, name)
        text = {k: self.evidence[k] for k in TEXT_EVIDENCE}
        for key, value in self.evidence.items():
            if key not in TEXT_EVIDENCE:
                out.append({"table": "evidence", **text, "metric": key,
                            "value": math.nan if value is None else float(value)})
        return out

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]]) -> Diagnosis:
        df = pd.DataFrame(list(rows))
        ev_rows = df[df["table"] == "evidence"]
        evidence: dict[str, Any] = {r.metric: r.value for r in ev_rows.itertuples()}
        for k in TEXT_EVIDENCE:
            evidence[k] = ev_rows[k].iloc[0]
        for k in (*INDICATORS, "recovery_on_answer_prob"):
            v = evidence.get(k)
            evidence[k] = None if v is None or (isinstance(v, float) and math.isnan(v)) else bool(v)
        tables = {t: rows_frame(df, t) for t in TABLE_KEYS if (df["table"] == t).any()}
        return cls(evidence["label"], evidence, tables)


def diagnose(dense: nn.Module, compressed: nn.Module, batch: PromptBatch, *, probe: Sequence[int] | None = None,
             dense_trace: Trace | None = None, k: int = 16, patch: bool = True, inject: bool = True,
             keep_sets: Mapping[str, Sequence[int]] | None = None, top_k: int = TOP_K_PATCH,
             skip_intact: bool = True) -> Diagnosis:
    """Run every diagnostic on one pair and classify its failure mode (see the module docstring).

    The answer, lens, similarity, entropy and gate tables use all of `batch`; the re-run sweeps
    (patching both ways, high-precision injection) use the prompts `probe` (batch indices, e.g. the
    prompts the dense model answers; default all), since each costs one re-run per module.
    `dense_trace` (of `batch`) is reused across settings. `patch` / `inject` switch the two patching
    sweeps, `keep_sets` names sets of blocks for high-precision injection; with `skip_intact`, a
    pair already labelled "no failure" skips the sweeps (there is nothing to recover)."""
    td = dense_trace if dense_trace is not None else trace(dense, batch)
    tc = trace(compressed, batch)
    traces = (td, tc)
    tables: dict[str, pd.DataFrame] = {}
    tables["answers"] = answer_table(dense, compressed, batch, traces)
    tables["pararel"] = pararel_metrics(tables["answers"])
    tables["lens"] = logit_lens(dense, compressed, batch, traces)
    tables["similarity"] = representation_similarity(dense, compressed, batch, k, traces)
    if has_attention(td) and has_attention(tc):
        tables["attention"] = attention_entropy(dense, compressed, batch, traces)
    if has_gates(td) and has_gates(tc):
        tables["gates"] = gate_flip_rate(dense, compressed, batch, traces)
    answer_kl = float(kl_to(td.logits, tc.logits).mean())

    def evidence(topk: float | None = None, gap: float = math.nan) -> dict[str, Any]:
        return failure_evidence(answer_kl=answer_kl, similarity=tables["similarity"],
                                attention=tables.get("attention"), gates=tables.get("gates"),
                                restore=tables.get("restore"), topk_recovery=topk, prob_gap=gap,
                                answers=tables["answers"])

    if skip_intact and is_intact(evidence()):
        patch = inject = False
        keep_sets = None
    if probe is not None:
        pb, ptraces = batch.subset(probe), (td.subset(batch, probe), tc.subset(batch, probe))
    else:
        pb, ptraces = batch, traces
    topk, gap = None, math.nan
    if patch:
        tables["restore"] = activation_patching(dense, compressed, pb, "restore", traces=ptraces)
        gap = float((answer_prob(ptraces[0].logits, pb.answer_ids) - answer_prob(ptraces[1].logits, pb.answer_ids)).mean())
        metric = recovery_metric(gap)
        sites = top_sites(tables["restore"], top_k, by=metric)
        topk = restore_sites(dense, compressed, pb, sites, ptraces)[metric]
    if inject:
        tables["inject"] = activation_patching(dense, compressed, pb, "inject", traces=ptraces)
    if keep_sets:
        tables["injection"] = high_precision_injection(dense, compressed, pb, keep_sets, ptraces)
    ev = evidence(topk, gap)
    ev["n_prompts"], ev["n_probe"] = len(batch), len(pb)
    label, ev = classify_failure(ev)
    return Diagnosis(label, ev, tables)


def diagnose_point(store, config: Mapping[str, Any], dense: nn.Module, make_compressed: Callable[[], nn.Module],
                   batch: PromptBatch, **options: Any) -> Diagnosis:
    """`diagnose` through `store.get_or_compute`: the compressed model is built only when the point
    is not stored yet. `config` must hold everything that determines the numbers (model, setting,
    prompts, options); `options` go to `diagnose`."""
    cfg = {**config, "diagnostics_version": DIAGNOSTICS_VERSION}
    return Diagnosis.from_rows(store.get_or_compute(cfg, lambda: diagnose(dense, make_compressed(), batch,
                                                                          **options).rows()))
