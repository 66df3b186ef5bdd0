#!/usr/bin/env bash
# The test command (README, .ci/run): install, bring up a real one-node SLURM cluster on localhost,
# run the whole pytest suite, tear the cluster down. Extra args go to pytest.
# pytest exits non-zero (5) when it collects no test, so an empty run fails here too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash slurm/local_cluster.sh up
trap 'bash slurm/local_cluster.sh down || true' EXIT
export WANDB_MODE=offline WANDB_SILENT=true
.venv/bin/python -m pytest tests "$@"
