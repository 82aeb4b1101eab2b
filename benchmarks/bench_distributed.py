"""An 8-point sweep on a local Ray cluster with 2 workers against the local executor, in one run.

Both executors compute the same 8 grid points (`wanda@0.1` ... `wanda@0.8`, into fresh stores, so
nothing is read back), on the tiny random llama and, for the embedded profile, on the embedded
SmolLM2-135M (embedded-wiki, 4 x 256-token calibration and evaluation windows: a reduced protocol
so the two sweeps take minutes on 2 cores). Reported: each executor's wall time, their
ratio, the cluster's start (paid once per sweep, outside the ratio), and Ray's overhead per point:
the worker-seconds spent beyond the local compute, (workers × ray − local) / points, which covers
task scheduling, worker start, the model load per worker, the shared dense reference and the rows'
trip back to the driver. The tiny model makes each point short, so it measures the overhead; the
longer the point, the closer the ratio gets to the number of workers (given free cores).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from mpt_utils.combined.grid import GridBench, GridSetup
from mpt_utils.distributed import has_ray, ray_cluster, run_points
from mpt_utils.store import ResultsStore
from mpt_utils.testing import TinyLoader

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
WORKERS = 2
CORPUS = "\n\n".join(f"paragraph {i}: the quick brown fox jumps over the lazy dog, a stitch in time saves nine. " * 3
                     for i in range(12))


def measure(folder: Path, model: str = "tiny-llama") -> dict[str, float]:
    """Seconds of the local and the Ray executor on the same 8 points, and the derived numbers.
    `model`: the tiny random llama (on a small text file), or a model spec such as the embedded
    `smollm2-135m` (on embedded-wiki, 4 x 256-token calibration and evaluation windows)."""
    if model == "tiny-llama":
        corpus = folder / "corpus.txt"
        corpus.write_text(CORPUS)
        setup = GridSetup(model=model, eval_data=str(corpus), calib_data=str(corpus), n_calib=8, seqlen=64,
                          max_windows=8, seed=0, device="cpu")
        loader = TinyLoader()
    else:
        setup = GridSetup(model=model, eval_data="embedded-wiki", calib_data="embedded-wiki", n_calib=4, seqlen=256,
                          max_windows=4, seed=0, device="cpu")
        loader = None
    recipes = [f"wanda@{r:g}" for r in RATIOS]
    start = time.perf_counter()
    local = run_points(ResultsStore(folder / "local"), GridBench(setup, loader), recipes)
    t_local = time.perf_counter() - start
    start = time.perf_counter()
    with ray_cluster(num_cpus=WORKERS, object_store_memory=200 * 2**20):
        t_start = time.perf_counter() - start
        start = time.perf_counter()
        remote = run_points(ResultsStore(folder / "ray"), GridBench(setup, loader), recipes, executor="ray")
        t_ray = time.perf_counter() - start
    same = all({r["config_hash"] for r in a} == {r["config_hash"] for r in b} for a, b in zip(local, remote))
    return {"local_s": t_local, "ray_s": t_ray, "speedup": t_local / t_ray, "cluster_start_s": t_start,
            "overhead_per_point_s": (WORKERS * t_ray - t_local) / len(recipes), "same_points": float(same)}


def main(profile: str, store: ResultsStore) -> None:
    if not has_ray():
        print("  ray is not installed (pip install -e '.[ray]'): skipped")
        return
    models = ["tiny-llama"] + (["smollm2-135m"] if profile == "embedded" else [])
    for model in models:
        cfg = {"model": model, "method": "ray_sweep", "family": "bench", "ratio": None, "bits": None, "seed": 0,
               "ratios": list(RATIOS), "workers": WORKERS, "profile": profile}

        def compute(model: str = model):
            with tempfile.TemporaryDirectory(prefix="mpt-bench-ray-") as tmp:
                found = measure(Path(tmp), model)
            return [{"metric": k, "value": v, "points": len(RATIOS)} for k, v in found.items()]

        rows = {r["metric"]: r["value"] for r in store.get_or_compute(cfg, compute)}
        print(f"  {model}, {len(RATIOS)} points: local {rows['local_s']:.1f} s, ray ({WORKERS} workers) "
              f"{rows['ray_s']:.1f} s -> x{rows['speedup']:.2f}; cluster start {rows['cluster_start_s']:.1f} s; "
              f"overhead {rows['overhead_per_point_s']:.2f} worker-s per point; "
              f"same stored points: {bool(rows['same_points'])}")


if __name__ == "__main__":
    main("embedded", ResultsStore(Path(__file__).resolve().parent.parent / "results" / "bench-embedded"))
