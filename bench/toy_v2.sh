#!/usr/bin/env bash
# Train the toy CLIP v2 (the bundled `toy`) on 2 CPU cores and evaluate it, in one go; resumable (rerun the
# same command after an interruption: training goes on from its last checkpoint, every 250 steps).
#
#   bash bench/toy_v2.sh                                  # the recipe: about 90 min of training on 2 cores
#   STEPS=20 EVAL_N=100 DIAGNOSE=300 RUN=/tmp/v2-check bash bench/toy_v2.sh   # a quick check of the script
#
# Recipe (docs/toy-model.md, "Toy CLIP v2"): open_clip config toy-v2 (64x64 images, patch 16 = a 4x4 grid,
# width 128, 6 layers x 8 heads; the v1 text tower), 10,000 steps of batch 128 (1.28 M image-caption pairs,
# never repeated), AdamW lr 1e-3 with 200 warm-up steps and cosine decay, the symmetric contrastive loss plus
# a linear probe per property on the image embedding (--probe-weight 1, dropped at export) and each image
# against one caption-vocabulary phrase per value through the text tower (--prompt-weight 0.5).
# Writes the fp16 weights, the training summary and the evaluation with the diagnosis to $RUN and $DEST.
set -euo pipefail
STEPS=${STEPS:-10000}
EVAL_N=${EVAL_N:-1000}
DIAGNOSE=${DIAGNOSE:-3000}
RUN=${RUN:-runs/toy-v2-train}
DEST=${OUT:-bench/results/toy-v2}
CLI=${CLI:-.venv/bin/clip-interpret}
mkdir -p "$DEST"
start=$(date +%s)
"$CLI" toyworld train --model toy-v2 --out "$RUN" --steps "$STEPS" --warmup 200 --lr 1e-3 \
    --probe-weight 1 --prompt-weight 0.5 --checkpoint-every 250 --device cpu --eval-n "$EVAL_N" 2>&1 \
    | tr '\r' '\n' | grep -v "^training toy CLIP:.*[0-9]%|" | tee "$DEST/train.log"
trained=$(date +%s)
[ -f "$RUN/toy.safetensors" ] || { echo "toy v2: training failed, see $DEST/train.log" >&2; exit 1; }
cp "$RUN/toy.safetensors" "$RUN/summary.json" "$DEST/"
"$CLI" toyworld eval --model "open_clip:toy-v2@$RUN/toy.safetensors" --n "$EVAL_N" --diagnose "$DIAGNOSE" \
    --device cpu --json "$DEST/eval.json" 2>&1 | tee "$DEST/eval.log"
end=$(date +%s)
echo "toy v2: trained in $(( trained - start )) s (this call), evaluated in $(( end - trained )) s; files in $DEST"
