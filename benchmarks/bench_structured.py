"""Tokens/s of every structured-pruning method against the dense model, all timed side by side in one
`measure_speed` run per ratio (interleaved rounds, rotating order), so the speedups share conditions.
Quality does not matter here, only structure, so the pruning uses a small calibration set.
"""

from __future__ import annotations

import copy

from mpt_utils.data import calibration_windows
from mpt_utils.eval.speed import measure_speed
from mpt_utils.models import load_model
from mpt_utils.prune.structured import STRUCTURED, structured_prune
from mpt_utils.reproduce import load_profile
from mpt_utils.store import ResultsStore

SETTINGS = {  # ratios, prefill seqlen, rounds, decode tokens
    "embedded": {"ratios": [0.2, 0.5], "seqlen": 256, "rounds": 5, "new_tokens": 32},
    "paper": {"ratios": [0.3, 0.5], "seqlen": 2048, "rounds": 5, "new_tokens": 128},
}


def main(profile: str, store: ResultsStore) -> None:
    common = load_profile(profile)["common"]
    model_name, device = common["model"], common.get("device")
    opts = SETTINGS.get(profile, SETTINGS["embedded"])
    methods = STRUCTURED.names()
    loaded = None
    for ratio in opts["ratios"]:
        cfg = {"model": model_name, "method": "structured_speed", "family": "bench", "ratio": ratio, "bits": None,
               "seed": 0, "methods": methods, "device": device, **{k: v for k, v in opts.items() if k != "ratios"}}

        def compute(ratio=ratio):
            nonlocal loaded
            loaded = loaded or load_model(model_name, device=device)
            calib = calibration_windows(loaded.tokenizer, common["calib_data"], 8, 256, seed=0)
            models, sizes = {"dense": loaded.model}, {}
            for m in methods:
                pruned = copy.deepcopy(loaded.model)
                res = structured_prune(pruned, m, ratio, None if m == "random" else calib, progress=False)
                models[m], sizes[m] = pruned, res.param_reduction
            rows = []
            for mode in ("prefill", "decode"):
                for r in measure_speed(models, mode=mode, seqlen=opts["seqlen"], rounds=opts["rounds"],
                                       new_tokens=opts["new_tokens"], device=device):
                    rows.append({"metric": "tokens_per_s", "value": r.tokens_per_s, "mode": mode, "name": r.name,
                                 "speedup": r.speedup, "spread": r.spread, "n_params": r.n_params,
                                 "param_reduction": sizes.get(r.name, 0.0), "speed_device": r.device})
            return rows

        for row in store.get_or_compute(cfg, compute):
            print(f"  ratio {ratio:.1f} {row['mode']:7s} {row['name']:10s} {row['value']:9.1f} tok/s  "
                  f"x{row['speedup']:.2f} vs dense  (params {-row['param_reduction']:+.1%}, "
                  f"spread {row['spread']:.0%})")
