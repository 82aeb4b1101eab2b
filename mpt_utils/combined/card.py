"""A model card for one compressed artifact: what it is, what it costs, how good it is, how safe.

The card is written next to the artifact (`<stem>.md` for people, `<stem>.json` for programs) from
the stored grid point of the recipe (`mpt_utils.combined.grid.grid_point`) and the dense model's
point on the same evaluation protocol, so every number on it is a number in the results store:

- the recipe (canonical text), the real file's size on disk and the three size columns of
  `mpt_utils.combined.sizes` (nominal / artifact / sparse), each also as a fraction of dense;
- perplexity ± SE and the paired KL divergence ± SE to the dense model, on the same windows;
- downstream scores, when the caller measured some (passed through as given);
- tokens/s: for a GGUF, the compressed file and the dense model's F16 GGUF timed side by side in one
  llama.cpp child process (`gguf_speed`: interleaved rounds, rotating order, median round, through
  `mpt_utils.eval.speed.measure_speed` on `mpt_utils.eval.llamacpp.open_gguf`); for a torch recipe,
  the tokens/s of the two evaluation runs, which were not timed side by side (the card says so);
- the safe-zone margins: each planned dimension's setting next to its conservative PTP bound (the
  low end of the PTP's confidence interval, `mpt_utils.combined.plan.dimensions_from_curves`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mpt_utils.errors import MPTError

CARD_VERSION = 1
BASELINE_BITS = 16.0
SIZE_LABELS = {"file_bytes": "real file on disk", "nominal_bytes": "nominal (the paper's count: zeros free)",
               "artifact_bytes": "artifact (what is written)", "sparse_bytes": "sparse encoding (bitmask + values)"}
BOUND_LABELS = {"s0_ci_low": "low end of the PTP interval", "s0": "fitted PTP",
                "max_measured": "largest ratio measured (no PTP found)",
                "collapse": "first collapsed point (no PTP found)",
                "interpolated": "largest ratio measured (too few points for eq. 5: the curve is interpolated)"}


def _num(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf as None, numpy scalars as floats, containers recursively."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    number = _num(value)
    if math.isnan(number) and not isinstance(value, float):
        return str(value)
    return number if math.isfinite(number) else None


def point_metric(rows: Sequence[Mapping[str, Any]], name: str) -> Mapping[str, Any] | None:
    """The one row of metric `name` among a point's rows (None when the point has none)."""
    found = [r for r in rows if r.get("metric") == name]
    if len(found) > 1:
        raise MPTError(f"{len(found)} rows of metric {name!r} in one point", "pass the rows of one grid point")
    return found[0] if found else None


def _value(rows, name: str) -> float:
    row = point_metric(rows, name)
    return math.nan if row is None else _num(row.get("value"))


def _stderr(rows, name: str) -> float:
    row = point_metric(rows, name)
    return math.nan if row is None else _num(row.get("stderr"))


# -- safe-zone margins ---------------------------------------------------------------------------------
@dataclass
class Margin:
    """One planned dimension against its safe-zone bound (ratios on the planner's axis; for quant,
    bits as well). `margin` = bound − planned (> 0: inside the safe zone)."""

    dimension: str
    method: str
    step: str  # the recipe step that realises it ("" when the plan leaves the dimension at 0)
    planned: float
    bound: float
    bound_kind: str
    s0: float
    s0_low: float
    s0_high: float
    margin: float
    planned_bits: float | None = None
    bound_bits: float | None = None

    @property
    def inside(self) -> bool:
        return self.planned < self.bound or self.planned == 0.0

    def text(self) -> str:
        if self.planned_bits is not None:
            return (f"{self.dimension} ({self.method}): {self.planned_bits:g} bits vs bound "
                    f"{self.bound_bits:.3g} bits, margin {self.planned_bits - (self.bound_bits or 0):.3g} bits")
        return (f"{self.dimension} ({self.method}): {self.planned:.3g} vs bound {self.bound:.3g} "
                f"({BOUND_LABELS.get(self.bound_kind, self.bound_kind)}), margin {self.margin:.3g}")


def safe_zone_margins(plan, dims, methods: Mapping[str, str], recipe=None) -> list[Margin]:
    """Each dimension of `plan` (a `planner.Plan`) against its bound in `dims` (`CurveDimension`s)."""
    by_name = {d.name: d for d in dims}
    steps = {}
    if recipe is not None:
        for step in recipe:
            dim = {"lowrank": "lowrank", "prune": "prune", "quant": "quant", "gguf": "quant"}.get(step.family)
            if dim is not None:
                steps[dim] = str(step)
    out = []
    for name, planned in plan.ratios.items():
        d = by_name.get(name)
        if d is None:
            raise MPTError(f"plan dimension {name!r} has no fitted dimension", "pass the dims the plan was made from")
        fit = getattr(d, "fit", None)
        has_ptp = bool(getattr(fit, "has_ptp", False))
        ci = tuple(getattr(fit, "s0_ci", (math.nan, math.nan))) if has_ptp else (math.nan, math.nan)
        bits = name == "quant"
        out.append(Margin(name, methods.get(name, ""), steps.get(name, ""), float(planned), float(d.ptp),
                          getattr(d, "bound", ""), _num(fit.s0) if has_ptp else math.nan, _num(ci[0]), _num(ci[1]),
                          float(d.ptp) - float(planned),
                          BASELINE_BITS * (1 - float(planned)) if bits else None,
                          BASELINE_BITS * (1 - float(d.ptp)) if bits else None))
    return out


# -- speed: both GGUFs side by side in one llama.cpp child -------------------------------------------------
def _gguf_speed(paths: dict[str, str], seqlen: int, rounds: int, warmup: int, n_threads: int | None,
                reference: str) -> list[dict[str, Any]]:
    """Child side of `gguf_speed` (runs where llama.cpp may be loaded)."""
    from mpt_utils.eval.llamacpp import open_gguf
    from mpt_utils.eval.speed import measure_speed

    llms = {name: open_gguf(path, seqlen, n_threads) for name, path in paths.items()}

    def caller(llm):
        def run(ids):
            llm.reset()
            llm.eval(ids[0].tolist())

        return run

    try:
        vocab = min(int(llm.n_vocab()) for llm in llms.values())
        results = measure_speed({name: caller(llm) for name, llm in llms.items()}, mode="prefill", seqlen=seqlen,
                                rounds=rounds, warmup=warmup, device="cpu", reference=reference, vocab_size=vocab)
        return [r.as_dict() for r in results]
    finally:
        for llm in llms.values():
            if hasattr(llm, "close"):
                llm.close()


def gguf_speed(compressed: str | os.PathLike, dense: str | os.PathLike, *, seqlen: int = 128, rounds: int = 3,
               warmup: int = 1, n_threads: int | None = None) -> dict[str, Any]:
    """Prefill tokens/s of the compressed GGUF and the dense GGUF, timed side by side (interleaved
    rounds, rotating order, median round) in ONE llama.cpp child process, so both see the same
    machine state. Returns tokens_per_s, dense_tokens_per_s, speedup and the measurement's spread."""
    from mpt_utils.native import has_llama_cpp, run_isolated

    if not has_llama_cpp():
        raise MPTError("timing GGUF files needs llama-cpp-python", "pip install llama-cpp-python, or pass speed=False")
    results = run_isolated("mpt_utils.combined.card:_gguf_speed",
                           {"paths": {"dense": str(dense), "compressed": str(compressed)}, "seqlen": int(seqlen),
                            "rounds": int(rounds), "warmup": int(warmup), "n_threads": n_threads,
                            "reference": "dense"}, what=f"{compressed} vs {dense}")
    got = {r["name"]: r for r in results}
    return {"tokens_per_s": got["compressed"]["tokens_per_s"], "dense_tokens_per_s": got["dense"]["tokens_per_s"],
            "speedup": got["compressed"]["speedup"], "spread": max(got["compressed"]["spread"], got["dense"]["spread"]),
            "seqlen": int(seqlen), "rounds": int(rounds), "n_threads": n_threads, "engine": "llama.cpp",
            "side_by_side": True, "mode": "prefill"}


# -- the card -----------------------------------------------------------------------------------------
@dataclass
class ModelCard:
    """Everything a user needs to judge one compressed artifact (module docstring)."""

    model: str
    recipe: str
    artifact: str  # "gguf" or "torch"
    file: str | None  # the artifact's file name (next to the card), None for a torch recipe
    file_bytes: int | None  # its real size on disk
    sizes: dict[str, float]  # nominal / artifact / sparse bytes and compression_* fractions
    dense_sizes: dict[str, float]
    quality: dict[str, float]  # ppl, ppl_se, kl_mean, kl_se, same_top, dense_ppl, dense_ppl_se
    protocol: dict[str, Any]  # data, seqlen, n_windows, n_tokens
    speed: dict[str, Any]
    margins: list[Margin] = field(default_factory=list)
    plan: dict[str, Any] = field(default_factory=dict)
    downstream: dict[str, Any] | None = None
    config_hash: str | None = None
    notes: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)

    # the numbers a user asks for first
    @property
    def ppl(self) -> float:
        return self.quality.get("ppl", math.nan)

    @property
    def kl(self) -> float:
        return self.quality.get("kl_mean", math.nan)

    @property
    def inside_safe_zone(self) -> bool:
        return all(m.inside for m in self.margins)

    def as_dict(self) -> dict[str, Any]:
        from mpt_utils import __version__

        out = asdict(self)
        out["margins"] = [asdict(m) | {"inside": m.inside} for m in self.margins]
        out["inside_safe_zone"] = self.inside_safe_zone
        out["card_version"] = CARD_VERSION
        out["mpt_version"] = __version__
        return _clean(out)

    def markdown(self) -> str:
        q, s, d = self.quality, self.sizes, self.dense_sizes
        proto = self.protocol
        lines = [f"# {self.model} · `{self.recipe}`", ""]
        lines += [f"Compressed with the recipe `{self.recipe}` "
                  f"({'a llama.cpp GGUF file' if self.artifact == 'gguf' else 'torch steps; no file is written'}).", ""]
        lines += ["## Quality (same windows as the dense model)", "",
                  "| metric | compressed | dense |", "| --- | --- | --- |",
                  f"| perplexity on {proto.get('data')} ({_int(proto.get('n_windows'))} × {_int(proto.get('seqlen'))} tokens)"
                  f" | {_pm(q.get('ppl'), q.get('ppl_se'))} | {_pm(q.get('dense_ppl'), q.get('dense_ppl_se'))} |",
                  f"| KL to dense (nats/token) | {_pm(q.get('kl_mean'), q.get('kl_se'), 4)} | 0 |",
                  f"| same top-1 token as dense | {_pct(q.get('same_top'))} | 100 % |", ""]
        if self.downstream:
            lines += ["## Downstream scores (as measured by the caller)", "", "| task | score |", "| --- | --- |"]
            lines += [f"| {task} | {_fmt_any(v)} |" for task, v in self.downstream.items()] + [""]
        lines += ["## Size", "", "| accounting | bytes | of dense | dense bytes |", "| --- | --- | --- | --- |"]
        if self.file_bytes is not None:
            ref = d.get("artifact_bytes")
            lines.append(f"| {SIZE_LABELS['file_bytes']} (`{self.file}`) | {self.file_bytes:,} | "
                         f"{_frac(self.file_bytes, ref)} | {_bytes(ref)} |")
        for key in ("nominal_bytes", "artifact_bytes", "sparse_bytes"):
            lines.append(f"| {SIZE_LABELS[key]} | {_bytes(s.get(key))} | {_frac(s.get(key), d.get(key))} | "
                         f"{_bytes(d.get(key))} |")
        lines.append("")
        sp = self.speed
        lines += ["## Speed", ""]
        if sp.get("side_by_side"):
            lines.append(f"{sp.get('engine')}, prefill of {sp.get('seqlen')} tokens, {sp.get('rounds')} interleaved rounds "
                         f"(median), compressed and dense F16 GGUF in one process: **{_num(sp.get('tokens_per_s')):.1f}** "
                         f"vs {_num(sp.get('dense_tokens_per_s')):.1f} tokens/s (×{_num(sp.get('speedup')):.2f}, "
                         f"spread {_num(sp.get('spread')):.0%}).")
        elif sp:
            lines.append(f"{_num(sp.get('tokens_per_s')):.1f} vs {_num(sp.get('dense_tokens_per_s')):.1f} tokens/s "
                         f"(×{_num(sp.get('speedup')):.2f}). {sp.get('note', '')}")
        else:
            lines.append("not measured.")
        lines.append("")
        if self.margins:
            lines += ["## Safe zone: each dimension against its conservative PTP bound", "",
                      "| dimension | method | step | planned | bound | bound from | PTP s0 (interval) | margin |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            for m in self.margins:
                planned = f"{m.planned:.4g}" + (f" ({m.planned_bits:g} bits)" if m.planned_bits is not None else "")
                bound = f"{m.bound:.4g}" + (f" ({m.bound_bits:.3g} bits)" if m.bound_bits is not None else "")
                s0 = "–" if math.isnan(m.s0) else f"{m.s0:.3g} ({m.s0_low:.3g}–{m.s0_high:.3g})"
                lines.append(f"| {m.dimension} | {m.method} | `{m.step or '–'}` | {planned} | {bound} | "
                             f"{BOUND_LABELS.get(m.bound_kind, m.bound_kind)} | {s0} | {m.margin:+.3g} |")
            lines += ["", "Inside the safe zone on every dimension." if self.inside_safe_zone
                      else "**Outside the safe zone on at least one dimension.**", ""]
        if self.plan:
            p = self.plan
            asked = [f"ε = {_fmt_any(p['epsilon'])} PPL above dense" if p.get("epsilon") is not None else "",
                     f"a budget of {_bytes(p['budget_bytes'])} bytes (nominal count)" if p.get("budget_bytes") else ""]
            lines += ["## Plan", "",
                      f"Asked: {' and '.join(a for a in asked if a) or '–'}; planned {p.get('describe', '')}. "
                      f"Predicted PPL {_num(p.get('predicted_ppl')):.4g} "
                      f"(dense {_num(p.get('base_ppl')):.4g} + {_num(p.get('predicted_delta')):.3g}); measured "
                      f"{_pm(q.get('ppl'), q.get('ppl_se'))}. Predicted KL {_num(p.get('predicted_kl')):.4g}; measured "
                      f"{_pm(q.get('kl_mean'), q.get('kl_se'), 4)}.", ""]
        if self.notes:
            lines += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        lines += [f"Results-store point `{self.config_hash}`; card written "
                  f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(self.created))}.", ""]
        return "\n".join(lines)

    def write(self, folder: str | os.PathLike, stem: str) -> tuple[Path, Path]:
        """`<stem>.md` and `<stem>.json` in `folder` (written atomically)."""
        from mpt_utils.store import atomic_write_text

        folder = Path(folder)
        md, js = folder / f"{stem}.md", folder / f"{stem}.json"
        atomic_write_text(md, self.markdown())
        atomic_write_text(js, json.dumps(self.as_dict(), indent=1, sort_keys=True))
        return md, js


def _int(value: Any) -> str:
    v = _num(value)
    return "?" if math.isnan(v) else f"{int(v)}"


def _pm(value: Any, se: Any, digits: int = 4) -> str:
    v, e = _num(value), _num(se)
    if math.isnan(v):
        return "–"
    return f"{v:.{digits}g}" + ("" if math.isnan(e) else f" ± {e:.2g}")


def _pct(value: Any) -> str:
    v = _num(value)
    return "–" if math.isnan(v) else f"{100 * v:.1f} %"


def _bytes(value: Any) -> str:
    v = _num(value)
    return "–" if math.isnan(v) else f"{v:,.0f}"


def _frac(value: Any, ref: Any) -> str:
    v, r = _num(value), _num(ref)
    return "–" if math.isnan(v) or not r > 0 else f"{100 * v / r:.1f} %"


def _fmt_any(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {_fmt_any(v)}" for k, v in value.items())
    v = _num(value)
    return str(value) if math.isnan(v) else f"{v:.4g}"


def build_card(model: str, recipe, point: Sequence[Mapping[str, Any]], dense: Sequence[Mapping[str, Any]], *,
               file: str | os.PathLike | None = None, speed: Mapping[str, Any] | None = None,
               margins: Sequence[Margin] = (), plan: Mapping[str, Any] | None = None,
               downstream: Mapping[str, Any] | None = None, notes: Sequence[str] = ()) -> ModelCard:
    """The card of `recipe` from its stored grid point `point` and the dense point `dense` (the
    recipe "dense" on the same protocol). `file`: the artifact on disk (a GGUF), measured here.
    `speed`: `gguf_speed`'s answer; without it the two evaluation runs' tokens/s are used and the
    card says they were not timed side by side."""
    if point_metric(point, "ppl") is None:
        raise MPTError("the point has no perplexity row", "pass the rows grid_point returned for the recipe")
    ppl_row = point_metric(point, "ppl") or {}
    dense_row = point_metric(dense, "ppl") or {}
    sizes = {m: _value(point, m) for m in ("nominal_bytes", "artifact_bytes", "sparse_bytes", "compression_nominal",
                                            "compression_artifact", "compression_sparse")}
    dense_sizes = {m: _value(dense, m) for m in ("nominal_bytes", "artifact_bytes", "sparse_bytes")}
    artifact_row = point_metric(point, "artifact_bytes") or {}
    artifact = str(artifact_row.get("artifact") or ("gguf" if file else "torch"))
    notes = list(notes)
    if artifact == "gguf" and math.isfinite(sizes["compression_artifact"]):
        # the point's artifact ratio is against the dense model's own F16 GGUF: give that reference
        ca = sizes["compression_artifact"]
        dense_sizes["artifact_bytes"] = sizes["artifact_bytes"] / (1 - ca) if ca < 1 else math.nan
        notes.append("the dense artifact is the dense model's F16 GGUF (same metadata and tokenizer), "
                     "so the file ratio compares a file with a file")
    file_bytes = None
    if file is not None:
        file_bytes = Path(file).stat().st_size
        if math.isfinite(sizes["artifact_bytes"]) and file_bytes != int(sizes["artifact_bytes"]):
            notes.append(f"the file on disk ({file_bytes:,} bytes) differs from the stored artifact size "
                         f"({int(sizes['artifact_bytes']):,}): it was rebuilt and is not byte-identical")
    quality = {"ppl": _num(ppl_row.get("value")), "ppl_se": _num(ppl_row.get("stderr")),
               "kl_mean": _value(point, "kl_mean"), "kl_se": _stderr(point, "kl_mean"),
               "same_top": _value(point, "same_top"), "dense_ppl": _num(dense_row.get("value")),
               "dense_ppl_se": _num(dense_row.get("stderr"))}
    protocol = {k: ppl_row.get(k) for k in ("data", "seqlen", "n_windows", "n_tokens")}
    if speed is None:
        tps, dtps = _num(ppl_row.get("tokens_per_s")), _num(dense_row.get("tokens_per_s"))
        engine = "llama.cpp" if artifact == "gguf" else "torch"
        speed = {"tokens_per_s": tps, "dense_tokens_per_s": dtps, "speedup": tps / dtps if dtps > 0 else math.nan,
                 "engine": f"{engine} (compressed) vs torch (dense)", "side_by_side": False,
                 "note": ("These are the tokens/s of the two evaluation runs (the compressed model's and the dense "
                          "model's), not timed side by side; a torch recipe simulates quantization in floating point "
                          "and stores its zeros, so no speed-up is expected from it.")}
    return ModelCard(model=model, recipe=str(recipe), artifact=artifact,
                     file=Path(file).name if file is not None else None, file_bytes=file_bytes, sizes=sizes,
                     dense_sizes=dense_sizes, quality=quality, protocol=protocol, speed=dict(speed),
                     margins=list(margins), plan=dict(plan or {}), downstream=dict(downstream) if downstream else None,
                     config_hash=ppl_row.get("config_hash"), notes=notes)


def read_card(path: str | os.PathLike) -> dict[str, Any]:
    """A written card's JSON."""
    path = Path(path)
    if path.suffix != ".json":
        path = path.with_suffix(".json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MPTError(f"no model card at {path}", "pass the .json written next to the artifact") from None


__all__ = ["Margin", "ModelCard", "build_card", "gguf_speed", "point_metric", "read_card", "safe_zone_margins"]
