"""One combined-compression point per (recipe, evaluation protocol), through the results store.

A point applies a recipe to a fresh copy of the dense model: its torch steps through `apply_recipe`
(each calibrated step on the protocol's calibration windows, through the model as compressed so
far), then, when the recipe ends in a GGUF step, exports the result (`export_recipe_gguf`), quantizes
the file with llama.cpp in a child process and scores the file with llama.cpp, again in a child. The
torch model or the file is scored by `PairedEvaluator` (perplexity ± SE and the KL to the dense model
on the same windows), and the three sizes of `mpt_utils.combined.sizes` are stored beside the scores.

The key is `Recipe.key()` (canonical text and each method's algorithm version) plus the protocol
(`GridSetup.config()`: model spec, corpora, seqlen, windows, calibration count and seed, the size
accounting, and for GGUF recipes the export dtype and KV-cache type), so a rerun reads the point back
without loading the model, and bumping one method's version recomputes exactly the recipes using it.
The dense model comes from an injected loader (tests pass a tiny model), loaded only when a point is
missing from the store.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mpt_utils.calibration import peak_device_memory, reset_peak_device_memory, streaming
from mpt_utils.combined.export import export_recipe_gguf
from mpt_utils.combined.sizes import Sizes, gguf_bits, model_sizes
from mpt_utils.errors import MPTError
from mpt_utils.eval.divergence import DEFAULT_K as DIVERGENCE_K
from mpt_utils.quant.sweep import Setup, Workbench
from mpt_utils.recipe import Bits, Recipe, apply_recipe, needs_calibration
from mpt_utils.session import Session
from mpt_utils.store import ResultsStore

FAMILY = "combined"
METHOD = "recipe"  # the store's `method` column; the recipe text is in `recipe` (and its methods in the key)


@dataclass(frozen=True)
class GridSetup(Setup):
    """The evaluation protocol every grid point shares (part of each point's key): `model` spec,
    `eval_data` and `calib_data` corpora, `n_calib` calibration windows of `seqlen` tokens drawn with
    `seed`, at most `max_windows` evaluation windows of `seqlen`, the accounting's `dense_dtype_bytes`,
    and for GGUF recipes the `export_dtype` of the file llama.cpp quantizes and its `kv_type`.
    `device`, `stream` (block streaming from CPU) and llama.cpp's thread count do not change the
    numbers and are not part of the key. `calib_seqlen`: the calibration windows' length when it
    differs from the evaluation `seqlen` (None: `seqlen`), e.g. notebook 02 calibrates on 256-token
    windows and scores 512-token ones; it enters the key only when set, so other keys stay as they were.
    A `quant.sweep.Setup` with more fields, so `Workbench` loads and calibrates for it."""

    export_dtype: str = "f16"
    kv_type: str = "f16"
    dense_dtype_bytes: float = 2
    # the model rests on CPU and the calibration engine moves one block at a time to `device`
    # (`mpt_utils.calibration.streaming`); the same numbers, so not part of the key
    stream: bool = False
    calib_seqlen: int | None = None

    def __post_init__(self) -> None:
        if self.export_dtype not in ("f16", "f32"):
            raise MPTError(f"export_dtype={self.export_dtype!r} is not a GGUF export type", "use 'f16' or 'f32'")
        if self.kv_type not in ("f16", "f32"):
            raise MPTError(f"kv_type={self.kv_type!r} is not a llama.cpp KV-cache type", "use 'f16' or 'f32'")

    def config(self, gguf: bool = False) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "model": self.model, "family": FAMILY, "data": self.eval_data, "calib_data": self.calib_data,
            "seqlen": self.seqlen, "n_calib": self.n_calib, "max_windows": self.max_windows, "seed": self.seed,
            "divergence_k": DIVERGENCE_K, "dense_dtype_bytes": self.dense_dtype_bytes}
        if gguf:
            cfg.update(export=self.export_dtype, kv_type=self.kv_type)
        if self.calib_seqlen is not None and self.calib_seqlen != self.seqlen:  # None and seqlen: the same windows
            cfg["calib_seqlen"] = self.calib_seqlen
        return cfg

    @property
    def calib_len(self) -> int:
        """The calibration windows' length in tokens."""
        return int(self.calib_seqlen or self.seqlen)


class GridBench(Workbench):
    """The lazily loaded dense model, its calibration windows and paired evaluator (`Workbench`), plus
    what GGUF points share: a work folder for files, llama.cpp's threads, the dense sizes.

    `loader()` returns an object with `.model` and `.tokenizer` (a `LoadedModel`); default: the
    model spec through `mpt_utils.models.load_model`. `work_dir`: where GGUF files are written (a
    temporary folder per point when None).

    Reuse inside a grid, which changes no number: the first step's ratio-independent work (an ASVD
    sensitivity table, a structured method's scores) is kept in `step_cache`, and the torch models of
    the last `keep_prefixes` recipe prefixes are kept in memory, so `wanda@0.5 > gguf:Q4_K_M` after
    `wanda@0.5 > gguf:Q8_0`, or `sparsegpt@0.5 > gptq:3bit` after `sparsegpt@0.5 > gptq:4bit`, starts
    from the pruned model instead of pruning again (every step is deterministic given its input model
    and the calibration windows, so the result is the same as applying the recipe from scratch; a
    test checks it). Each kept prefix is one more copy of the model in memory: pass 0 for models
    that fill the machine."""

    def __init__(self, setup: GridSetup, loader: Callable[[], Any] | None = None, *,
                 work_dir: str | Path | None = None, n_threads: int | None = None, keep_prefixes: int = 2,
                 session: Session | None = None):
        if loader is None and setup.stream:  # streaming: the dense model rests on CPU
            from mpt_utils.models import load_model

            def loader() -> Any:
                return load_model(setup.model, device="cpu")
        super().__init__(setup, loader, session=session)
        self.setup: GridSetup = setup
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.n_threads = n_threads
        self.keep_prefixes = int(keep_prefixes)
        self.step_cache: dict[str, Any] = {}
        self._prefixes: OrderedDict[str, tuple[torch.nn.Module, list[dict[str, Any]]]] = OrderedDict()
        self._dense_sizes: Sizes | None = None
        self._dense_gguf: Sizes | None = None

    def share_kept(self, kept: OrderedDict[str, tuple[torch.nn.Module, list[dict[str, Any]]]]) -> None:
        """Keep the compressed models in `kept`, shared with the benches of protocols that calibrate
        alike and differ only in what they score (`Session.bench`): a point scored on a second corpus
        starts from the model the first one compressed."""
        self._prefixes = kept

    def compressed_model(self, torch_part: Recipe, progress: bool = False
                         ) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
        """A fresh model with `torch_part` applied and one report per step, starting from the longest
        kept prefix (class docstring); the reports of reused steps are those measured when they ran.
        Every prefix applied here is kept (least recently used dropped first)."""
        steps = list(torch_part)
        start, model, reports = 0, None, []
        for n in range(len(steps), 0, -1):
            kept = self._prefixes.get(str(Recipe(tuple(steps[:n]))))
            if kept is not None:
                self._prefixes.move_to_end(str(Recipe(tuple(steps[:n]))))
                start, model, reports = n, copy.deepcopy(kept[0]), [dict(r) for r in kept[1]]
                break
        if model is None:
            model = self.fresh_model()
        calib = self.calib_ids() if any(needs_calibration(step) for step in steps[start:]) else None
        with streaming(self.setup.stream):
            for i in range(start, len(steps)):
                reports += apply_recipe(model, Recipe((steps[i],)), calib, device=self.setup.device,
                                        progress=progress, cache=self.step_cache if i == 0 else None)
                if self.keep_prefixes > 0:
                    self._keep(str(Recipe(tuple(steps[:i + 1]))), model, reports)
        return model, reports

    @contextlib.contextmanager
    def scoring(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """`model` on the protocol's device while it is scored; a streamed model (resting on CPU)
        goes back to CPU afterwards. Scoring runs the whole model, so it must fit the device."""
        if not self.setup.stream or self.setup.device is None:
            yield model
            return
        home = next(model.parameters()).device
        model.to(self.setup.device)
        try:
            yield model
        finally:
            model.to(home)

    def forget(self, method: str, options: dict[str, Any] | None = None) -> None:
        """Drop what recipes starting with `method` (with exactly these `options` when given) keep here:
        its ratio-independent work in `step_cache` (a low-rank plan holds a model's worth of factors)
        and the kept prefixes, so a sweep of several methods holds one method's state at a time."""
        def mine(step_method: str, step_options: Any) -> bool:
            return step_method == method and (options is None or dict(step_options) == dict(options))

        for key in [k for k in self.step_cache if isinstance(k, tuple) and len(k) > 3 and mine(k[2], k[3])]:
            del self.step_cache[key]
        for text in [t for t in self._prefixes if mine(*_first_step(t))]:
            del self._prefixes[text]

    def _keep(self, text: str, model: torch.nn.Module, reports: list[dict[str, Any]]) -> None:
        self._prefixes[text] = (copy.deepcopy(model), [dict(r) for r in reports])
        self._prefixes.move_to_end(text)
        while len(self._prefixes) > self.keep_prefixes:
            self._prefixes.popitem(last=False)

    @property
    def tokenizer_gguf(self) -> str | None:
        """The GGUF the dense model was loaded from, if any: its tokenizer keys are copied into every
        export (as the GGUF ladder does), not converted again from the transformers tokenizer."""
        path = getattr(getattr(self.loaded, "info", None), "path", None)
        return str(path) if path and str(path).endswith(".gguf") else None

    @property
    def llamacpp(self) -> dict[str, Any]:
        """How llama.cpp evaluates a file (`PairedEvaluator.rows(..., llamacpp=...)`)."""
        gpu = str(self.setup.device or "").startswith("cuda")
        return {"n_threads": self.n_threads, "kv_type": self.setup.kv_type, "n_gpu_layers": -1 if gpu else 0}

    def dense_sizes(self) -> Sizes:
        """The dense model's sizes, torch artifact (the reference of every compression ratio)."""
        if self._dense_sizes is None:
            self._dense_sizes = model_sizes(self.loaded.model, dense_dtype_bytes=self.setup.dense_dtype_bytes)
        return self._dense_sizes

    def dense_gguf_sizes(self, folder: Path) -> Sizes:
        """The dense model exported as an F16 GGUF (the reference of a GGUF point's artifact ratio:
        same format, same metadata and tokenizer); written once into `folder`, measured, deleted."""
        if self._dense_gguf is None:
            path = export_recipe_gguf(self.loaded.model, self.loaded.tokenizer, folder / "dense-F16.gguf",
                                      dtype="f16", tokenizer_gguf=self.tokenizer_gguf, name=self.setup.model)
            try:
                self._dense_gguf = model_sizes(self.loaded.model, gguf_path=path, gguf_scheme="F16",
                                               dense_dtype_bytes=self.setup.dense_dtype_bytes)
            finally:
                path.unlink(missing_ok=True)
        return self._dense_gguf


def _first_step(text: str) -> tuple[str, Any]:
    step = Recipe.parse(text)[0]
    return step.method, step.options


def point_config(setup: GridSetup, recipe: Recipe | str) -> dict[str, Any]:
    """The store key of `recipe` under `setup`'s protocol."""
    recipe = Recipe.parse(recipe)
    return {**setup.config(gguf=recipe.gguf_scheme is not None), **recipe.key(), "method": METHOD}


def _bits(recipe: Recipe) -> float | None:
    """The recipe's nominal weight bits (its quantization step), for the store's `bits` column."""
    for step in recipe:
        if step.family == "gguf":
            return gguf_bits(str(step.setting))
        if isinstance(step.setting, Bits):
            return float(step.setting.bits)
    return None


def _step_rows(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"metric": "step_seconds", "value": float(r["seconds"]), "step": r["step"],
             "report": json.dumps({k: v for k, v in r.items() if k != "seconds"}, default=str, sort_keys=True)}
            for r in reports]


def step_reports(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The step reports a point's `step_seconds` rows carry (`_step_rows`), decoded, in step order,
    each with its `step` text and wall `seconds`."""
    return [{**json.loads(r["report"]), "step": r["step"], "seconds": float(r["value"])}
            for r in rows if r.get("metric") == "step_seconds" and isinstance(r.get("report"), str)]


def _gguf_file(bench: GridBench, model: torch.nn.Module, recipe: Recipe, folder: Path,
               progress: bool) -> tuple[Path, list[dict[str, Any]]]:
    """Export the torch result, quantize it to the recipe's scheme with llama.cpp (in a child
    process), and return the file and the rows describing it."""
    from mpt_utils.combined.export import dense_copy
    from mpt_utils.quant.gguf.fileinfo import read_gguf
    from mpt_utils.quant.gguf.quantize import NEEDS_IMATRIX, quantize_gguf

    scheme = recipe.gguf_scheme
    assert scheme is not None
    s = bench.setup
    tag = hashlib.sha256(str(recipe).encode()).hexdigest()[:12]
    src = export_recipe_gguf(model, bench.loaded.tokenizer, folder / f"{tag}-{s.export_dtype.upper()}.gguf",
                             dtype=s.export_dtype, tokenizer_gguf=bench.tokenizer_gguf, name=s.model)
    if scheme == s.export_dtype.upper():
        path, seconds, fallbacks = src, 0.0, []
    else:
        path = folder / f"{tag}-{scheme}.gguf"
        try:
            imatrix = None
            if scheme in NEEDS_IMATRIX:  # the compressed model's own activations, on the dense layout
                from mpt_utils.quant.gguf.imatrix import imatrix_from_model

                imatrix = imatrix_from_model(dense_copy(model), bench.calib_ids(), device=s.device,
                                             progress=progress)
            report = quantize_gguf(src, path, scheme, n_threads=bench.n_threads, imatrix=imatrix)
        finally:
            src.unlink(missing_ok=True)  # the unquantized export is only the quantizer's input
        seconds, fallbacks = report.seconds, report.fallbacks
    info = read_gguf(path)
    extra = {"types": info.summary(), "type_params": json.dumps(info.type_params)}
    return path, [{"metric": "bits_per_weight", "value": info.bits_per_weight, **extra},
                  {"metric": "matrix_bits_per_weight", "value": info.matrix_bits_per_weight, **extra},
                  {"metric": "quant_seconds", "value": seconds, **extra},
                  {"metric": "n_fallback", "value": len(fallbacks), "fallbacks": json.dumps(fallbacks), **extra}]


def compute_point(bench: GridBench, recipe: Recipe | str, *, store_root: str | Path | None = None,
                  keep_files: bool = False, progress: bool = False) -> list[dict[str, Any]]:
    """The rows of `recipe` on `bench`'s protocol, computed now and not stored (`grid_point` stores
    them; a distributed worker returns them to the driver, which stores them). `store_root`: where
    the paired evaluator caches the dense reference (a reference already handed to the evaluator,
    `PairedEvaluator.use_references`, is used as it is). Rows: see `grid_point`."""
    recipe = Recipe.parse(recipe)
    if keep_files and bench.work_dir is None:
        raise MPTError("keep_files=True needs a folder to keep the GGUF in", "pass GridBench(..., work_dir=...)")
    s = bench.setup
    reset_peak_device_memory(s.device)
    paired = bench.paired(store_root)
    if s.eval_data not in paired.references():  # the dense reference, while dense (once per bench)
        with bench.scoring(bench.loaded.model) as dense_model:
            paired.prepare(dense_model, [s.eval_data], progress)
    model, reports = bench.compressed_model(recipe.torch_part, progress)
    dense = bench.dense_sizes()
    file_rows: list[dict[str, Any]] = []
    if recipe.gguf_scheme is None:
        with bench.scoring(model):
            scored = paired.rows(model, [s.eval_data], progress)
        sizes = model_sizes(model, dense_dtype_bytes=s.dense_dtype_bytes)
    else:
        with tempfile.TemporaryDirectory(prefix="mpt-grid-") as tmp:
            folder = bench.work_dir if bench.work_dir is not None else Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            path, file_rows = _gguf_file(bench, model, recipe, folder, progress)
            try:
                scored = paired.rows(str(path), [s.eval_data], progress, llamacpp=bench.llamacpp)
                sizes = model_sizes(model, gguf_path=path, gguf_scheme=recipe.gguf_scheme,
                                    dense_dtype_bytes=s.dense_dtype_bytes)
                # the artifact ratio compares files with files: the dense model's own F16 GGUF
                dense_file = bench.dense_gguf_sizes(folder)
                dense = replace(dense, artifact_bytes=dense_file.artifact_bytes, artifact="gguf")
            finally:
                if not keep_files:
                    path.unlink(missing_ok=True)
    del model
    size_rows = sizes.rows(dense)
    ratio = next(r["value"] for r in size_rows if r["metric"] == "compression_nominal")
    tag = {"recipe": str(recipe), "ratio": ratio, "bits": _bits(recipe)}
    return [{**r, **tag} for r in (*scored, *size_rows, *file_rows, *_step_rows(reports), _peak_row(bench))]


def _peak_row(bench: GridBench) -> dict[str, Any]:
    """The most device memory the point used (CUDA's counter); None with `peak_memory: "n/a"` on a
    device without one (CPU)."""
    peak = peak_device_memory(bench.setup.device)
    return {"metric": "peak_device_bytes", "value": float(peak) if peak is not None else None,
            "peak_memory": "cuda.max_memory_allocated" if peak is not None else "n/a",
            "stream": bool(bench.setup.stream)}


def grid_point(store: ResultsStore, bench: GridBench, recipe: Recipe | str, *, keep_files: bool = False,
               progress: bool = False) -> list[dict[str, Any]]:
    """The stored rows of `recipe` on `bench`'s protocol, computing them once (module docstring).

    Rows: the perplexity row and the KL rows of `PairedEvaluator`, the three sizes with their
    compression against the dense model (`Sizes.rows`), one `step_seconds` row per torch step (its
    report as JSON), for a GGUF recipe what the file holds (bits per weight, tensor types,
    llama.cpp's fallbacks), and `peak_device_bytes` (None off CUDA). Every row carries `recipe`,
    `ratio` (the nominal compression, the paper's axis) and `bits` (the quantization step's nominal
    bits, None without one). `keep_files` keeps the GGUF under `bench.work_dir` (then required;
    files are written there in any case when it is set, else in a temporary folder, and deleted
    unless kept)."""
    recipe = Recipe.parse(recipe)
    if keep_files and bench.work_dir is None:
        raise MPTError("keep_files=True needs a folder to keep the GGUF in", "pass GridBench(..., work_dir=...)")
    return store.get_or_compute(point_config(bench.setup, recipe),
                                lambda: compute_point(bench, recipe, store_root=store.root, keep_files=keep_files,
                                                      progress=progress))


def measured_point(store: ResultsStore, bench: GridBench, recipe: Recipe | str, kind: str,
                   settings: Mapping[str, Any], measure: Callable[[torch.nn.Module, GridBench], list[dict[str, Any]]],
                   ) -> list[dict[str, Any]]:
    """The stored rows of another measurement of the model `recipe` makes (its speed against the dense
    model, downstream tasks, a recovery run and its scores): `measure(model, bench)` on that model,
    computed once and stored under the recipe point's key plus `kind` and `settings` (everything the
    measurement itself depends on). The model comes from `bench.compressed_model`, so a measurement
    right after its recipe's point reuses the kept model instead of compressing again; `measure` may
    change it (it is the caller's copy). Every row carries `recipe` and `kind`."""
    recipe = Recipe.parse(recipe)
    if recipe.gguf_scheme is not None:
        raise MPTError(f"cannot measure {kind} on {recipe}: it ends in a GGUF file, not a torch model",
                       f"measure {recipe.torch_part}, or score the file with grid_point")
    if "kind" in settings:
        raise MPTError("a measurement's settings cannot name 'kind'", "pass the kind as its own argument")

    def compute() -> list[dict[str, Any]]:
        model, _ = bench.compressed_model(recipe.torch_part)
        return [{**row, "recipe": str(recipe), "kind": kind} for row in measure(model, bench)]

    return store.get_or_compute({**point_config(bench.setup, recipe), "kind": kind, **settings}, compute)


def grid(store: ResultsStore, bench: GridBench, recipes: list[Recipe | str], *, keep_files: bool = False,
         progress: bool = False, executor: str = "local", max_retries: int = 3) -> list[dict[str, Any]]:
    """Every recipe's point, in order (each resumable on its own). `executor="ray"` computes the
    missing points as Ray tasks (`mpt_utils.distributed.run_points`, `max_retries` per task)."""
    from mpt_utils.distributed import run_points

    points = run_points(store, bench, recipes, executor=executor, keep_files=keep_files, progress=progress,
                        max_retries=max_retries)
    return [row for rows in points for row in rows]


def metric(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The one row of metric `name` among a point's rows."""
    found = [r for r in rows if r.get("metric") == name]
    if len(found) != 1:
        raise MPTError(f"{len(found)} rows of metric {name!r} among {len(rows)}", "pass one point's rows")
    return found[0]


__all__ = ["FAMILY", "GridBench", "GridSetup", "compute_point", "grid", "grid_point", "measured_point", "metric",
           "point_config"]
