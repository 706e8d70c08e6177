#!/usr/bin/env bash
# Rebuilds the bundled demo assets in python/expertflow/demo/assets/ from the five-domain corpus:
# trains the demo MoE model (about an hour on 2 CPU cores), records its routing on the corpus's
# training part (for the predictor) and on the held-out part (for the reports and benchmarks),
# and trains the routing predictors. Every step is deterministic for a given seed and threads.
#
#   bash scripts/demo_assets.sh ../shared/data/corpus [WORK_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
corpus="${1:?usage: bash scripts/demo_assets.sh CORPUS_DIR [WORK_DIR]}"
work="${2:-$ROOT/build/demo-assets}"
VENV="${EXPERTFLOW_VENV:-$ROOT/.venv}"
py="$VENV/bin/python"
assets="$ROOT/python/expertflow/demo/assets"
mkdir -p "$work" "$assets"

if [ ! -f "$work/demo-moe/model.safetensors" ]; then
  "$py" -m expertflow.demo.training --corpus "$corpus" --out "$work/demo-moe" \
    --steps 3000 --eval-every 500 | tee "$work/train_model.log"
fi
# Phase 2: experts the router left (nearly) unused are split off their layer's busiest expert,
# then 600 more steps with a stronger load-balancing loss let the copies diverge.
if [ ! -f "$work/demo-moe-2/model.safetensors" ]; then
  "$py" -m expertflow.demo.training --corpus "$corpus" --init-from "$work/demo-moe" \
    --out "$work/demo-moe-2" --steps 600 --lr 5e-4 --warmup 20 --aux-loss-coef 0.05 \
    --revive-dead-experts --eval-every 300 --seed 1 | tee "$work/train_model_2.log"
fi
rm -rf "$assets/demo-moe"
mkdir -p "$assets/demo-moe"
cp "$work"/demo-moe-2/{config.json,generation_config.json,model.safetensors,tokenizer.json,tokenizer_config.json,training.json} \
  "$assets/demo-moe/"

# Routing of the training part (first 90% of each file, never the held-out 10%): up to 3000
# windows of 128 tokens per domain (Shakespeare has fewer), about 1.9M tokens.
"$py" -m expertflow trace --text "$corpus"/*.txt --end-fraction 0.9 --prompt-tokens 128 \
  --max-sequences 3000 --batch-size 16 --out "$work/train.npz"
# Routing of the held-out part (last 10%), with what gate lookahead would pick.
"$py" -m expertflow trace --text "$corpus"/*.txt --skip-fraction 0.9 --prompt-tokens 128 \
  --max-sequences 64 --batch-size 16 --lookahead --out "$work/held.npz"

# The bundled routing predictor, also the one bench/bench_predictor.py reads: the path
# predictor at d 160, 4 layers, 10 epochs (25 minutes on 2 cores; 90% top-2 recall held out),
# saved with bfloat16 weights. Its decode step runs natively (csrc/core/path_decoder). Its
# reuse head (128 wide, the default; 3 epochs on the trained network's features, 2 minutes)
# predicts uses 1-16 tokens ahead for evictions.
"$py" -m expertflow train-predictor --kind path --traces "$work/train.npz" --epochs 10 \
  --d-model 160 --depth 4 --out "$work/path-predictor" | tee "$work/train_predictor.log"
# Cross-domain check (README): the same predictor trained without the code domain.
"$py" -m expertflow train-predictor --kind path --traces "$work/train.npz" --epochs 10 \
  --d-model 160 --depth 4 --exclude-source code --out "$work/path-no-code" \
  | tee "$work/train_predictor_no_code.log"
rm -rf "$assets/demo-moe-predictor"
cp -r "$work/path-predictor" "$assets/demo-moe-predictor"
echo "assets written to $assets (traces and logs in $work)"
