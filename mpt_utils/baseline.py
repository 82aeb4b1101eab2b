"""The dense reference point every compression curve starts from: PPL per corpus, size, tokens/s."""

from __future__ import annotations

import pandas as pd

from mpt_utils.eval.perplexity import perplexity_rows
from mpt_utils.models import load_model
from mpt_utils.store import ResultsStore


def dense_config(model: str, data: str, seqlen: int, max_windows: int | None, device: str | None) -> dict:
    return {"model": model, "method": "dense", "family": "dense", "ratio": 0.0, "bits": None,
            "data": data, "seqlen": seqlen, "max_windows": max_windows, "device": device, "seed": 0}


def dense_baseline(model: str, datasets: list[str], store: ResultsStore, seqlen: int = 512,
                   max_windows: int | None = None, device: str | None = None, loaded=None) -> pd.DataFrame:
    """Dense PPL on each corpus (stored per corpus, resumable) plus the model's size, as tidy rows."""
    rows = []
    for data in datasets:
        cfg = dense_config(model, data, seqlen, max_windows, device)

        def compute(data=data):
            nonlocal loaded
            loaded = loaded or load_model(model, device=device)
            info = loaded.info
            ppl = perplexity_rows(loaded.model, loaded.tokenizer, [data], seqlen, max_windows, device=device)
            size = [{"metric": "n_params", "value": info.n_params},
                    {"metric": "size_gb", "value": info.n_bytes / 1e9},
                    {"metric": "tokens_per_s", "value": ppl[0]["tokens_per_s"]}]
            return [{**r, "data": data, "dtype": info.dtype, "source": info.source, "arch": info.arch,
                     "n_layers": info.n_layers, "hidden_size": info.hidden_size, "note": info.note}
                    for r in ppl + size]

        rows.extend(store.get_or_compute(cfg, compute))
    return pd.DataFrame(rows)
