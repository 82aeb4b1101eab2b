"""Signal Degradation or Computation Collapse? One label per (model, compression setting), with evidence.

The two failure modes of "From Signal Degradation to Computation Collapse: Uncovering the Two
Failure Modes of LLM Quantization" (arXiv:2604.19884): Signal Degradation is error that builds up
gradually across blocks while every component still computes its function (hidden-state subspaces
stay aligned with the dense ones, restoring a few modules recovers the answer); Computation Collapse
is components that stop working (a localized jump of the damage, attention flattening, MLP gates
flipping, and patching modules back does not recover the answer).

The rule, every threshold below a module constant:
1. answer KL(dense ‖ compressed) < KL_INTACT and final hidden-state relative error < REL_ERROR_INTACT
   -> "no failure" (output and representation both essentially the dense ones: nothing to diagnose;
   the representation test matters for models whose output distribution is nearly flat);
2. otherwise five collapse indicators are evaluated (None where the evidence is missing):
   - localized:       one block adds ≥ JUMP_SHARE of all the growth of the relative hidden-state
                      error (the increments of `rel_error` block by block, negative ones ignored);
   - gate_spike:      some block flips ≥ GATE_FLIP_SPIKE of its SwiGLU gate signs (random signs: 0.5);
   - entropy_spike:   some block's mean normalised attention entropy moves by ≥ ENTROPY_SPIKE;
   - subspace_low:    some block's top-k hidden-state subspace similarity falls below SUBSPACE_MIN;
   - no_recovery:     restoring the TOP_K_PATCH most useful modules together (dense outputs patched
                      into the compressed model) closes < RECOVERY_MIN of the gap: the gap in
                      correct-answer probability, as in the paper, when the dense model beats the
                      compressed one by ≥ MIN_PROB_GAP on the probe prompts; otherwise (a model
                      that does not know the answers, e.g. a random test model) the answer KL;
   ≥ COLLAPSE_VOTES indicators -> "Computation Collapse", else "Signal Degradation".
Recovery is a ratio to the gap, and the TOP_K_PATCH sites are the best of all single restorations:
when the gap is small (mild damage), single modules move the answer by more than the gap and the
combination can overshoot 1; that reads as "recovers", which is what a small, undoable gap is.
The thresholds are round values fixed from what the quantities mean (half of the damage in one
block, a quarter of the gates flipped, a tenth of the entropy range, half the subspace energy,
half the gap recovered).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

KL_INTACT = 0.02  # nats at the answer position: below this the compressed model answers as the dense one
REL_ERROR_INTACT = 0.05  # ‖h_c − h_d‖ / ‖h_d‖ after the last block: a few percent is what a near-lossless format leaves
JUMP_SHARE = 0.5
GATE_FLIP_SPIKE = 0.25
ENTROPY_SPIKE = 0.10
SUBSPACE_MIN = 0.5
RECOVERY_MIN = 0.5
MIN_PROB_GAP = 0.05  # mean answer-probability gap (dense − compressed) for probability-based recovery
TOP_K_PATCH = 3
COLLAPSE_VOTES = 3

NO_FAILURE = "no failure"
SIGNAL_DEGRADATION = "Signal Degradation"
COMPUTATION_COLLAPSE = "Computation Collapse"
LABELS = (NO_FAILURE, SIGNAL_DEGRADATION, COMPUTATION_COLLAPSE)
INDICATORS = ("localized", "gate_spike", "entropy_spike", "subspace_low", "no_recovery")


def damage_jump(similarity: pd.DataFrame) -> tuple[float, int]:
    """(share of the total growth of the relative error added by the worst block, that block)."""
    err = similarity.sort_values("layer")["rel_error"].to_numpy(dtype=float)
    steps = [max(b - a, 0.0) for a, b in zip([0.0, *err[:-1]], err)]
    total = sum(steps)
    if total <= 0:
        return math.nan, -1
    worst = max(range(len(steps)), key=steps.__getitem__)
    return steps[worst] / total, int(similarity.sort_values("layer")["layer"].iloc[worst])


def _arg(df: pd.DataFrame | None, col: str, fn: str = "max", absolute: bool = False) -> tuple[float, int]:
    if df is None or df.empty or col not in df:
        return math.nan, -1
    values = df[col].abs() if absolute else df[col]
    idx = values.idxmax() if fn == "max" else values.idxmin()
    return float(values.loc[idx]), int(df.loc[idx, "layer"])


def recovery_metric(prob_gap: float) -> str:
    """The patching column recovery is read from: "recovery" (answer probability) when the dense model
    beats the compressed one by ≥ MIN_PROB_GAP, else "kl_recovery"."""
    return "recovery" if prob_gap >= MIN_PROB_GAP else "kl_recovery"


def failure_evidence(*, answer_kl: float, similarity: pd.DataFrame, attention: pd.DataFrame | None = None,
                     gates: pd.DataFrame | None = None, restore: pd.DataFrame | None = None,
                     topk_recovery: float | None = None, prob_gap: float = math.nan,
                     answers: pd.DataFrame | None = None) -> dict[str, Any]:
    """The evidence row the classifier reads: the quantities, where they peak, and the indicators.
    `prob_gap`: mean answer probability dense − compressed on the patching prompts, which picks the
    recovery column (`recovery_metric`); `topk_recovery` must be read from that same column."""
    jump, jump_layer = damage_jump(similarity)
    min_sub, min_sub_layer = _arg(similarity, "subspace_sim", "min")
    min_cka, _ = _arg(similarity, "cka", "min")
    ent, ent_layer = _arg(attention, "entropy_shift", absolute=True)
    flip, flip_layer = _arg(gates, "flip_rate")
    on_prob = not math.isnan(prob_gap) and recovery_metric(prob_gap) == "recovery"
    best, _ = _arg(restore, "recovery" if on_prob else "kl_recovery")
    ev: dict[str, Any] = {
        "answer_kl": float(answer_kl), "final_rel_error": float(similarity.sort_values("layer")["rel_error"].iloc[-1]),
        "damage_jump_share": jump, "damage_jump_layer": jump_layer,
        "min_cka": min_cka, "min_subspace_sim": min_sub, "min_subspace_layer": min_sub_layer,
        "max_entropy_shift": ent, "max_entropy_shift_layer": ent_layer,
        "entropy_compressed_mean": float(attention["entropy_compressed"].mean()) if attention is not None else math.nan,
        "entropy_dense_mean": float(attention["entropy_dense"].mean()) if attention is not None else math.nan,
        "max_gate_flip": flip, "max_gate_flip_layer": flip_layer,
        "mean_gate_flip": float(gates["flip_rate"].mean()) if gates is not None else math.nan,
        "probe_prob_gap": float(prob_gap), "recovery_on_answer_prob": on_prob,
        "best_single_recovery": best,
        "topk_recovery": math.nan if topk_recovery is None else float(topk_recovery),
    }
    if answers is not None and len(answers):
        ev.update(acc_dense=float(answers.dense_correct.mean()), acc_compressed=float(answers.comp_correct.mean()),
                  n_failure=int((answers.subset == "failure").sum()), n_robust=int((answers.subset == "robust").sum()))

    def test(value: float, hit) -> bool | None:
        return None if value is None or math.isnan(value) else bool(hit(value))

    ev.update(localized=test(jump, lambda v: v >= JUMP_SHARE),
              gate_spike=test(flip, lambda v: v >= GATE_FLIP_SPIKE),
              entropy_spike=test(ent, lambda v: v >= ENTROPY_SPIKE),
              subspace_low=test(min_sub, lambda v: v < SUBSPACE_MIN),
              no_recovery=test(ev["topk_recovery"], lambda v: v < RECOVERY_MIN))
    ev["collapse_votes"] = sum(bool(ev[k]) for k in INDICATORS)
    ev["indicators_available"] = sum(ev[k] is not None for k in INDICATORS)
    return ev


def is_intact(evidence: dict[str, Any]) -> bool:
    """Rule 1: output and final representation both essentially the dense model's."""
    return evidence["answer_kl"] < KL_INTACT and evidence["final_rel_error"] < REL_ERROR_INTACT


def classify_failure(evidence: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(label, evidence row with the label and the reason added); see the module docstring."""
    ev = dict(evidence)
    if is_intact(ev):
        label = NO_FAILURE
        reason = (f"answer KL {ev['answer_kl']:.4f} < {KL_INTACT} and final relative error "
                  f"{ev['final_rel_error']:.3f} < {REL_ERROR_INTACT}")
    else:
        hits = [k for k in INDICATORS if ev.get(k)]
        label = COMPUTATION_COLLAPSE if ev["collapse_votes"] >= COLLAPSE_VOTES else SIGNAL_DEGRADATION
        reason = (f"{ev['collapse_votes']}/{ev['indicators_available']} collapse indicators "
                  f"({', '.join(hits) or 'none'}); collapse needs {COLLAPSE_VOTES}")
    ev.update(label=label, reason=reason)
    return label, ev
