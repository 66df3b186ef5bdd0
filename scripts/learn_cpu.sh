#!/usr/bin/env bash
# Does ssl_path learn on 2 CPU cores? (docs/learning.md) Tile the bundled slides small, train
# experiment=learn_cpu (periodic kNN on kather2016-100 every 250 steps), evaluate the final teacher beside
# the same ViT at random init and the colour-histogram baseline (kNN20 + linear, 5 folds x 3 seeds), and
# plot the loss / entropy / kNN curves. Extra args go to ssl-path-train.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export WANDB_MODE=${WANDB_MODE:-offline}
SHARED=${SSL_PATH_SHARED_DATA:-../shared/data}
OUT=${LEARN_OUT:-runs/learn_cpu}
.venv/bin/ssl-path-tile tiling=learn_cpu input="$SHARED/slides" output=runs/data/bundled_112 progress=false
start=$(date +%s)
.venv/bin/ssl-path-train experiment=learn_cpu hydra.run.dir="$OUT" trainer.enable_progress_bar=false "$@"
echo "training wall time: $(( $(date +%s) - start )) s"
.venv/bin/ssl-path-eval data.root="$SHARED/tiles/kather2016-100" output="$OUT/eval" checkpoint="$OUT" \
    model_name=learn_cpu 'split.seeds=[0,1,2]' 'probes.knn_k=[20]'
.venv/bin/python scripts/plot_learning.py "$OUT" --out "$OUT/learning.png" --title "experiment=learn_cpu"
