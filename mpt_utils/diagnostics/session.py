"""One model, one prompt suite, many compression recipes: the notebook's driver, through the store.

Everything expensive is lazy and built once, in the wrapped `mpt_utils.session.Session`: the dense
model, the encoded prompts and the dense trace (`Session.cached`), the calibration windows. A
diagnosis point is a recipe (`mpt_utils.recipe`, e.g. `rtn:2bit`, `wanda@0.5`): the one engine
compresses a copy of the dense model (`apply_recipe`, each calibrated step on the protocol's
calibration windows through the model as compressed so far) and the diagnosis, with the model's
perplexity on a few evaluation windows, is a `Session.measure`-style point stored under the recipe's
key (`Recipe.key()`, the protocol `diagnosis_protocol`, and the diagnostic's own settings). A rerun
reads every finished point back without loading the model, and an interrupted run resumes at the
first missing one. `custom_point` diagnoses a model no recipe makes (a synthetic control).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
from torch import nn

from mpt_utils.diagnostics.pipeline import DIAGNOSTICS_VERSION, Diagnosis, diagnose, frame_rows, rows_frame
from mpt_utils.diagnostics.prompts import factual_suite
from mpt_utils.diagnostics.sensitivity import layer_sensitivity, rtn_block
from mpt_utils.errors import MPTError
from mpt_utils.recipe import Bits, Recipe, Step
from mpt_utils.session import Session

FAMILY = "diagnostics"
KIND = "failure_modes"  # the measurement kind of a recipe's diagnosis in the store


class DiagnosticSession:
    """Lazy state for diagnosing compressed copies of `model` on a factual-recall suite.

    `probe_size`: how many prompts the dense model answers correctly go into the patching and
    injection sweeps (the re-run cost scales with it). `calib_windows` × `calib_seqlen` tokens of
    `calib_data` (drawn with `seed`) calibrate every calibrated recipe step; `ppl_windows` windows of
    `calib_seqlen` tokens of `eval_data` give each point a perplexity next to its diagnosis."""

    def __init__(self, model: str, store, *, relations: Sequence[str] = ("capital-common-countries",),
                 n_facts: int | None = 16, seed: int = 0, device: str | None = "cpu", probe_size: int = 12,
                 calib_data: str = "embedded-wiki", calib_windows: int = 4, calib_seqlen: int = 256,
                 eval_data: str = "embedded-wiki", ppl_windows: int | None = 2, k: int = 16,
                 keep_sets: Mapping[str, Sequence[int]] | None = None, loaded=None, session: Session | None = None):
        from mpt_utils.combined.grid import GridSetup

        if probe_size < 1:
            raise MPTError(f"probe_size={probe_size} must be at least 1", "use e.g. probe_size=16")
        self.model_name, self.store, self.device, self.seed = model, store, device, seed
        self.relations, self.n_facts, self.probe_size, self.k = list(relations), n_facts, probe_size, k
        self.calib_data, self.calib_windows, self.calib_seqlen = calib_data, calib_windows, calib_seqlen
        self.eval_data, self.ppl_windows = eval_data, ppl_windows
        self.keep_sets = {str(name): [int(b) for b in blocks] for name, blocks in (keep_sets or {}).items()}
        self.prompts = factual_suite(self.relations, n_facts, seed)
        self.session = session or Session(model, store, device=device, loaded=loaded)
        # the engine's protocol of every recipe point: its calibration windows and evaluation windows
        self.protocol = GridSetup(model=model, eval_data=eval_data, calib_data=calib_data, seqlen=calib_seqlen,
                                  n_calib=calib_windows, max_windows=ppl_windows, seed=seed, device=device)

    # -- lazy pieces (the session's cache) ---------------------------------------------------------
    @property
    def loaded(self):
        return self.session.loaded

    @property
    def dense(self) -> nn.Module:
        return self.loaded.model

    def _suite_key(self) -> tuple:
        return ("diagnostics", tuple(self.relations), self.n_facts, self.seed, self.device)

    @property
    def batch(self):
        from mpt_utils.diagnostics.prompts import encode_prompts

        return self.session.cached((*self._suite_key(), "batch"), lambda: encode_prompts(
            self.loaded.tokenizer, self.prompts).to(self.device or "cpu"))

    @property
    def dense_trace(self):
        from mpt_utils.diagnostics.runner import trace

        return self.session.cached((*self._suite_key(), "dense_trace"), lambda: trace(self.dense, self.batch))

    @property
    def probe(self) -> list[int]:
        """The first `probe_size` prompts the dense model answers (all prompts if it answers none)."""
        right = (self.dense_trace.logits.argmax(-1) == self.batch.answer_ids).nonzero().flatten().tolist()
        return (right or list(range(len(self.batch))))[: self.probe_size]

    # -- points -------------------------------------------------------------------------------------
    def base_config(self) -> dict[str, Any]:
        return {"model": self.model_name, "diagnostic": "failure_modes", "diagnostics_version": DIAGNOSTICS_VERSION,
                "relations": self.relations, "n_facts": self.n_facts, "seed": self.seed,
                "probe_size": self.probe_size, "k": self.k, "device": self.device}

    def _ppl(self, model: nn.Module) -> dict[str, Any]:
        from mpt_utils.eval.perplexity import perplexity

        res = perplexity(model, self.session.eval_ids(self.eval_data), seqlen=self.calib_seqlen,
                         device=self.device, max_windows=self.ppl_windows, progress=False)
        return {"ppl": res.ppl, "n_tokens": res.n_tokens}

    def diagnosis_settings(self, *, inject: bool, patch: bool) -> dict[str, Any]:
        """What a recipe's diagnosis depends on beyond the recipe and the protocol (its store key)."""
        return {"diagnostics_version": DIAGNOSTICS_VERSION, "relations": self.relations, "n_facts": self.n_facts,
                "probe_size": self.probe_size, "k": self.k, "inject": inject, "patch": patch,
                "keep_sets": self.keep_sets}

    def point(self, recipe: Recipe | str, *, inject: bool = True, patch: bool = True) -> Diagnosis:
        """The stored diagnosis of the model `recipe` makes, computed now if missing: the engine
        compresses a copy of the dense model (`combined.grid.measured_point`, on `self.protocol`) and
        the copy is diagnosed against the dense model, then dropped. The recipe is checked first."""
        from mpt_utils.combined.grid import measured_point

        recipe = Recipe.parse(recipe)
        if recipe.gguf_scheme is not None:
            raise MPTError(f"cannot diagnose {recipe}: it ends in a GGUF file, not a torch model",
                           f"diagnose {recipe.torch_part}")
        # every recipe is diagnosed once: keeping compressed prefixes would only hold copies in memory
        bench = self.session.bench(self.protocol, keep_prefixes=0)
        rows = measured_point(self.store, bench, recipe, KIND, self.diagnosis_settings(inject=inject, patch=patch),
                              lambda model, _bench: self._diagnose(model, inject=inject, patch=patch))
        return Diagnosis.from_rows(rows)

    def custom_point(self, name: str, make: Callable[[nn.Module], nn.Module], options: Mapping[str, Any],
                     *, inject: bool = False, patch: bool = True) -> Diagnosis:
        """A diagnosis of `make(dense)` (e.g. a synthetic control); `options` must pin down what it does."""
        config = {**self.base_config(), "family": FAMILY, "method": name, "options": dict(options),
                  "eval_data": self.eval_data, "seqlen": self.calib_seqlen, "ppl_windows": self.ppl_windows,
                  "inject": inject, "patch": patch, "keep_sets": self.keep_sets}
        return self._point(config, lambda: make(self.dense), inject=inject, patch=patch)

    def _point(self, config: dict[str, Any], make: Callable[[], nn.Module], *, inject: bool,
               patch: bool) -> Diagnosis:
        return Diagnosis.from_rows(self.store.get_or_compute(
            config, lambda: self._diagnose(make(), inject=inject, patch=patch)))

    def _diagnose(self, comp: nn.Module, *, inject: bool, patch: bool) -> list[dict[str, Any]]:
        """The diagnosis rows of `comp` against the dense model, with its perplexity."""
        diag = diagnose(self.dense, comp, self.batch, probe=self.probe, dense_trace=self.dense_trace,
                        k=self.k, patch=patch, inject=inject, keep_sets=self.keep_sets or None)
        return diag.rows() + frame_rows(pd.DataFrame([self._ppl(comp)]), "quality")

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


def short_label(recipe: Recipe | str) -> str:
    """A recipe's name in the notebook's tables and legends: "RTN 2-bit" (the method's default group
    size; else "RTN 2-bit g64", "RTN 2-bit per-row"), "wanda 50%", "wanda 2:4"; a recipe of several
    steps or with options is its `Recipe.label`."""
    recipe = Recipe.parse(recipe)
    if len(recipe) != 1 or recipe[0].options:
        return recipe.label
    step = recipe[0]
    if isinstance(step.setting, Bits):
        group = step.setting.group_size
        tail = "" if group is None else " per-row" if group == 0 else f" g{group}"
        return f"{step.method.upper()} {step.setting.bits}-bit{tail}"
    if isinstance(step.setting, tuple):
        return f"{step.method} {step.setting[0]}:{step.setting[1]}"
    if isinstance(step.setting, float):
        return f"{step.method} {step.setting:.0%}"
    return recipe.label


def quant_bits_of(recipe: Recipe | str | None) -> int | None:
    """The bit width of a recipe that is one torch quantization step (None for anything else)."""
    recipe = None if recipe is None else Recipe.parse(recipe)
    if recipe is None or len(recipe) != 1 or not isinstance(recipe[0].setting, Bits):
        return None
    return recipe[0].setting.bits


def diagnosis_recipes(quant_bits: Iterable[int] = (), group_size: int | None = 128,
                      prune_points: Iterable[Sequence[Any]] = (), lowrank_points: Iterable[Sequence[Any]] = (),
                      *, quant_method: str = "rtn") -> dict[str, Recipe]:
    """The notebook's points as recipes, by `short_label`, all checked before any work: `quant_method`
    at each of `quant_bits` with `group_size` (written as `quant.sweep.quant_step` writes it, defaults
    left out), and each (method, ratio) of `prune_points` and `lowrank_points` (`wanda@0.5`, `svd_llm@0.2`)."""
    from mpt_utils.quant.sweep import quant_step

    recipes = [Recipe((quant_step(quant_method, int(b), group_size=group_size),)) for b in quant_bits]
    for kind, points in (("prune_points", prune_points), ("lowrank_points", lowrank_points)):
        for point in points:
            if isinstance(point, str) or len(point) != 2:
                raise MPTError(f"{kind} entry {point!r} is not a (method, ratio) pair", f"write e.g. {kind}=[[\"wanda\", 0.5]]")
            recipes.append(Recipe((Step.of(str(point[0]), point[1]),)))
    out: dict[str, Recipe] = {}
    for recipe in recipes:
        label = short_label(recipe)
        if label in out:
            raise MPTError(f"{recipe} is listed twice", "list each point once")
        out[label] = recipe
    return out


def recipe_columns(recipe: Recipe | None) -> dict[str, Any]:
    """A point's recipe, family, method, bits and ratio for the summary table; None: a model no recipe
    makes (a synthetic control, family "synthetic")."""
    if recipe is None:
        return {"recipe": None, "family": "synthetic", "method": None, "bits": None, "ratio": None}
    if len(recipe) != 1:
        return {"recipe": str(recipe), "family": "combined" if len(recipe) else "dense", "method": None,
                "bits": None, "ratio": None}
    step = recipe[0]
    return {"recipe": str(recipe), "family": step.family, "method": step.method, "bits": quant_bits_of(recipe),
            "ratio": step.setting if isinstance(step.setting, float) else None}


def summary(points: Mapping[str, tuple[Recipe | None, Diagnosis]], dense_ppl: float | None = None) -> pd.DataFrame:
    """One row per diagnosed point: its recipe (None: a synthetic control), the label, the key evidence
    and its perplexity."""
    rows = []
    for name, (recipe, diag) in points.items():
        q = diag["quality"]
        ppl = float(q["ppl"].iloc[0]) if len(q) else float("nan")
        rows.append({"setting": name, **recipe_columns(recipe), "ppl": ppl,
                     **({"ppl_vs_dense": ppl / dense_ppl} if dense_ppl else {}),
                     **{k: diag.evidence.get(k) for k in SUMMARY_COLUMNS}})
    return pd.DataFrame(rows)
