"""Native code (llama.cpp) runs in a child interpreter, never in the caller's process.

llama-cpp-python is compiled on the machine that installs it, and a native fault inside libggml (a
segfault in a CPU-specific kernel, an illegal instruction on a CPU the build did not target) kills
the whole process that loaded it: a notebook kernel, the test runner, a sweep. `run_isolated` calls
a function by its import path in `python -m mpt_utils.native`, passes arguments and results through
a temporary file (torch.save, so tensors and numpy arrays travel as they are), and turns a crash
into one MPTError that names the signal and the file being processed. An MPTError raised in the
child is raised again in the parent with its own message and fix.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch

from mpt_utils.errors import MPTError

REBUILD_FIX = ("a native fault inside llama.cpp on this CPU: run `make setup` again (it probes llama.cpp "
               "and rebuilds it once with portable CPU flags), or skip this file type")
CHILD_ENV = "MPT_NATIVE_CHILD"  # set in the child, so isolated code does not isolate itself again


def has_llama_cpp() -> bool:
    """Whether llama-cpp-python is installed, without importing it (importing loads the native library)."""
    return importlib.util.find_spec("llama_cpp") is not None


def in_child() -> bool:
    return os.environ.get(CHILD_ENV) == "1"


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def run_isolated(target: str, kwargs: dict[str, Any], *, what: str, show_output: bool = False,
                 timeout: float | None = None) -> Any:
    """`module:function(**kwargs)` in a child interpreter; its return value, or one MPTError.

    what: the file being processed, named in the crash message.
    show_output: let the child's stderr through (progress bars); otherwise it is kept for the message.
    """
    with tempfile.TemporaryDirectory(prefix="mpt-native-") as tmp:
        job, out = Path(tmp) / "job.pt", Path(tmp) / "result.pt"
        torch.save({"target": target, "kwargs": kwargs}, job)
        env = {**os.environ, CHILD_ENV: "1"}
        try:
            proc = subprocess.run([sys.executable, "-m", "mpt_utils.native", str(job), str(out)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=None if show_output else subprocess.PIPE,
                                  text=True, errors="replace", timeout=timeout)
        except subprocess.TimeoutExpired:
            raise MPTError(f"llama.cpp did not finish {what} within {timeout:.0f} s",
                           "raise the timeout or evaluate fewer windows") from None
        if not out.exists():
            lines = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
            tail = f": {lines[-1].strip()[:200]}" if lines else ""
            raise MPTError(f"llama.cpp crashed ({_describe(proc.returncode)}) while processing {what}{tail}",
                           REBUILD_FIX)
        answer = torch.load(out, weights_only=False)
    if "error" in answer:
        raise MPTError(answer["error"], answer.get("fix"))
    return answer["result"]


def _resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _child(job: str, out: str) -> None:
    """Child side of `run_isolated`: the result, or the error as data (a crash leaves no file)."""
    args = torch.load(job, weights_only=False)
    try:
        answer: dict[str, Any] = {"result": _resolve(args["target"])(**args["kwargs"])}
    except MPTError as err:
        answer = {"error": err.message, "fix": err.fix}
    except Exception as err:  # noqa: BLE001 - any Python failure crosses back as one message
        where = traceback.extract_tb(err.__traceback__)[-1]
        answer = {"error": f"{type(err).__name__}: {err} (at {Path(where.filename).name}:{where.lineno})",
                  "fix": "this is a bug in the suite or an unsupported input; the message says where"}
    tmp = Path(out).with_suffix(".partial")
    torch.save(answer, tmp)
    os.replace(tmp, out)  # only a complete answer counts as one


if __name__ == "__main__":
    _child(*sys.argv[1:3])
