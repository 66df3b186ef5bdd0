#!/usr/bin/env bash
# Builds the histolab baseline for scripts/bench_tiling.py in its own virtual environment.
# histolab 0.7 pins numpy<=1.24.4, scikit-image 0.19.x (no cp311 wheel: built from source, ~10 min
# on 2 cores) and openslide-python 1.3.1 (needs Debian's libopenslide0), none of which fit ssl_path's
# own environment. Usage: bash scripts/setup_histolab_venv.sh [VENV_DIR]   (default .venv-histolab)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-histolab}
PY=${PYTHON:-python3}

if ! ldconfig -p | grep -q 'libopenslide.so.0'; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenslide0
    else
        echo "histolab needs Debian's libopenslide0: sudo apt-get install libopenslide0" >&2
        exit 1
    fi
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "histolab==0.7.0"
"$VENV/bin/python" -c "import histolab, openslide, skimage; print('histolab', histolab.__version__, 'openslide', openslide.__version__, 'skimage', skimage.__version__)"
