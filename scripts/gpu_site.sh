#!/usr/bin/env bash
# Copies the pure-Python packages ssl_path needs beyond a GPU image's torch/timm/lightning into
# .gpu_site/ (gitignored), so a machine without network access runs the repo with
# PYTHONPATH=$PWD/.gpu_site:$PWD. Usage: bash scripts/gpu_site.sh   (then carry .gpu_site along)
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -rf .gpu_site && mkdir -p .gpu_site
for pkg in hydra omegaconf antlr4 webdataset braceexpand.py hydra_plugins safetensors; do
    if [ -e "$SITE/$pkg" ]; then cp -r "$SITE/$pkg" .gpu_site/; fi
done
du -sh .gpu_site
