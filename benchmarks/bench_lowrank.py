"""Tokens/s of low-rank models against the dense one, side by side in one run (prefill and decode).

Speed depends only on the ranks, not on how the factors were chosen, so the uniform-rank models are
built with plain SVD (no calibration); SVD-LLM at the same ratio has exactly these shapes.
"""

from __future__ import annotations

import copy

from mpt_utils.eval.speed import measure_speed
from mpt_utils.lowrank import prepare
from mpt_utils.models import load_model
from mpt_utils.reproduce import load_profile
from mpt_utils.store import ResultsStore

RATIOS = (0.1, 0.2, 0.3, 0.5)


def main(profile: str, store: ResultsStore) -> None:
    common = load_profile(profile)["common"]
    model_name, device = common["model"], common.get("device")
    loaded = None
    for mode, seqlen in (("prefill", min(int(common["seqlen"]), 512)), ("decode", 16)):
        cfg = {"model": model_name, "method": "lowrank_speed", "family": "bench", "ratio": None, "bits": None,
               "seed": 0, "mode": mode, "seqlen": seqlen, "ratios": list(RATIOS), "device": device}

        def compute(mode=mode, seqlen=seqlen):
            nonlocal loaded
            loaded = loaded or load_model(model_name, device=device)
            plan = prepare(loaded.model, "svd", device=device, progress=False)
            models, reduction = {"dense": loaded.model}, {"dense": 0.0}
            for ratio in RATIOS:
                twin = copy.deepcopy(loaded.model)
                report = plan.apply(twin, ratio)
                report.originals = {}
                models[f"lowrank@{ratio:g}"], reduction[f"lowrank@{ratio:g}"] = twin, report.param_reduction
            results = measure_speed(models, mode=mode, seqlen=seqlen, new_tokens=32, rounds=5, device=device)
            return [{"metric": "tokens_per_s", "value": r.tokens_per_s, "point": r.name, "speedup": r.speedup,
                     "spread": r.spread, "param_reduction": reduction[r.name], "speed_device": r.device}
                    for r in results]

        for row in store.get_or_compute(cfg, compute):
            print(f"  {mode:7s} {row['point']:13s} -{row['param_reduction']:5.1%} params  "
                  f"{row['value']:9.1f} tok/s  x{row['speedup']:.2f} vs dense (spread {row['spread']:.0%})")
