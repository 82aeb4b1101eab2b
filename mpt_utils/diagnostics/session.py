"""One model, one prompt suite, many compression settings: the notebook's driver, through the store.

Everything expensive is lazy and loaded once: the dense model, the encoded prompts, the dense
trace, the calibration windows and their statistics. Each setting's diagnosis (and its perplexity on
a few evaluation windows) is one results-store point, so a rerun reads every finished setting back
without loading the model at all, and an interrupted run resumes at the first missing setting.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd
from torch import nn

from mpt_utils.catalogue import method_info
from mpt_utils.diagnostics.compress import Setting, compressed_copy
from mpt_utils.diagnostics.pipeline import DIAGNOSTICS_VERSION, Diagnosis, diagnose, frame_rows, rows_frame
from mpt_utils.diagnostics.prompts import factual_suite
from mpt_utils.diagnostics.sensitivity import layer_sensitivity, rtn_block
from mpt_utils.errors import MPTError
from mpt_utils.session import Session

FAMILY = "diagnostics"


class DiagnosticSession:
    """Lazy state for diagnosing compressed copies of `model` on a factual-recall suite.

    `probe_size`: how many prompts the dense model answers correctly go into the patching and
    injection sweeps (the re-run cost scales with it). `calib_windows` × `calib_seqlen` tokens of
    `calib_data` calibrate pruning and low rank; `ppl_windows` windows of `calib_seqlen` tokens of
    `eval_data` give each setting a perplexity next to its diagnosis."""

    def __init__(self, model: str, store, *, relations: Sequence[str] = ("capital-common-countries",),
                 n_facts: int | None = 16, seed: int = 0, device: str | None = "cpu", probe_size: int = 12,
                 calib_data: str = "embedded-wiki", calib_windows: int = 4, calib_seqlen: int = 256,
                 eval_data: str = "embedded-wiki", ppl_windows: int = 2, k: int = 16,
                 keep_sets: Mapping[str, Sequence[int]] | None = None, loaded=None, session: Session | None = None):
        if probe_size < 1:
            raise MPTError(f"probe_size={probe_size} must be at least 1", "use e.g. probe_size=16")
        self.model_name, self.store, self.device, self.seed = model, store, device, seed
        self.relations, self.n_facts, self.probe_size, self.k = list(relations), n_facts, probe_size, k
        self.calib_data, self.calib_windows, self.calib_seqlen = calib_data, calib_windows, calib_seqlen
        self.eval_data, self.ppl_windows = eval_data, ppl_windows
        self.keep_sets = {str(name): [int(b) for b in blocks] for name, blocks in (keep_sets or {}).items()}
        self.prompts = factual_suite(self.relations, n_facts, seed)
        self.session = session or Session(model, store, device=device, loaded=loaded)
        self._batch, self._trace = None, None

    # -- lazy pieces --------------------------------------------------------------------------------
    @property
    def loaded(self):
        return self.session.loaded

    @property
    def dense(self) -> nn.Module:
        return self.loaded.model

    @property
    def batch(self):
        if self._batch is None:
            from mpt_utils.diagnostics.prompts import encode_prompts

            self._batch = encode_prompts(self.loaded.tokenizer, self.prompts).to(self.device or "cpu")
        return self._batch

    @property
    def dense_trace(self):
        if self._trace is None:
            from mpt_utils.diagnostics.runner import trace

            self._trace = trace(self.dense, self.batch)
        return self._trace

    @property
    def probe(self) -> list[int]:
        """The first `probe_size` prompts the dense model answers (all prompts if it answers none)."""
        right = (self.dense_trace.logits.argmax(-1) == self.batch.answer_ids).nonzero().flatten().tolist()
        return (right or list(range(len(self.batch))))[: self.probe_size]

    @property
    def calib(self):
        return self.session.calib_ids(self.calib_data, self.calib_windows, self.calib_seqlen, self.seed)

    @property
    def stats(self):
        return self.session.dense_stats(self.calib_data, self.calib_windows, self.calib_seqlen, self.seed)

    # -- points -------------------------------------------------------------------------------------
    def base_config(self) -> dict[str, Any]:
        return {"model": self.model_name, "diagnostic": "failure_modes", "diagnostics_version": DIAGNOSTICS_VERSION,
                "relations": self.relations, "n_facts": self.n_facts, "seed": self.seed,
                "probe_size": self.probe_size, "k": self.k, "device": self.device}

    def _ppl(self, model: nn.Module) -> dict[str, Any]:
        from mpt_utils.data import eval_ids
        from mpt_utils.eval.perplexity import perplexity

        res = perplexity(model, eval_ids(self.loaded.tokenizer, self.eval_data), seqlen=self.calib_seqlen,
                         device=self.device, max_windows=self.ppl_windows, progress=False)
        return {"ppl": res.ppl, "n_tokens": res.n_tokens}

    def point(self, setting: Setting, *, inject: bool = True, patch: bool = True) -> Diagnosis:
        """The stored diagnosis of `setting`, computed now if missing (the copy is freed afterwards)."""
        config = {**self.base_config(), **setting.config(), "calib_data": self.calib_data,
                  "n_calib": self.calib_windows, "seqlen": self.calib_seqlen, "eval_data": self.eval_data,
                  "ppl_windows": self.ppl_windows, "inject": inject, "patch": patch, "keep_sets": self.keep_sets}
        # pruning and low rank always get both (a calibration-free method ignores them)
        needs_calib = setting.family != "quantization" or method_info(setting.method).calibration
        return self._point(config, lambda: compressed_copy(
            self.dense, setting, calib_ids=self.calib if needs_calib else None,
            stats=self.stats if setting.family != "quantization" else None, device=self.device),
            inject=inject, patch=patch)

    def custom_point(self, name: str, make: Callable[[nn.Module], nn.Module], options: Mapping[str, Any],
                     *, inject: bool = False, patch: bool = True) -> Diagnosis:
        """A diagnosis of `make(dense)` (e.g. a synthetic control); `options` must pin down what it does."""
        config = {**self.base_config(), "family": FAMILY, "method": name, "options": dict(options),
                  "eval_data": self.eval_data, "seqlen": self.calib_seqlen, "ppl_windows": self.ppl_windows,
                  "inject": inject, "patch": patch, "keep_sets": self.keep_sets}
        return self._point(config, lambda: make(self.dense), inject=inject, patch=patch)

    def _point(self, config: dict[str, Any], make: Callable[[], nn.Module], *, inject: bool,
               patch: bool) -> Diagnosis:
        def compute() -> list[dict[str, Any]]:
            comp = make()
            try:
                diag = diagnose(self.dense, comp, self.batch, probe=self.probe, dense_trace=self.dense_trace,
                                k=self.k, patch=patch, inject=inject, keep_sets=self.keep_sets or None)
                quality = pd.DataFrame([self._ppl(comp)])
            finally:
                del comp
                gc.collect()
            return diag.rows() + frame_rows(quality, "quality")

        return Diagnosis.from_rows(self.store.get_or_compute(config, compute))

    def dense_quality(self) -> float:
        """Perplexity of the dense model on the same evaluation windows as every setting."""
        config = {**self.base_config(), "family": FAMILY, "method": "dense", "eval_data": self.eval_data,
                  "seqlen": self.calib_seqlen, "ppl_windows": self.ppl_windows}
        rows = self.store.get_or_compute(config, lambda: frame_rows(pd.DataFrame([self._ppl(self.dense)]), "quality"))
        return float(rows_frame(rows, "quality")["ppl"].iloc[0])

    def sensitivity(self, bits: int = 2, group_size: int | None = 128) -> pd.DataFrame:
        """Layer sensitivity (one block at a time RTN-quantized) on the probe prompts, through the store."""
        config = {**self.base_config(), "family": FAMILY, "method": "rtn", "analysis": "layer_sensitivity",
                  "bits": bits, "group_size": group_size}

        def compute() -> list[dict[str, Any]]:
            probe = self.probe
            table = layer_sensitivity(self.dense, self.batch.subset(probe), rtn_block(bits, group_size),
                                      dense_trace=self.dense_trace.subset(self.batch, probe))
            return frame_rows(table, "sensitivity")

        return rows_frame(self.store.get_or_compute(config, compute), "sensitivity")


SUMMARY_COLUMNS = ("label", "answer_kl", "acc_dense", "acc_compressed", "n_failure", "n_robust",
                   "damage_jump_share", "min_subspace_sim", "max_entropy_shift", "max_gate_flip", "probe_prob_gap",
                   "topk_recovery", "collapse_votes", "reason")


def summary(points: Mapping[str, tuple[Setting, Diagnosis]], dense_ppl: float | None = None) -> pd.DataFrame:
    """One row per diagnosed setting: what it is, its label, the key evidence and its perplexity."""
    rows = []
    for name, (setting, diag) in points.items():
        q = diag["quality"]
        ppl = float(q["ppl"].iloc[0]) if len(q) else float("nan")
        rows.append({"setting": name, "family": setting.family, "method": setting.method, "bits": setting.bits,
                     "ratio": setting.ratio, "ppl": ppl,
                     **({"ppl_vs_dense": ppl / dense_ppl} if dense_ppl else {}),
                     **{k: diag.evidence.get(k) for k in SUMMARY_COLUMNS}})
    return pd.DataFrame(rows)
