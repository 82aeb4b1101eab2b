"""llama.cpp runs only in child processes: every path works on this CPU, and a native crash in any of
them becomes one MPTError naming the signal and the file, while the caller lives on."""

from __future__ import annotations

import os
import stat

import pytest

from mpt_utils import native
from mpt_utils.errors import MPTError

# not importorskip: importing llama_cpp would load the native library into the test runner
pytestmark = pytest.mark.skipif(not native.has_llama_cpp(), reason="needs llama-cpp-python")


@pytest.fixture
def segfaulting_python(tmp_path, monkeypatch):
    """An 'interpreter' that dies of SIGSEGV, as a fault inside libggml kills its process."""
    crasher = tmp_path / "python-that-segfaults"
    crasher.write_text("#!/bin/sh\nkill -SEGV $$\n")
    crasher.chmod(crasher.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(native.sys, "executable", os.fspath(crasher))


def test_child_errors_come_back_as_the_same_mpterror():
    with pytest.raises(MPTError, match="unknown GGUF scheme 'Q9_9'") as info:
        native.run_isolated("mpt_utils.quant.gguf.quantize:check_scheme", {"scheme": "Q9_9"}, what="x")
    assert "use one of" in info.value.fix


def test_child_python_failures_name_the_place():
    with pytest.raises(MPTError, match=r"ZeroDivisionError: .* \(at "):
        native.run_isolated("fractions:Fraction", {"numerator": 1, "denominator": 0}, what="x")


def test_results_cross_back_unchanged():
    import torch

    out = native.run_isolated("builtins:dict", {"ids": torch.arange(3), "name": "x"}, what="x")
    assert out["name"] == "x" and torch.equal(out["ids"], torch.arange(3))


def test_a_crash_in_the_downstream_scorer_becomes_an_mpterror(segfaulting_python):
    from mpt_utils.eval.downstream import evaluate_downstream, gguf_loglikelihoods
    from mpt_utils.models import embedded_path

    path = embedded_path("smollm2-135m")
    with pytest.raises(MPTError, match=r"llama.cpp crashed \(signal SIGSEGV\) while processing .*\.gguf") as info:
        evaluate_downstream(path, tasks=["mpt_capital_common_countries"], limit=2, backend="llamacpp")
    assert "make setup" in info.value.fix
    with pytest.raises(MPTError, match=r"signal SIGSEGV"):
        gguf_loglikelihoods(path, [("a", " b")])


def test_a_crash_in_the_quantizer_becomes_an_mpterror(segfaulting_python, tmp_path):
    from mpt_utils.models import embedded_path
    from mpt_utils.quant.gguf.quantize import quantize_gguf

    with pytest.raises(MPTError, match=r"llama.cpp crashed \(signal SIGSEGV\) while processing .*-> Q8_0"):
        quantize_gguf(embedded_path("smollm2-135m"), tmp_path / "q8.gguf", "Q8_0")
    assert not (tmp_path / "q8.gguf").exists()


def test_no_native_library_is_loaded_by_the_test_runner():
    """No test module and no suite module imports llama_cpp into this process, so a native fault
    (even one in the library's load-time initialisers) cannot take the test run down."""
    import sys

    from mpt_utils.eval import downstream, llamacpp  # noqa: F401
    from mpt_utils.quant.gguf import quantize  # noqa: F401

    assert "llama_cpp" not in sys.modules


@pytest.mark.integration
def test_every_llamacpp_path_works_on_this_cpu(tmp_path):
    """Perplexity and downstream scoring of the embedded Q4_1 GGUF, and quantization of an exported
    model to legacy, k-quant and IQ4 types plus their perplexity: all in child processes, none crash."""
    from mpt_utils.llamacpp_check import check_llamacpp

    rows = check_llamacpp(tmp_path)
    failed = [f"{r['step']} {r['target']}: {r['detail']}" for r in rows if not r["ok"]]
    assert not failed, failed
    assert {r["step"] for r in rows} == {"perplexity", "downstream scoring", "quantize"}
    assert len(rows) >= 10
