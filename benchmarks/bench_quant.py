"""Quantization speed, side by side in one run: GPTQ vs RTN time per decoder block, and llama.cpp
perplexity throughput (F32, Q8_0, Q4_K_M) vs the torch evaluator on the same model and windows."""

from __future__ import annotations

import copy
import os
import tempfile
import time
from pathlib import Path

from mpt_utils.reproduce import load_profile
from mpt_utils.store import ResultsStore

N_WINDOWS = 4  # enough windows for a stable tokens/s, few enough for a short `make bench`
N_CALIB = 4


def _measure(params: dict) -> list[dict]:
    from mpt_utils.calibration import decoder_layers
    from mpt_utils.data import calibration_windows, eval_ids
    from mpt_utils.eval.llamacpp import llamacpp_perplexity
    from mpt_utils.eval.perplexity import perplexity
    from mpt_utils.models import load_model
    from mpt_utils.quant import quantize
    from mpt_utils.quant.gguf import export_gguf, quantize_gguf

    seqlen, device = params["seqlen"], params.get("device")
    loaded = load_model(params["model"], device=device)
    n_blocks = len(decoder_layers(loaded.model))
    calib = calibration_windows(loaded.tokenizer, params["calib_data"], N_CALIB, seqlen, params.get("seed", 0))
    rows = []
    seconds = {}
    for method in ("rtn", "gptq"):
        model = copy.deepcopy(loaded.model)
        start = time.perf_counter()
        quantize(model, method, bits=4, group_size=128, calib_ids=calib, device=device, progress=False)
        seconds[method] = time.perf_counter() - start
        rows.append({"metric": "seconds_per_block", "value": seconds[method] / n_blocks, "method": method})
        del model
    rows.append({"metric": "gptq_over_rtn_time", "value": seconds["gptq"] / seconds["rtn"], "method": "gptq"})

    ids = eval_ids(loaded.tokenizer, params["eval_data"])
    torch_res = perplexity(loaded.model, ids, seqlen=seqlen, max_windows=N_WINDOWS, device=device, progress=False)
    rows.append({"metric": "tokens_per_s", "value": torch_res.tokens_per_s, "method": "torch", "ppl": torch_res.ppl})
    with tempfile.TemporaryDirectory() as tmp:
        src = loaded.info.path if (loaded.info.path or "").endswith(".gguf") else None
        f32 = export_gguf(loaded.model, loaded.tokenizer, Path(tmp) / "f32.gguf", tokenizer_gguf=src)
        for scheme in ("F32", "Q8_0", "Q4_K_M"):
            path = f32 if scheme == "F32" else Path(tmp) / f"{scheme}.gguf"
            if scheme != "F32":
                quantize_gguf(f32, path, scheme)
            res = llamacpp_perplexity(path, ids, seqlen=seqlen, max_windows=N_WINDOWS, progress=False,
                                      n_gpu_layers=-1 if str(device).startswith("cuda") else 0)
            rows.append({"metric": "tokens_per_s", "value": res.tokens_per_s, "method": f"llama.cpp {scheme}",
                         "ppl": res.ppl})
            rows.append({"metric": "llamacpp_over_torch_tokens_per_s", "value": res.tokens_per_s / torch_res.tokens_per_s,
                         "method": f"llama.cpp {scheme}"})
            if path != f32:
                path.unlink()
    return rows


def main(profile: str, store: ResultsStore) -> None:
    params = {**load_profile(profile)["common"]}
    config = {"family": "bench", "method": "quant-speed", "model": params["model"], "seqlen": params["seqlen"],
              "n_windows": N_WINDOWS, "n_calib": N_CALIB, "device": params.get("device"),
              "threads": os.cpu_count()}
    rows = store.get_or_compute(config, lambda: _measure(params))
    for r in rows:
        if r["metric"] in ("seconds_per_block", "gptq_over_rtn_time", "llamacpp_over_torch_tokens_per_s"):
            print(f"  {r['method']:18s} {r['metric']:34s} {r['value']:.3f}")
        elif r["metric"] == "tokens_per_s":
            print(f"  {r['method']:18s} tokens/s {r['value']:10.1f}   (PPL {r['ppl']:.3f})")
