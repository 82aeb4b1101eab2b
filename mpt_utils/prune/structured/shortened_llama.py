"""Shortened LLaMA: one-shot depth pruning of whole decoder blocks ranked by a PPL or Taylor criterion.

Reference: "Shortened LLaMA: Depth Pruning for Large Language Models with Comparison of Retraining
Methods", B.-K. Kim, G. Kim, T.-H. Kim, T. Castells, S. Choi, J. Shin, H.-K. Song, arXiv:2402.02834;
code github.com/Nota-NetsPresso/shortened-llm (`src/anal_block_sensitivity_ppl.py`,
`src/anal_block_sensitivity_taylor.py`, `src/block_prune.py`).

Every block gets one importance score on the dense model, the blocks are sorted once, and the
round(ratio · L) least important are removed together (one shot; SLEB re-scores after each removal).
- `criterion="ppl"` (the paper's recommended criterion, the default): the calibration perplexity of the
  model with that single block removed; the block whose removal raises it least goes first.
- `criterion="taylor"`: Σ |W ⊙ ∂L/∂W| over the block's weight matrices and norm weights (biases and
  embeddings excluded), the LM loss of the calibration samples in batches of `batch_size`, W ⊙ ∂L/∂W
  summed over batches before the absolute value (as the reference accumulates it). The paper's
  Taylor+ keeps the first four and the last two blocks out of the candidates, because Taylor ranks
  them low although removing them is harmful: `keep_first` / `keep_last` default to 4 / 2 for Taylor
  and 0 / 0 for PPL, as in the paper (the reference's `block_prune.py` applies the 4 / 2 heuristic to
  both criteria unless `--no_plus_heuristic`; PPL ranks those blocks last anyway).
Calibration: the reference draws 10 samples of 128 tokens from BookCorpus; here the first `n_samples`
calibration windows cut to `sample_len` tokens (defaults 10 and 128), from the sweep's calibration set.
The candidates' perplexities are computed from the cached input of each block (the blocks before it
are unchanged by its removal). The paper's LoRA / continued-pretraining retraining is not part of the
method (the sweep's separate LoRA recovery is the suite's retraining step).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from mpt_utils.calibration import capture_block_inputs, decoder_layers
from mpt_utils.errors import MPTError
from mpt_utils.eval.perplexity import nll_from_logits
from mpt_utils.progress import progress_bar
from mpt_utils.prune.structured import STRUCTURED, cached, model_device
from mpt_utils.prune.structured.sleb import _head, _run
from mpt_utils.prune.structured.surgery import drop_blocks

CRITERIA = {"ppl": (0, 0), "taylor": (4, 2)}  # criterion -> the paper's (keep_first, keep_last)


@torch.no_grad()
def ppl_scores(model: nn.Module, samples: torch.Tensor, device: str | torch.device | None = None,
               progress: bool = True) -> torch.Tensor:
    """Calibration perplexity with each single block removed, [L] (float64)."""
    layers = decoder_layers(model)
    dev = model_device(model, device)
    model.to(dev)
    was_training = model.training
    model.eval()
    head = _head(model)
    try:
        xs, kwargs = capture_block_inputs(model, samples, dev)
        n_tokens = samples.shape[0] * (samples.shape[1] - 1)
        scores = torch.empty(len(layers), dtype=torch.float64)
        for j in progress_bar(range(len(layers)), desc="Shortened LLaMA PPL", disable=not progress, leave=False):
            rest = list(range(j + 1, len(layers)))
            nll = sum(float(nll_from_logits(head(_run(layers, rest, x, kwargs)), w.unsqueeze(0)).sum())
                      for x, w in zip(xs, samples))
            scores[j] = math.exp(min(nll / n_tokens, 700.0))  # a collapsed model ranks last, no overflow
            xs = [_run(layers, [j], x, kwargs) for x in xs]  # the input of block j + 1 in the dense model
    finally:
        model.train(was_training)
    return scores


def taylor_scores(model: nn.Module, samples: torch.Tensor, batch_size: int = 10,
                  device: str | torch.device | None = None, progress: bool = True) -> torch.Tensor:
    """Σ |W ⊙ ∂L/∂W| over each block's weights (matrices and norm scales), [L] (float64)."""
    layers = decoder_layers(model)
    dev = model_device(model, device)
    model.to(dev)
    params = [[p for name, p in block.named_parameters() if "weight" in name] for block in layers]
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in (p for block in params for p in block):
        p.requires_grad_(True)
    salience = [[torch.zeros_like(p, dtype=torch.float32) for p in block] for block in params]
    try:
        for batch in progress_bar(samples.split(batch_size), desc="Shortened LLaMA Taylor", disable=not progress,
                          leave=False):
            batch = batch.to(dev)
            with torch.enable_grad():
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                loss.backward()
            for block, acc in zip(params, salience):
                for p, s in zip(block, acc):
                    s += (p.detach() * p.grad).float()  # signed, summed over batches as the reference does
                    p.grad = None
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(was_training)
    return torch.tensor([sum(float(s.abs().sum()) for s in acc) for acc in salience], dtype=torch.float64)


def _check(criterion: str, keep_first: int, keep_last: int, n_layers: int) -> None:
    if criterion not in CRITERIA:
        raise MPTError(f"unknown Shortened LLaMA criterion {criterion!r}",
                       "use criterion='ppl' (the paper's recommendation) or 'taylor' (Taylor+)")
    for name, k in (("keep_first", keep_first), ("keep_last", keep_last)):
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise MPTError(f"{name}={k!r} is invalid", f"use a number of blocks >= 0 (or None for the "
                           f"paper's default: {CRITERIA[criterion]} for {criterion})")
    if keep_first + keep_last > n_layers:
        raise MPTError(f"keep_first={keep_first} and keep_last={keep_last} exceed the {n_layers} blocks",
                       "lower them (0 lifts the protection)")


@STRUCTURED.register("shortened_llama", version=1, display="Shortened LLaMA", calibration=True,
                     sources=("mpt_utils.prune.structured.sleb",))
def shortened_llama(model: nn.Module, ratio: float, calib_ids: torch.Tensor, *, cache: dict | None = None,
                    seed: int = 0, criterion: str = "ppl", n_samples: int = 10, sample_len: int = 128,
                    batch_size: int = 10, keep_first: int | None = None, keep_last: int | None = None,
                    device: str | torch.device | None = None, progress: bool = True) -> dict:
    """Remove the round(ratio * n_blocks) blocks ranked least important by `criterion` ("ppl" or
    "taylor"), never one of the first `keep_first` or last `keep_last` blocks (None: the paper's 0 / 0
    for PPL, 4 / 2 for Taylor+). When the protected ends leave fewer candidates than requested (tiny
    models), every candidate goes and a warning says so."""
    n_layers = len(decoder_layers(model))
    first, last = CRITERIA.get(criterion, (0, 0))
    first = first if keep_first is None else keep_first
    last = last if keep_last is None else keep_last
    _check(criterion, first, last, n_layers)
    samples = calib_ids[:n_samples, :sample_len]
    compute = {"ppl": lambda: ppl_scores(model, samples, device, progress),
               "taylor": lambda: taylor_scores(model, samples, batch_size, device, progress)}[criterion]
    scores = cached(cache, f"shortened_llama:{criterion}:{batch_size}", samples, compute)
    candidates = [j for j in torch.argsort(scores, stable=True).tolist() if first <= j < n_layers - last]
    requested = min(int(round(ratio * n_layers)), n_layers - 1)
    if requested > len(candidates):
        warnings.warn(f"Shortened LLaMA: {requested} of {n_layers} blocks requested but the first {first} and "
                      f"last {last} are protected; removing {len(candidates)}", stacklevel=2)
    remove = sorted(candidates[:requested])
    drop_blocks(model, remove)
    return {"removed_blocks": remove, "criterion": criterion, "keep": [first, last], "order": candidates,
            "scores": [round(float(s), 6) for s in scores], "requested_blocks": requested,
            "n_samples": int(samples.shape[0]), "sample_len": int(samples.shape[1])}
