"""Failure-mode diagnostics: Signal Degradation versus Computation Collapse.

Implements the analyses of "From Signal Degradation to Computation Collapse: Uncovering the Two
Failure Modes of LLM Quantization" (arXiv:2604.19884) for any compressed copy of a dense model
(quantized, pruned or low-rank: a compression recipe, `mpt_utils.recipe`, applied by the one engine),
on factual-recall prompts with paraphrases:

- `logit_lens`: per block, KL of the intermediate next-token distribution to the dense final one,
  and the rank / probability of the correct answer;
- `activation_patching`: restore one block's attention or MLP output (dense -> compressed), or
  inject it (compressed -> dense); `heatmap_frame` for the layer × module map;
- `representation_similarity`: linear CKA and top-k principal-angle similarity per block;
- `attention_entropy` (normalised to [0, 1]) and `gate_flip_rate` (SwiGLU gate sign flips);
- `layer_sensitivity` (one block compressed at a time) and `high_precision_injection` (chosen
  blocks kept dense inside the compressed model);
- `answer_table` / `pararel_metrics`: failure and robust subsets, ParaRel-style consistency;
- `classify_failure`: the label and its evidence row (thresholds in `classify`);
- `diagnose` / `diagnose_point`: all of it for one pair, through the results store;
- `session.DiagnosticSession`: one model's prompt suite and a diagnosis point per recipe
  (`point("rtn:2bit")`), stored under the recipe's key.
"""

from mpt_utils.diagnostics.classify import (
    COMPUTATION_COLLAPSE,
    LABELS,
    NO_FAILURE,
    SIGNAL_DEGRADATION,
    classify_failure,
    failure_evidence,
)
from mpt_utils.diagnostics.internals import attention_entropy, gate_flip_rate, normalized_entropy
from mpt_utils.diagnostics.lens import logit_lens
from mpt_utils.diagnostics.patching import activation_patching, heatmap_frame, restore_sites, top_sites
from mpt_utils.diagnostics.pipeline import Diagnosis, diagnose, diagnose_point, frame_rows, rows_frame
from mpt_utils.diagnostics.prompts import FactPrompt, PromptBatch, encode_prompts, factual_suite
from mpt_utils.diagnostics.runner import PARTS, Trace, run_from, trace
from mpt_utils.diagnostics.sensitivity import high_precision_injection, layer_sensitivity, rtn_block
from mpt_utils.diagnostics.similarity import linear_cka, representation_similarity, subspace_similarity
from mpt_utils.diagnostics.subsets import answer_table, pararel_metrics, subset_indices
from mpt_utils.diagnostics.synthetic import broken_block, distributed_noise

__all__ = [
    "COMPUTATION_COLLAPSE", "LABELS", "NO_FAILURE", "PARTS", "SIGNAL_DEGRADATION", "Diagnosis", "FactPrompt",
    "PromptBatch", "Trace", "activation_patching", "answer_table", "attention_entropy", "broken_block",
    "classify_failure", "diagnose", "diagnose_point", "distributed_noise", "encode_prompts",
    "factual_suite", "failure_evidence", "frame_rows", "gate_flip_rate", "heatmap_frame",
    "high_precision_injection", "layer_sensitivity", "linear_cka", "logit_lens", "normalized_entropy",
    "pararel_metrics", "representation_similarity", "restore_sites", "rows_frame", "rtn_block",
    "run_from", "subset_indices", "subspace_similarity", "top_sites", "trace",
]
