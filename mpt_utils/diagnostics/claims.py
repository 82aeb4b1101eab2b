"""The failure-mode paper's qualitative claims next to what we measure, and PTP versus collapse onset.

The claims are those of "From Signal Degradation to Computation Collapse: Uncovering the Two
Failure Modes of LLM Quantization" (arXiv:2604.19884), stated for 7-9B instruction models
(Llama-3.1-8B, Mistral-7B, Qwen, Gemma). The Phase Transition Points come from the Perspective's
claims table (`data/published/perspective_ptp_claims.csv`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd

from mpt_utils.diagnostics.classify import COMPUTATION_COLLAPSE, SIGNAL_DEGRADATION

PAPER = "From Signal Degradation to Computation Collapse (arXiv:2604.19884)"
ENTROPY_CLAIM = 0.80  # normalised attention entropy the paper reports exceeded at 2 bits
GATE_FLIP_CLAIM = 0.80  # gate flip rate the paper reports approached at 2 bits
EARLY_SHARE = 1 / 3  # "early layers" = the first third of the blocks
ROSE = 0.02  # mean normalised entropy must rise by this much over the dense model to count as flattening
PPL_JUMP = 2.0  # perplexity at least this many times the dense one: the model's own quality transition
# a recipe step's family (`mpt_utils.recipe`) -> the family of the published PTP table
PUBLISHED_FAMILY = {"quant": "quantization", "prune": "unstructured", "lowrank": "lowrank", "structured": "structured"}
FAMILY_NAMES = {"quant": "quantization", "prune": "pruning"}  # how the onset table writes a family


def _fmt(x: float, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.0%}" if pct else f"{x:.2f}"


def sensitivity_claim(sens: pd.DataFrame) -> dict:
    """Early layers most sensitive at 2 bits (Llama / Mistral): where our most sensitive blocks are."""
    n = len(sens)
    early = max(1, round(n * EARLY_SHARE))
    top = sens.sort_values("kl_to_dense", ascending=False)["layer"].head(3).tolist()
    share = float(sens[sens.layer < early].kl_to_dense.sum() / sens.kl_to_dense.sum())
    hits = sum(b < early for b in top)
    verdict = ("agrees" if top[0] < early else "partly agrees" if hits else "disagrees")
    return {"claim": "early layers are the most sensitive to 2-bit quantization (Llama/Mistral family)",
            "paper": "acute sensitivity of early layers at 2 bits",
            "measured": f"most sensitive blocks {top} of {n}; the first {early} blocks hold {share:.0%} of the "
                        f"one-block-at-a-time KL (uniform: {early / n:.0%})",
            "verdict": verdict}


def entropy_claim(ev2: Mapping) -> dict:
    ent, dense = ev2.get("entropy_compressed_mean", math.nan), ev2.get("entropy_dense_mean", math.nan)
    peak = ev2.get("max_entropy_shift", math.nan)
    return {"claim": "attention flattens at 2 bits", "paper": f"normalised attention entropy > {ENTROPY_CLAIM:.2f}",
            "measured": f"mean {_fmt(ent)} at 2 bits vs {_fmt(dense)} dense (largest per-block shift "
                        f"{_fmt(peak)})",
            "verdict": ("agrees" if ent > ENTROPY_CLAIM else "same direction, weaker") if ent - dense >= ROSE
                       else "disagrees (no flattening)"}


def gate_claim(ev2: Mapping) -> dict:
    mean, peak = ev2.get("mean_gate_flip", math.nan), ev2.get("max_gate_flip", math.nan)
    return {"claim": "MLP gates flip at 2 bits", "paper": f"gate flip rate near {GATE_FLIP_CLAIM:.0%}",
            "measured": f"mean {_fmt(mean, True)}, largest block {_fmt(peak, True)} "
                        "(sign flips of SwiGLU gate pre-activations; random signs give 50%)",
            "verdict": "agrees" if peak >= 0.7 else ("same direction, weaker" if peak >= 0.25 else "disagrees")}


def pararel_claim(p4: pd.DataFrame, p2: pd.DataFrame) -> dict:
    def row(p):
        c = p[p.model_kind == "compressed"]
        return {m: float(c[m].mean()) for m in ("any_correct", "majority_correct", "all_correct")}

    a, b = row(p4), row(p2)
    drop = a["any_correct"] - b["any_correct"]
    return {"claim": "4 -> 2 bits: catastrophic drop of ParaRel factual recall",
            "paper": "accuracy kept at 4 bits, collapses at 2 bits",
            "measured": "≥1 / majority / all paraphrases correct: 4 bits "
                        f"{a['any_correct']:.0%} / {a['majority_correct']:.0%} / {a['all_correct']:.0%}, "
                        f"2 bits {b['any_correct']:.0%} / {b['majority_correct']:.0%} / {b['all_correct']:.0%}",
            "verdict": "agrees" if drop >= 0.5 and b["any_correct"] <= 0.1 else
                       ("partly agrees" if drop > 0 else "disagrees")}


def mode_claim(labels: Mapping[int, str]) -> dict:
    """2 bits is Computation Collapse, 4 bits Signal Degradation."""
    two, four = labels.get(2), labels.get(4)
    ok = two == COMPUTATION_COLLAPSE and four == SIGNAL_DEGRADATION
    return {"claim": "two failure modes: Signal Degradation at 4 bits, Computation Collapse at 2 bits",
            "paper": "4-bit failures trace to specific sensitive components; 2 bits collapses computation",
            "measured": ", ".join(f"{b}-bit: {lab}" for b, lab in sorted(labels.items(), reverse=True)),
            "verdict": "agrees" if ok else ("partly agrees" if two == COMPUTATION_COLLAPSE else "disagrees")}


def localization_claim(inject4: pd.DataFrame, inject2: pd.DataFrame, share: float = 0.5) -> dict:
    """At 4 bits the damage traces to a few components, at 2 bits to (nearly) all of them: how many
    single compressed modules, injected alone into the dense model, cause ≥ `share` of the gap."""
    def count(df: pd.DataFrame) -> int:
        return int((df["damage_share"] >= share).sum())

    n4, n2, total = count(inject4), count(inject2), len(inject2)
    verdict = "agrees" if n4 <= max(3, total // 10) and n2 >= total // 2 else ("partly agrees" if n2 > n4 else "disagrees")
    return {"claim": "4-bit failures come from specific components, 2-bit failures from all of them",
            "paper": "4 bits: sensitivity to specific parameters (Llama/Mistral); 2 bits: collapse of attention and MLP",
            "measured": f"modules whose compressed output alone causes ≥ {share:.0%} of the answer-probability gap: "
                        f"{n4} of {total} at 4 bits, {n2} of {total} at 2 bits",
            "verdict": verdict}


def recovery_claim(evidence: pd.DataFrame) -> dict:
    """Signal Degradation recovers under a targeted intervention, Computation Collapse does not."""
    by = evidence.groupby("label")["topk_recovery"].median()
    sd, cc = by.get(SIGNAL_DEGRADATION, math.nan), by.get(COMPUTATION_COLLAPSE, math.nan)
    verdict = "n/a" if math.isnan(sd) or math.isnan(cc) else ("agrees" if sd > cc else "disagrees")
    return {"claim": "Signal Degradation is recoverable by targeted patching, Computation Collapse is not",
            "paper": "restoring a few components repairs Signal Degradation, not Collapse",
            "measured": f"median recovery when restoring the 3 best modules: {_fmt(sd)} (Signal Degradation) "
                        f"vs {_fmt(cc)} (Computation Collapse)",
            "verdict": verdict}


def collapse_onset(points: pd.DataFrame, claims: pd.DataFrame) -> pd.DataFrame:
    """Per family/method: the settings in order of compression, the first labelled Computation
    Collapse, and whether that onset falls in the published PTP range; with a `ppl_vs_dense`
    column also the first setting whose perplexity reached PPL_JUMP × dense (this model's own quality
    transition at the resolution of the settings) and whether both onsets are the same setting.
    `points` needs columns family (a recipe step's: quant, prune, lowrank, structured; other families
    are skipped), method, bits, ratio, label; `claims` is the published `perspective_ptp_claims` table."""
    rows = []
    for (family, method), part in points.groupby(["family", "method"], sort=False):
        if family not in PUBLISHED_FAMILY:
            continue
        if family == "quant":
            part = part.assign(level=-part["bits"].astype(float)).sort_values("level")
            claim = claims[claims.family == "quantization"]
            fmt = lambda v: f"{-v:g} bits"  # noqa: E731
        else:
            part = part.assign(level=part["ratio"].astype(float)).sort_values("level")
            fam = PUBLISHED_FAMILY[family]
            names = {"svd_llm": "SVD-LLM", "asvd": "ASVD"}
            claim = claims[(claims.family == fam) & claims.method.isin(["*", names.get(method, method)])]
            fmt = lambda v: f"{v:.0%}"  # noqa: E731
        if claim.empty:
            continue
        lo, hi = float(claim.lo.iloc[0]), float(claim.hi.iloc[0])
        if family == "quant":
            lo, hi = -hi, -lo
        levels, labels = part.level.tolist(), part.label.tolist()
        first = next((i for i, lab in enumerate(labels) if lab == COMPUTATION_COLLAPSE), None)
        if first is None:
            onset, verdict = "no setting collapses", (
                "consistent: every setting lies before the PTP" if levels[-1] < lo else
                "no: settings past the PTP are not labelled Computation Collapse")
        else:
            before = levels[first - 1] if first > 0 else -math.inf
            onset = (f"between {fmt(before)} and {fmt(levels[first])}" if first > 0
                     else f"at or before {fmt(levels[first])} (the least compressed setting)")
            if levels[first] >= lo and before <= hi:
                verdict = "coincides (within the spacing of the settings)"
            elif levels[first] < lo:
                verdict = "collapse sets in before the published PTP"
            else:
                verdict = "collapse sets in after the published PTP"
        ptp = (f"{-hi:g}-{-lo:g} bits" if family == "quant" else f"{lo:.0%}-{hi:.0%}")
        row = {"family": FAMILY_NAMES.get(family, family), "method": method,
               "settings": ", ".join(f"{fmt(v)}: {lab}" for v, lab in zip(levels, labels)),
               "published PTP": ptp, "collapse onset": onset, "verdict": verdict}
        if "ppl_vs_dense" in part:
            ratios = part.ppl_vs_dense.astype(float).tolist()
            jump = next((i for i, r in enumerate(ratios) if r >= PPL_JUMP), None)
            row["PPL x dense"] = ", ".join(f"{fmt(v)}: {r:.3g}" for v, r in zip(levels, ratios))
            row[f"PPL onset (>= {PPL_JUMP:g}x)"] = "none" if jump is None else fmt(levels[jump])
            row["same setting"] = jump == first
        rows.append(row)
    return pd.DataFrame(rows)
