"""An 8-point sweep on a local Ray cluster with 2 workers against the local executor, in one run.

Both executors compute the same 8 grid points (`wanda@0.1` ... `wanda@0.8` on the tiny random
llama, into fresh stores, so nothing is read back). Reported: each executor's wall time, their
ratio, the cluster's start (paid once per sweep, outside the ratio), and Ray's overhead per point:
the worker-seconds spent beyond the local compute, (workers × ray − local) / points, which covers
task scheduling, worker start, the model load per worker, the shared dense reference and the rows'
trip back to the driver. The tiny model makes each point short, so this measures the overhead;
with the embedded or larger models a point takes minutes and the ratio approaches the workers.
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


def measure(folder: Path) -> dict[str, float]:
    """Seconds of the local and the Ray executor on the same 8 points, and the derived numbers."""
    corpus = folder / "corpus.txt"
    corpus.write_text(CORPUS)
    setup = GridSetup(model="tiny-llama", eval_data=str(corpus), calib_data=str(corpus), n_calib=8, seqlen=64,
                      max_windows=8, seed=0, device="cpu")
    recipes = [f"wanda@{r:g}" for r in RATIOS]
    start = time.perf_counter()
    local = run_points(ResultsStore(folder / "local"), GridBench(setup, TinyLoader()), recipes)
    t_local = time.perf_counter() - start
    start = time.perf_counter()
    with ray_cluster(num_cpus=WORKERS, object_store_memory=200 * 2**20):
        t_start = time.perf_counter() - start
        start = time.perf_counter()
        remote = run_points(ResultsStore(folder / "ray"), GridBench(setup, TinyLoader()), recipes, executor="ray")
        t_ray = time.perf_counter() - start
    same = all({r["config_hash"] for r in a} == {r["config_hash"] for r in b} for a, b in zip(local, remote))
    return {"local_s": t_local, "ray_s": t_ray, "speedup": t_local / t_ray, "cluster_start_s": t_start,
            "overhead_per_point_s": (WORKERS * t_ray - t_local) / len(recipes), "same_points": float(same)}


def main(profile: str, store: ResultsStore) -> None:
    if not has_ray():
        print("  ray is not installed (pip install -e '.[ray]'): skipped")
        return
    cfg = {"model": "tiny-llama", "method": "ray_sweep", "family": "bench", "ratio": None, "bits": None, "seed": 0,
           "ratios": list(RATIOS), "workers": WORKERS, "profile": profile}

    def compute():
        with tempfile.TemporaryDirectory(prefix="mpt-bench-ray-") as tmp:
            found = measure(Path(tmp))
        return [{"metric": k, "value": v, "points": len(RATIOS)} for k, v in found.items()]

    rows = {r["metric"]: r["value"] for r in store.get_or_compute(cfg, compute)}
    print(f"  {len(RATIOS)} points: local {rows['local_s']:.1f} s, ray ({WORKERS} workers) {rows['ray_s']:.1f} s "
          f"-> x{rows['speedup']:.2f}; cluster start {rows['cluster_start_s']:.1f} s; overhead "
          f"{rows['overhead_per_point_s']:.2f} worker-s per point; same stored points: {bool(rows['same_points'])}")


if __name__ == "__main__":
    main("embedded", ResultsStore(Path(__file__).resolve().parent.parent / "results" / "bench-embedded"))
