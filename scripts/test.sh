#!/usr/bin/env bash
# Run the test suite (sets up .venv first if it is missing). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && .venv/bin/python -c "import d2f, torch, peft" 2>/dev/null || bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
