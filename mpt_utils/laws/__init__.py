"""Compression laws: how structured pruning, model size and recovery fine-tuning set an LLM's loss
and downstream accuracy, after "Compression Laws for Large Language Models" (Ayan Sengupta,
Siddhant Chaudhary, Tanmoy Chakraborty; arXiv:2504.04342).

    L = L0^α · (1 + r)^β · (1 + 1/(D + 1))^γ      fitted by OLS in log space (`fit`)

Modules, one job each:
  assets     the chunked gemma3-270m GGUF (second embedded size) and loading models once
  rft        LoRA recovery fine-tuning (rank 16, one epoch) on a budget of D tokens
  intrinsic  test cross-entropy per token and bits per byte
  sweep      the grid (models × methods × ratios × D) as recipe points and measurements of one
             session per model; RandomPruneNet is the structured method `random_prunenet`
             (`mpt_utils.prune.structured.random_prunenet`)
  points     tidy law points with the dense L0 beside each
  fit        the OLS law fit with standard errors and R²
  shape      linear vs quadratic vs exponential in r, by AICc/BIC
  critical   the ratio where RFT stops closing the loss gap, next to the eq. 5 PTP
  claims     the paper's claims with computed verdicts
  analysis   rows -> every table of the notebook
  figures    the notebook's figures
"""

from mpt_utils.laws.analysis import analyze, fit_laws, law_table
from mpt_utils.laws.assets import assemble_embedded, load_models
from mpt_utils.laws.fit import LawFit, fit_law
from mpt_utils.laws.points import law_points
from mpt_utils.laws.rft import lora_rft
from mpt_utils.laws.shape import compare_shapes
from mpt_utils.laws.sweep import LawSettings, law_sweep

__all__ = ["LawFit", "LawSettings", "analyze", "assemble_embedded", "compare_shapes", "fit_law", "fit_laws",
           "law_points", "law_sweep", "law_table", "load_models", "lora_rft"]
