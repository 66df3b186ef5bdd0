#!/usr/bin/env bash
# Create .venv (if missing) and install ssl_path with its dev extra, editable.
# torch: TORCH_SPEC overrides the pinned build (default matches the CI machine; on Linux x86_64 the
# same pin from PyPI is a CUDA build, so GPU users need nothing else).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    # shellcheck disable=SC2086
    .venv/bin/pip install -q $TORCH_SPEC
fi
.venv/bin/pip install -q -e '.[dev]'
