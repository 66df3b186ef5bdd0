#!/usr/bin/env bash
# The main job on its embedded default: install, tile the bundled real slides (re-running skips
# finished slides), then pretrain the tiny smoke ViT on them on CPU. Extra args go to ssl-path-train.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export WANDB_MODE=${WANDB_MODE:-offline}
# tiling=tcga: the bundled TCGA slide records no mpp nor objective power; assume 40x (warned, and
# recorded as mpp_source=fallback in the manifest). broken.svs is reported failed, the run goes on.
.venv/bin/ssl-path-tile tiling=tcga input="${SSL_PATH_SHARED_DATA:-../shared/data}/slides" output=runs/data/bundled
.venv/bin/ssl-path-train experiment=smoke "$@"
