"""One session per model under study: the state every sweep shares, built lazily and at most once.

A `Session` holds what does not depend on a compression point: the dense model (loaded only when
some point is missing from the store), its tokenizer, the tokenized evaluation corpora, calibration
windows and the dense model's layer statistics per calibration protocol, the paired evaluators (PPL
and KL to the dense model) per evaluation protocol, and a copy of the dense block weights for drivers
that compress the loaded model in place and put it back. Every family's driver (pruning sweeps,
quantization and GGUF points, structured and low-rank sweeps, recipe grids, the diagnostics) takes
its model, windows, statistics and evaluator from one `Session`, so a notebook that runs several
drivers loads and calibrates once, and there is one caching mechanism instead of one per family.

`point(recipe)` / `sweep(recipes)` / `dense_point()` score recipes (`mpt_utils.recipe`) on a protocol
(`mpt_utils.combined.grid.GridSetup`) through the results store: each point is stored once under its
canonical recipe, the protocol and every step's algorithm version; `measure(recipe, ...)` stores any
other measurement of a recipe's model (speed, downstream tasks, recovery) the same way.

The session never changes a stored point's key: keys are built by the drivers from their protocol.
"""

from __future__ import annotations

import copy
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mpt_utils.store import ResultsStore


class Session:
    """The lazily built, point-independent state of one model (module docstring).

    `model`: the spec (`load_model`: embedded name, hub id, folder, .gguf). `store`: the results store
    (a path or a `ResultsStore`; its root also caches the dense references of the paired evaluator).
    `loader()`: returns a `LoadedModel`-like object (`.model`, `.tokenizer`); default `load_model`.
    `loaded`: an already loaded model (then nothing is loaded)."""

    def __init__(self, model: str, store: ResultsStore | str | Path | None = None, *, device: str | None = None,
                 loader: Callable[[], Any] | None = None, loaded: Any = None, progress: bool = False):
        self.model_spec = model
        self.store = store if isinstance(store, ResultsStore) or store is None else ResultsStore(store)
        self.device, self.progress = device, progress
        self.loader = loader  # how the model is loaded (None: load_model of the spec)
        self._loaded = loaded
        self._memo: dict[Hashable, Any] = {}
        self._seconds: dict[Hashable, float] = {}
        self._dense_weights: dict[str, torch.Tensor] | None = None

    # -- the dense model ---------------------------------------------------------------------------
    @property
    def loaded(self) -> Any:
        """The loaded dense model (`.model`, `.tokenizer`, `.info`), loaded on first use."""
        if self._loaded is None:
            if self.loader is not None:
                self._loaded = self.loader()
            else:
                from mpt_utils.models import load_model

                self._loaded = load_model(self.model_spec, device=self.device)
        return self._loaded

    @property
    def is_loaded(self) -> bool:
        return self._loaded is not None

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def dense(self) -> torch.nn.Module:
        """The dense model itself (drivers that compress it in place restore it with `restore()`)."""
        return self.loaded.model

    def fresh_model(self) -> torch.nn.Module:
        """A deep copy of the dense model, for a point to compress."""
        return copy.deepcopy(self.loaded.model)

    def cached(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """`build()` once per `key` for this session (a driver's own ratio-independent state:
        an allocation's block scores, a method's plan, an encoded prompt suite)."""
        if key not in self._memo:
            start = time.perf_counter()
            self._memo[key] = build()
            self._seconds[key] = time.perf_counter() - start
        return self._memo[key]

    def built(self, key: Hashable) -> bool:
        """Whether the cached entry `key` exists (e.g. ("stats", data, n, seqlen, seed))."""
        return key in self._memo

    def seconds(self, key: Hashable) -> float:
        """How long building the cached entry `key` took (NaN when it was never built)."""
        return self._seconds.get(key, math.nan)

    def forget(self, *keys: Hashable, where: Callable[[Hashable], bool] | None = None) -> None:
        """Drop the cached entries `keys` and those `where(key)` holds for (free a method's factors
        after its sweep)."""
        for key in [k for k in self._memo if k in keys or (where is not None and where(k))]:
            del self._memo[key]
            self._seconds.pop(key, None)

    # -- data ----------------------------------------------------------------------------------------
    def eval_ids(self, data: str) -> torch.Tensor:
        """The tokenized evaluation corpus `data` (its test split)."""
        from mpt_utils.data import eval_ids

        return self.cached(("eval_ids", data), lambda: eval_ids(self.tokenizer, data))

    def calib_ids(self, data: str, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
        """`n` calibration windows of `seqlen` tokens of `data`, drawn with `seed` (once per protocol)."""
        from mpt_utils.data import calibration_windows

        key = ("calib", data, int(n), int(seqlen), int(seed))
        return self.cached(key, lambda: calibration_windows(self.tokenizer, data, int(n), int(seqlen), int(seed)))

    def dense_stats(self, data: str, n: int, seqlen: int, seed: int = 0) -> Any:
        """Every block linear's input statistics on the dense model (`calibration.collect_stats`) for
        that calibration protocol, gathered once. The model must be dense when this first runs."""
        from mpt_utils.calibration import collect_stats

        def build() -> Any:
            self.restore()
            return collect_stats(self.dense, self.calib_ids(data, n, seqlen, seed), device=self.device,
                                 progress=self.progress)

        return self.cached(("stats", data, int(n), int(seqlen), int(seed)), build)

    def paired(self, seqlen: int, max_windows: int | None, k: int | None = None) -> Any:
        """The evaluator of every point on `seqlen`-token windows (at most `max_windows`): perplexity
        ± SE and the KL to the dense model on the same windows (`eval.paired.PairedEvaluator`), its
        dense references cached under the store's root."""
        from mpt_utils.eval.divergence import DEFAULT_K
        from mpt_utils.eval.paired import PairedEvaluator

        k = DEFAULT_K if k is None else k
        root = self.store.root if self.store is not None else None
        return self.cached(("paired", int(seqlen), max_windows, k), lambda: PairedEvaluator(
            self.model_spec, self.tokenizer, int(seqlen), max_windows, store_root=root, device=self.device, k=k))

    # -- in-place drivers ----------------------------------------------------------------------------
    def _block_weights(self) -> dict[str, torch.Tensor]:
        from mpt_utils.prune.measure import block_linears

        if self._dense_weights is None:  # taken before any in-place compression
            self._dense_weights = {f"{i}.{n}": lin.weight.detach().to("cpu", copy=True)
                                   for i, linears in enumerate(block_linears(self.dense))
                                   for n, lin in linears.items()}
        return self._dense_weights

    def snapshot(self) -> None:
        """Remember the dense block weights (before a driver first compresses the model in place)."""
        self._block_weights()

    @torch.no_grad()
    def restore(self) -> None:
        """Put the dense block weights back (a no-op before any snapshot: the model is still dense)."""
        if self._dense_weights is None or self._loaded is None:
            return
        from mpt_utils.prune.measure import block_linears

        for i, linears in enumerate(block_linears(self.dense)):
            for n, lin in linears.items():
                lin.weight.copy_(self._dense_weights[f"{i}.{n}"])

    # -- recipes ---------------------------------------------------------------------------------------
    def bench(self, protocol: Any, **kwargs: Any) -> Any:
        """The recipe bench of `protocol` (a `GridSetup`) on this session's model (one per protocol)."""
        from mpt_utils.combined.grid import GridBench

        key = ("bench", protocol, tuple(sorted(kwargs.items())))

        def build() -> Any:
            bench = GridBench(protocol, session=self, **kwargs)
            # protocols that differ only in what they score share the first steps' work (a low-rank
            # plan, a structured method's scores): it depends on the dense model and calibration only
            calibration = replace(protocol, eval_data="", max_windows=None)
            bench.step_cache = self.cached(("step_cache", calibration), dict)
            bench.share_kept(self.cached(("kept", calibration), OrderedDict))  # and the compressed models
            return bench

        return self.cached(key, build)

    def point(self, recipe: Any, protocol: Any, **kwargs: Any) -> list[dict[str, Any]]:
        """The stored rows of `recipe` on `protocol` (`combined.grid.grid_point`), computed once."""
        from mpt_utils.combined.grid import grid_point

        return grid_point(self.require_store(), self.bench(protocol), recipe, progress=self.progress, **kwargs)

    def sweep(self, recipes: Iterable[Any], protocol: Any, **kwargs: Any) -> list[dict[str, Any]]:
        """Every recipe's point in order (each stored and resumable on its own)."""
        rows: list[dict[str, Any]] = []
        for recipe in recipes:
            rows += self.point(recipe, protocol, **kwargs)
        return rows

    def measure(self, recipe: Any, protocol: Any, kind: str, settings: dict[str, Any],
                measure: Callable[[torch.nn.Module, Any], list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """The stored rows of another measurement (`kind`: speed, downstream, recovery...) of the model
        `recipe` makes on `protocol`: `measure(model, bench)`, computed once
        (`combined.grid.measured_point`); right after the recipe's point it reuses the kept model."""
        from mpt_utils.combined.grid import measured_point

        return measured_point(self.require_store(), self.bench(protocol), recipe, kind, settings, measure)

    def dense_point(self, protocol: Any) -> list[dict[str, Any]]:
        """The uncompressed model on `protocol`: the empty recipe's point."""
        return self.point("dense", protocol)

    def require_store(self) -> ResultsStore:
        """The session's results store; one clear error when it was made without one."""
        from mpt_utils.errors import MPTError

        if self.store is None:
            raise MPTError("this session has no results store", "pass Session(model, store='results/...')")
        return self.store


__all__ = ["Session"]
