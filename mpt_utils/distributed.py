"""Where a sweep's points are computed: in this process (`executor="local"`) or as Ray tasks.

`run_points(store, bench, recipes, executor="ray")` is the grid (`combined.grid.grid`) spread over a
Ray cluster (Moritz et al., "Ray: A Distributed Framework for Emerging AI Applications", OSDI 2018,
arXiv:1712.05889, https://github.com/ray-project/ray). Ray is imported only here and only for
`executor="ray"`; the cluster is the one `RAY_ADDRESS` (or `address=`) names, else a local one
started for the sweep and stopped after it.

- The driver reads the store first: points already stored are skipped, never sent to a worker.
- One Ray task per missing point, each asking for one GPU when the protocol's device is CUDA (or,
  with no device given, when the cluster has GPUs), else `num_cpus` CPUs.
- Shared work once per cluster: one task computes the dense reference of the paired evaluator (the
  dense model's top-k log-probs on the evaluation windows); its result sits in Ray's object store
  and every point task adopts it (`PairedEvaluator.use_references`) instead of running the dense
  model again. When the workers see the store's folder (a single-node cluster, or `shared_store=True`
  for a shared filesystem) that task also reads/writes the store's `dense_logits/` cache, so a later
  sweep reuses it. A worker process keeps the dense model it loaded for the next point of the sweep.
- Where a point is written: workers return their rows to the driver, and only the driver writes
  them (`ResultsStore.put`: temp file + rename, as each task finishes). Chosen over workers writing
  into a shared store because it needs no shared filesystem (Kubernetes pods, Slurm nodes with local
  disks), there is one writer per store, and a worker killed mid-point has written nothing: its
  point is either absent (retried, or reported as failed) or complete. A driver killed mid-sweep
  keeps every point written so far; a rerun computes the rest.
- A task whose worker dies (OOM killer, preemption, segfault) is rerun up to `max_retries` times by
  Ray; Python exceptions are not retried unless `retry_exceptions=True` (the same input fails the
  same way). Points that still fail are named in one MPTError after every other point is stored.
- Progress: one bar over finished tasks (`mpt_utils.progress`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpt_utils.combined.grid import GridBench, GridSetup, compute_point, grid_point, point_config
from mpt_utils.errors import MPTError
from mpt_utils.progress import progress_bar
from mpt_utils.recipe import Recipe
from mpt_utils.store import ResultsStore

EXECUTORS = ("local", "ray")
RAY_ADDRESS_ENV = "RAY_ADDRESS"


def check_executor(executor: str) -> str:
    """`executor` when known, else an MPTError naming the valid ones."""
    if executor not in EXECUTORS:
        raise MPTError(f"unknown executor {executor!r}", f"use one of {', '.join(EXECUTORS)}")
    return executor


def has_ray() -> bool:
    """Whether Ray can be imported here (without importing it)."""
    return importlib.util.find_spec("ray") is not None


def _import_ray() -> Any:
    if not has_ray():
        raise MPTError("executor='ray' needs Ray, which is not installed",
                       "install the extra: pip install -e '.[ray]' (make setup installs it)")
    import ray

    return ray


def _package_path() -> str:
    """The folder this `mpt_utils` was imported from, put first on the workers' PYTHONPATH so a
    local cluster runs the same code as the driver (a checkout, not another installed copy)."""
    return str(Path(__file__).resolve().parent.parent)


def _start_local(ray: Any, attempts: int, **kwargs: Any) -> None:
    """`ray.init` of a new one-node cluster, tried `attempts` times: on a loaded machine the
    raylet may give up waiting (a fixed limit of about 30 s) for its agents to start; a second
    try finds their imports in the page cache."""
    kwargs.setdefault("include_dashboard", False)
    path = os.pathsep.join(p for p in (_package_path(), os.environ.get("PYTHONPATH")) if p)
    kwargs.setdefault("runtime_env", {"env_vars": {"PYTHONPATH": path}})
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "90")  # else a failed raylet is noticed after 10 min
    for attempt in range(1, attempts + 1):
        try:
            ray.init(**kwargs)
            return
        except Exception as err:  # noqa: BLE001 - the node did not come up: try again
            if ray.is_initialized():
                ray.shutdown()
            if attempt == attempts:
                raise MPTError(f"a local Ray node did not start in {attempts} tries: {err}",
                               "see /tmp/ray/session_latest/logs/raylet.out, or start a cluster and set "
                               "RAY_ADDRESS") from None


@contextlib.contextmanager
def ray_cluster(address: str | None = None, *, attempts: int = 3, **kwargs: Any) -> Iterator[Any]:
    """Ray, connected to the cluster at `address` (default `$RAY_ADDRESS`), else to a local
    one-node cluster started here (no dashboard; workers import this checkout of the package;
    `kwargs` go to `ray.init`, e.g. num_cpus=2) and stopped on exit. Yields the ray module."""
    ray = _import_ray()
    address = address or os.environ.get(RAY_ADDRESS_ENV) or None
    if address is None:
        _start_local(ray, attempts, **kwargs)
    else:
        ray.init(address=address, **kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _cluster(address: str | None) -> Iterator[Any]:
    """The running Ray connection if there is one (left running), else one made for this sweep."""
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    with ray_cluster(address) as connected:
        yield connected


def task_resources(device: str | None, cluster_gpus: float, num_cpus: float = 1) -> dict[str, float]:
    """Ray resources of one point: one GPU for a CUDA protocol (or no device given on a cluster with
    GPUs, where the worker then picks CUDA), else `num_cpus` CPUs and no GPU (Ray then hides the
    GPUs from the task, so an unset device picks CPU there too)."""
    cuda = str(device).startswith("cuda") if device is not None else cluster_gpus > 0
    return {"num_cpus": float(num_cpus), "num_gpus": 1.0 if cuda else 0.0}


def _single_node(ray: Any) -> bool:
    """Whether the cluster is this machine alone (then workers see the store's folder)."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.util.get_node_ip_address()
    return len(alive) == 1 and alive[0].get("NodeManagerAddress") == here


# -- worker side ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchSpec:
    """What a worker needs to rebuild the sweep's `GridBench` (not the loaded model itself)."""

    token: str  # one per sweep: a worker keeps its bench for the sweep's next point, not another's
    setup: GridSetup
    loader: Callable[[], Any] | None
    work_dir: str | None
    n_threads: int | None
    keep_prefixes: int

    @classmethod
    def of(cls, bench: GridBench) -> BenchSpec:
        return cls(uuid.uuid4().hex, bench.setup, bench.session.loader, None if bench.work_dir is None else str(bench.work_dir),
                   bench.n_threads, bench.keep_prefixes)


_BENCHES: dict[str, GridBench] = {}  # per worker process: the current sweep's bench


def worker_bench(spec: BenchSpec) -> GridBench:
    """This process's bench for `spec`'s sweep, built (and the model loaded) on first use."""
    bench = _BENCHES.get(spec.token)
    if bench is None:
        _BENCHES.clear()  # a new sweep: drop the previous one's model
        bench = GridBench(spec.setup, spec.loader, work_dir=spec.work_dir, n_threads=spec.n_threads,
                          keep_prefixes=spec.keep_prefixes)
        _BENCHES[spec.token] = bench
    return bench


def reference_task(spec: BenchSpec, cache_root: str | None) -> dict[str, Any]:
    """The dense references of the protocol's evaluation corpus (read from or written to
    `cache_root`'s cache when given): computed once, shared through the object store."""
    bench = worker_bench(spec)
    paired = bench.paired(cache_root)
    with bench.scoring(bench.loaded.model) as dense:
        paired.prepare(dense, [spec.setup.eval_data])
    return paired.references()


def point_task(spec: BenchSpec, references: dict[str, Any], recipe: str, keep_files: bool) -> list[dict[str, Any]]:
    """One point's rows (`combined.grid.compute_point`), scored against the shared dense reference;
    returned to the driver, which stores them."""
    bench = worker_bench(spec)
    bench.paired(None).use_references(references)
    return compute_point(bench, recipe, keep_files=keep_files)


# -- driver side ----------------------------------------------------------------------------------
def run_points(store: ResultsStore, bench: GridBench, recipes: Sequence[Recipe | str], *, executor: str = "local",
               keep_files: bool = False, progress: bool = False, max_retries: int = 3,
               retry_exceptions: bool = False, address: str | None = None, num_cpus: float = 1,
               shared_store: bool | None = None) -> list[list[dict[str, Any]]]:
    """The stored rows of each recipe's point, in order, computing the missing ones with `executor`
    (module docstring). `local`: `grid_point` one after another in this process. `ray`: one task per
    missing point on the cluster at `address` / `$RAY_ADDRESS` (else a local one); `max_retries`
    reruns of a task whose worker died; `num_cpus` per CPU task; `shared_store`: whether workers see
    the store folder at the same path (default: only on a single-node cluster)."""
    check_executor(executor)
    parsed = [Recipe.parse(r) for r in recipes]
    if keep_files and bench.work_dir is None:
        raise MPTError("keep_files=True needs a folder to keep the GGUF in", "pass GridBench(..., work_dir=...)")
    if executor == "local":
        return [grid_point(store, bench, r, keep_files=keep_files, progress=progress) for r in parsed]
    if int(max_retries) < 0:
        raise MPTError(f"max_retries={max_retries} is negative", "pass 0 (no retry) or more")
    configs = [point_config(bench.setup, r) for r in parsed]
    found: list[list[dict[str, Any]] | None] = [store.load(c) for c in configs]
    missing = [i for i, rows in enumerate(found) if rows is None]
    if missing:
        with _cluster(address) as ray:
            _run_on_ray(ray, store, bench, parsed, configs, found, missing, keep_files=keep_files, progress=progress,
                        max_retries=int(max_retries), retry_exceptions=retry_exceptions, num_cpus=num_cpus,
                        shared_store=shared_store)
    return [rows for rows in found if rows is not None]


def _run_on_ray(ray: Any, store: ResultsStore, bench: GridBench, recipes: list[Recipe], configs: list[dict[str, Any]],
                found: list[list[dict[str, Any]] | None], missing: list[int], *, keep_files: bool, progress: bool,
                max_retries: int, retry_exceptions: bool, num_cpus: float, shared_store: bool | None) -> None:
    spec = BenchSpec.of(bench)
    resources = task_resources(bench.setup.device, ray.cluster_resources().get("GPU", 0.0), num_cpus)
    shared = _single_node(ray) if shared_store is None else bool(shared_store)
    retry = {"max_retries": max_retries, "retry_exceptions": retry_exceptions}
    reference = ray.remote(reference_task).options(name="mpt dense reference", **resources, **retry) \
        .remote(spec, str(store.root) if shared else None)
    remote_point = ray.remote(point_task)
    pending = {remote_point.options(name=f"mpt point {recipes[i]}", **resources, **retry)
               .remote(spec, reference, str(recipes[i]), keep_files): i for i in missing}
    failures: list[tuple[Recipe, BaseException]] = []
    bar = progress_bar(total=len(pending), desc="points (ray)", disable=not progress)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                try:
                    rows = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - a failed point is reported with the others below
                    failures.append((recipes[i], err))
                    continue
                found[i] = store.put(configs[i], rows)  # the only write: atomic, by the driver
                bar.update(1)
    finally:
        bar.close()
        for ref in pending:  # interrupted: stop what is still running
            ray.cancel(ref, force=True)
    if failures:
        names = ", ".join(str(r) for r, _ in failures)
        first = failures[0][1]
        raise MPTError(f"{len(failures)} point(s) failed on Ray after {max_retries} retries: {names}; first error: "
                       f"{type(first).__name__}: {str(first).strip().splitlines()[-1] if str(first).strip() else ''}",
                       "the other points are stored; fix the cause and rerun (stored points are skipped)")


__all__ = ["EXECUTORS", "BenchSpec", "check_executor", "has_ray", "ray_cluster", "point_task", "reference_task",
           "run_points", "task_resources", "worker_bench"]
