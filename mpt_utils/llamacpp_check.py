"""Does llama.cpp work on this CPU? Every way the suite uses it, each step in a child process.

llama-cpp-python is compiled on the machine that installs it, and CPU-specific kernels (AMX tiles
on Sapphire Rapids-class CPUs, AVX-512, weight repacking) are where native faults live. This check
runs the embedded Q4_1 GGUF through perplexity and downstream scoring, and a small exported model
through quantization to the types the GGUF ladder writes and their perplexity, so `make setup` can
tell a working library from a crashing one (and rebuild it), and the test suite can prove it.

    python -m mpt_utils.llamacpp_check      # one line per step; exit code 1 if a llama.cpp step failed
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from mpt_utils.errors import MPTError, cli_main

# legacy, k-quant and IQ4 kernels: the families the ladder produces on 576-wide rows
CHECK_SCHEMES = ("Q8_0", "Q4_0", "Q4_K_M", "IQ4_NL")


def _step(name: str, target: str, run) -> dict[str, Any]:
    try:
        detail = run()
        return {"step": name, "target": target, "ok": True, "detail": detail}
    except MPTError as err:
        return {"step": name, "target": target, "ok": False, "detail": err.message}


def check_llamacpp(workdir: str | Path | None = None, schemes: tuple[str, ...] = CHECK_SCHEMES) -> list[dict[str, Any]]:
    """One row per llama.cpp path (step, target, ok, detail); never raises for a native crash."""
    from mpt_utils.eval.downstream import gguf_loglikelihoods
    from mpt_utils.eval.llamacpp import llamacpp_perplexity
    from mpt_utils.models import DEFAULT_MODEL, embedded_path
    from mpt_utils.quant.gguf.export import export_gguf
    from mpt_utils.quant.gguf.quantize import quantize_gguf
    from mpt_utils.testing import tiny_model

    rows = []
    embedded = embedded_path(DEFAULT_MODEL)
    def ppl(path: Path, vocab: int) -> str:
        ids = torch.randint(10, vocab, (256,), generator=torch.Generator().manual_seed(0))
        result = llamacpp_perplexity(path, ids, seqlen=128, progress=False)
        if not torch.isfinite(torch.tensor(result.ppl)):
            raise MPTError(f"llama.cpp returned a non-finite perplexity for {path}")
        return f"ppl {result.ppl:.4g} on {result.n_windows} windows"

    def score() -> str:
        out = gguf_loglikelihoods(embedded, [("The capital of Greece is", " Athens"), ("", "hello")], n_ctx=128)
        return f"log-likelihoods {[round(o[0], 3) for o in out]}"

    rows.append(_step("perplexity", embedded.name, lambda: ppl(embedded, 20000)))
    rows.append(_step("downstream scoring", embedded.name, score))
    with tempfile.TemporaryDirectory(prefix="mpt-llamacpp-check-", dir=workdir) as tmp:
        tiny = tiny_model("llama", seed=0)
        src = export_gguf(tiny.model, tiny.tokenizer, Path(tmp) / "tiny-f32.gguf")
        rows.append(_step("perplexity", src.name, lambda: ppl(src, 250)))
        for scheme in schemes:
            dst = Path(tmp) / f"tiny-{scheme}.gguf"
            step = _step("quantize", dst.name, lambda s=scheme, d=dst: f"{quantize_gguf(src, d, s).seconds:.2f} s")
            rows.append(step)
            if step["ok"]:
                rows.append(_step("perplexity", dst.name, lambda d=dst: ppl(d, 250)))
    return rows


@cli_main
def main() -> int:
    rows = check_llamacpp()
    for r in rows:
        print(f"[llama.cpp] {'ok  ' if r['ok'] else 'FAIL'} {r['step']:<18} {r['target']:<34} {r['detail']}")
    failed = [r for r in rows if not r["ok"]]
    if failed:
        print(f"[llama.cpp] {len(failed)} of {len(rows)} steps failed on this CPU", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
