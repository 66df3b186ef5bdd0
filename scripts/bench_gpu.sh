#!/usr/bin/env bash
# Issue 7's GPU measurements as one prepared call (about 9-10 minutes on one H100; the steps have their own timeouts): the reference table
# compiled, then same-run before/after ratios of the optimisations verified on CPU. Every step has
# its own timeout, so one failure or hang costs only its slot. JSON lines go to $OUT/train.jsonl.
#   bash scripts/bench_gpu.sh            (with PYTHONPATH set by scripts/gpu_site.sh where needed)
# From a session with the device tool: run(command="bash scripts/bench_gpu.sh", carry=[".gpu_site",
# "runs/data/bundled"], timeout_s=600) after `bash scripts/gpu_site.sh` and `bash scripts/quickstart.sh`.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/.gpu_site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-runs/bench}
mkdir -p "$OUT"
J="$OUT/train.jsonl"
run() {  # run SECONDS ARGS...: one bench_train invocation, its table printed
    local limit=$1
    shift
    echo "### bench_train $*"
    timeout "$limit" python scripts/bench_train.py --device cuda --json-out "$J" "$@" 2>&1 | grep -v "^{" | tail -n 12
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -c "import torch, timm, lightning; print('torch', torch.__version__, 'timm', timm.__version__, 'lightning', lightning.__version__)"
# 1. the issue's table with compiled blocks (drop path: S/B ramp to 0.1 masked, L uniform 0.3 subset)
run 240 --configs vit_s16:128,vit_b16:64,vit_l16:64 --compile --steps 8 --warmup 3
# 2. subset drop path, before/after on ViT-L (FLOPs of the dropped 30% skipped)
run 150 --configs vit_l16:64 --compile --steps 6 --warmup 3 --rounds 1 \
    --baseline model.backbone.drop_path_subset=false
# 3. packed global + local crops (the default) against two passes, on the overhead-bound ViT-S
run 90 --configs vit_s16:128 --compile --steps 8 --warmup 3 --rounds 1 --baseline method.pack_crops=false
# 4. CUDA graphs for the overhead-bound ViT-S (inductor's cudagraph trees per block)
run 90 --configs vit_s16:128 --compile --steps 8 --warmup 4 --rounds 1 \
    --set ++method.compile_options.mode=reduce-overhead --baseline ++method.compile_options.mode=default
# 5. the full loop (data + step): real shards from the bundled slides (bash scripts/quickstart.sh makes
#    runs/data/bundled; carry it along), JPEG decode in 12 workers, crops on the GPU
if [ -d runs/data/bundled/shards ]; then
    run 120 --configs vit_s16:128 --compile --steps 8 --warmup 3 \
        --data runs/data/bundled --device-augment --workers 12
fi
echo "JSON lines: $J"
