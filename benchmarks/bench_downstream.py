"""Items per second of the downstream scorers on the same offline items, side by side in one run:
lm-eval's own HFLM ('hf') against our torch scorer ('mpt') on the same in-memory model, and our
llama.cpp scorer on the model's GGUF file. Each backend runs `rounds` times, interleaved, so load
changes on a shared machine hit them alike; the median is reported with the spread.
"""

from __future__ import annotations

import statistics

from mpt_utils.eval.downstream import OFFLINE_SUITE, evaluate_downstream
from mpt_utils.models import EMBEDDED, embedded_path, load_model
from mpt_utils.reproduce import load_profile
from mpt_utils.store import ResultsStore

LIMIT = {"embedded": 40}  # items per task; the paper profile takes every item


def _run(target, tokenizer, backend: str, limit: int | None, batch_size: int) -> tuple[float, int, dict]:
    rows = evaluate_downstream(target, tokenizer, OFFLINE_SUITE, limit=limit, backend=backend,
                               batch_size=batch_size)
    acc = {r["task"]: r["value"] for r in rows if r["metric"] == "acc"}
    return rows[0]["run_items"] / rows[0]["run_seconds"], rows[0]["run_items"], acc


def main(profile: str, store: ResultsStore, rounds: int = 2) -> None:
    common = load_profile(profile)["common"]
    model_name, device = common["model"], common.get("device")
    limit = LIMIT.get(profile)
    batch_size = 16
    gguf = str(embedded_path(model_name)) if model_name in EMBEDDED else None
    cfg = {"model": model_name, "method": "downstream_speed", "family": "bench", "ratio": None, "bits": None,
           "seed": 0, "tasks": list(OFFLINE_SUITE), "limit": limit, "batch_size": batch_size,
           "rounds": rounds, "device": device}

    def compute():
        loaded = load_model(model_name, device=device)
        targets = {"hf": (loaded.model, loaded.tokenizer), "mpt": (loaded.model, loaded.tokenizer)}
        if gguf:
            targets["llamacpp"] = (gguf, None)
        speeds: dict[str, list[float]] = {b: [] for b in targets}
        accs, n_items = {}, 0
        for _ in range(rounds):
            for backend, (target, tok) in targets.items():
                speed, n_items, accs[backend] = _run(target, tok, backend, limit, batch_size)
                speeds[backend].append(speed)
        ref = statistics.median(speeds["hf"])
        rows = []
        for backend, values in speeds.items():
            med = statistics.median(values)
            diff = max(abs(accs[backend][t] - accs["hf"][t]) for t in accs["hf"])
            rows.append({"metric": "items_per_s", "value": med, "backend": backend, "speedup_vs_hf": med / ref,
                         "spread": (max(values) - min(values)) / med, "n_items": n_items,
                         "max_acc_diff_vs_hf": diff, "runtime": "llama.cpp GGUF" if backend == "llamacpp"
                         else "torch fp32"})
        return rows

    for row in store.get_or_compute(cfg, compute):
        print(f"  {row['backend']:9s} {row['runtime']:15s} {row['value']:7.1f} items/s  "
              f"x{row['speedup_vs_hf']:.2f} vs lm-eval hf  (spread {row['spread']:.0%}, {row['n_items']} items, "
              f"max |acc - hf acc| {row['max_acc_diff_vs_hf']:.3f})")
