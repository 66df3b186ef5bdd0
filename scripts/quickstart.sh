#!/usr/bin/env bash
# The main job on its embedded default: install, tile the bundled real slides (re-running skips
# finished slides), then pretrain the tiny smoke ViT on them on CPU. Extra args go to ssl-path-train.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export WANDB_MODE=${WANDB_MODE:-offline}
SLIDES=${SSL_PATH_SHARED_DATA:-../shared/data}/slides
.venv/bin/ssl-path-tile input="$SLIDES" output=runs/data/bundled
.venv/bin/ssl-path-train experiment=smoke "$@"
