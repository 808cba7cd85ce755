#!/usr/bin/env bash
# Create .venv and install d2f with everything the tests and the testbed need.
# On a machine without CUDA, torch is pinned to the 2.13.0 CPU wheel *first*, so that nothing
# later pulls several GB of CUDA packages. A GPU user with their own torch in the venv keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q torch==2.13.0
fi
# DS_BUILD_OPS=0: DeepSpeed compiles its ops lazily at first use instead of at install.
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -e ".[dev,deepspeed,data,serve,eval]"
.venv/bin/python -c "import torch, transformers, peft, accelerate; print(f'd2f ready: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}')"
