"""The GGUF ladder into the results store: export once, quantize per scheme, evaluate with llama.cpp.

Each scheme is one resumable point: the file is produced (from the F32 export), measured (size on
disk, bits per weight and tensor types read back from the file, llama.cpp's fallback warnings),
evaluated (llama.cpp perplexity and tokens/s on the torch evaluator's windows), then deleted unless
`keep_files`. The round-trip point compares the F32 export under llama.cpp with the torch model.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from mpt_utils.errors import MPTError
from mpt_utils.quant.gguf.quantize import NEEDS_IMATRIX, SCHEMES, check_scheme
from mpt_utils.quant.sweep import Workbench
from mpt_utils.registry import Registry
from mpt_utils.store import ResultsStore

# Table 5's ladder (16-bit -> 2-bit), then the other types llama.cpp offers at those widths.
PAPER_LADDER = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
DEFAULT_LADDER = ("F32", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_0", "IQ4_NL", "IQ4_XS",
                  "Q3_K_M", "IQ3_M", "IQ3_XXS", "Q2_K", "IQ2_M", "IQ2_XXS", "IQ1_M", "IQ1_S")


class GGUFBench:
    """Files of one model's ladder under `work_dir`, built lazily from the Workbench's dense model."""

    def __init__(self, bench: Workbench, work_dir: str | Path, n_threads: int | None = None,
                 kv_type: str = "f16", export_dtype: str = "f32"):
        self.bench = bench
        self.work_dir = Path(work_dir)
        self.n_threads = n_threads
        self.kv_type = kv_type
        self.export_dtype = export_dtype  # "f16" halves the disk a 7B export takes (27 GB at F32)
        self.n_gpu_layers = -1 if str(bench.setup.device).startswith("cuda") else 0
        self._imatrix = None

    @property
    def export_scheme(self) -> str:
        return self.export_dtype.upper()

    def path(self, scheme: str) -> Path:
        safe = self.bench.setup.model.replace("/", "_")
        return self.work_dir / f"{safe}-{scheme}.gguf"

    def source(self) -> Path:
        """The exported (unquantized) GGUF every scheme is quantized from."""
        from mpt_utils.quant.gguf.export import export_gguf

        path = self.path(self.export_scheme)
        if not path.exists():
            loaded = self.bench.loaded
            src = loaded.info.path if (loaded.info.path or "").endswith(".gguf") else None
            export_gguf(loaded.model, loaded.tokenizer, path, dtype=self.export_dtype, tokenizer_gguf=src,
                        name=self.bench.setup.model)
        return path

    def imatrix(self):
        from mpt_utils.quant.gguf.imatrix import imatrix_from_model

        if self._imatrix is None:
            self._imatrix = imatrix_from_model(self.bench.loaded.model, stats=self.bench.dense_stats())
        return self._imatrix

    def build(self, scheme: str) -> tuple[Path, dict]:
        """The scheme's file and what llama.cpp reported while writing it."""
        from mpt_utils.quant.gguf.quantize import quantize_gguf

        src = self.source()
        if scheme == self.export_scheme:
            return src, {"quant_seconds": 0.0, "fallbacks": []}
        dst = self.path(scheme)
        report = quantize_gguf(src, dst, scheme, n_threads=self.n_threads,
                               imatrix=self.imatrix() if scheme in NEEDS_IMATRIX else None)
        return dst, {"quant_seconds": report.seconds, "fallbacks": report.fallbacks}

    def cleanup(self, keep_source: bool = False) -> None:
        for path in self.work_dir.glob(f"{self.bench.setup.model.replace('/', '_')}-*.gguf"):
            if keep_source and path == self.path(self.export_scheme):
                continue
            path.unlink(missing_ok=True)

# The ladder's point kinds, versioned like every method: a "gguf" point's numbers come from the
# export, llama.cpp's quantizer with our importance matrix, and this module's measurements.
GGUF_STEPS: Registry = Registry("GGUF ladder step", family="gguf")
_EXPORT = "mpt_utils.quant.gguf.export"


def _config(gb: GGUFBench, scheme: str) -> dict:
    return {**gb.bench.setup.config(), "method": "gguf", "scheme": scheme, "bits": SCHEMES[scheme][1],
            "kv_type": gb.kv_type, "imatrix": scheme in NEEDS_IMATRIX, "export": gb.export_dtype}


# calibration-free as a method: only the importance-matrix schemes (quantize.NEEDS_IMATRIX) read the
# workbench's dense calibration statistics
@GGUF_STEPS.register("gguf", version=2, display="GGUF", calibration=False,
                     sources=(_EXPORT, "mpt_utils.quant.gguf.quantize", "mpt_utils.quant.gguf.imatrix"))
def gguf_point(store: ResultsStore, gb: GGUFBench, scheme: str, keep_files: bool = False,
               progress: bool = True) -> list[dict]:
    from mpt_utils.quant.gguf.fileinfo import read_gguf

    check_scheme(scheme)

    def compute():
        s = gb.bench.setup
        paired = gb.bench.paired(store.root)
        paired.prepare(gb.bench.loaded.model, [s.eval_data], progress)  # the torch dense model
        path, built = gb.build(scheme)
        info = read_gguf(path)
        # perplexity and KL to the dense torch model from one llama.cpp pass, in a child process
        scored = paired.rows(path, [s.eval_data], progress, llamacpp={
            "n_threads": gb.n_threads, "kv_type": gb.kv_type, "n_gpu_layers": gb.n_gpu_layers})
        res = scored[0]
        if not keep_files and scheme != gb.export_scheme:
            path.unlink(missing_ok=True)
        n_params_fp16 = info.n_params * 2
        extra = {"scheme": scheme, "ratio": 1.0 - info.tensor_bytes / n_params_fp16, "types": info.summary(),
                 "n_fallback": len(built["fallbacks"]), "imatrix": scheme in NEEDS_IMATRIX,
                 "type_params": json.dumps(info.type_params)}
        return [*({**r, **extra} for r in scored),
                {"metric": "tokens_per_s", "value": res["tokens_per_s"], **extra},
                {"metric": "size_gb", "value": info.size_gb, "file_bytes": info.file_bytes, **extra},
                {"metric": "bits_per_weight", "value": info.bits_per_weight, **extra},
                {"metric": "matrix_bits_per_weight", "value": info.matrix_bits_per_weight, **extra},
                {"metric": "quant_seconds", "value": built["quant_seconds"], **extra},
                {"metric": "n_fallback", "value": len(built["fallbacks"]), **extra}]

    return store.get_or_compute(_config(gb, scheme), compute)


@GGUF_STEPS.register("gguf-roundtrip", version=1, display="GGUF round trip", calibration=False,
                     sources=(_EXPORT,))
def roundtrip_point(store: ResultsStore, gb: GGUFBench, progress: bool = True) -> list[dict]:
    """The exported GGUF (F32 unless export_dtype="f16") under llama.cpp vs the torch model on the
    same windows: the correctness anchor."""
    from mpt_utils.eval.llamacpp import llamacpp_perplexity
    from mpt_utils.eval.perplexity import perplexity

    cfg = {**gb.bench.setup.config(), "method": "gguf-roundtrip", "bits": SCHEMES[gb.export_scheme][1],
           "kv_type": gb.kv_type, "export": gb.export_dtype}

    def compute():
        s = gb.bench.setup
        ids = gb.bench.eval_ids()
        ref = perplexity(gb.bench.loaded.model, ids, seqlen=s.seqlen, max_windows=s.max_windows,
                         device=s.device, progress=progress, desc="torch ppl")
        got = llamacpp_perplexity(gb.source(), ids, seqlen=s.seqlen, max_windows=s.max_windows,
                                  n_threads=gb.n_threads, kv_type=gb.kv_type, progress=progress,
                                  n_gpu_layers=gb.n_gpu_layers)
        rel = got.ppl / ref.ppl - 1.0
        extra = {"scheme": f"{gb.export_scheme} round trip", "ratio": None}
        return [{"metric": "torch_ppl", "value": ref.ppl, "tokens_per_s": ref.tokens_per_s, **extra},
                {"metric": "llamacpp_ppl", "value": got.ppl, "tokens_per_s": got.tokens_per_s, **extra},
                {"metric": "roundtrip_rel_error", "value": rel, **extra},
                {"metric": "roundtrip_nll_diff", "value": got.nll - ref.nll, **extra}]

    return store.get_or_compute(cfg, compute)


def ladder(store: ResultsStore, gb: GGUFBench, schemes: Iterable[str] = DEFAULT_LADDER, *,
           keep_files: bool = False, progress: bool = True) -> pd.DataFrame:
    """The round-trip anchor and every scheme of the ladder, as tidy rows."""
    schemes = [check_scheme(s) for s in schemes]
    rows = list(roundtrip_point(store, gb, progress))
    for scheme in schemes:
        try:
            rows += gguf_point(store, gb, scheme, keep_files, progress)
        except MPTError as err:
            # One scheme llama.cpp cannot build or evaluate (e.g. a native crash, reported by the
            # isolated evaluator) must not cost the rest of the ladder. Not stored: a rerun retries it.
            warnings.warn(f"GGUF {scheme} skipped: {err}", stacklevel=2)
            rows.append({"method": "gguf-failed", "scheme": scheme, "metric": "error", "value": float("nan"),
                         "error": err.message})
    if not keep_files:
        gb.cleanup()
    return pd.DataFrame(rows)
