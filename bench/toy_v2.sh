#!/usr/bin/env bash
# Train the toy CLIP v2 (issue 12) and evaluate it, in one go; made for one GPU (an H200 trains it in
# minutes), checked on the CPU with tiny settings:
#
#   STEPS=3 BATCH=16 WORKERS=2 DEVICE=cpu PRECISION=fp32 EVAL_N=50 DIAGNOSE=100 bash bench/toy_v2.sh
#
# On the GPU machine (no registry there; open_clip and ftfy carried as wheels in .whl/):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
#   export PYTHONPATH=/tmp/site:src && bash bench/toy_v2.sh
# (a command cut off by a time limit resumes from the last checkpoint, every 250 steps in $RUN, when
# rerun on the same machine)
#
# Recipe: open_clip config toy-v2 (patch 4, width 192, 6 layers x 8 heads; the present text tower), 2,500 steps of
# batch 1,024, lr 1e-3 with 200 warm-up steps and cosine decay, bf16 autocast, half of each batch in
# contrast groups of 8 images that differ in two of shape, size, count and position only (their captions
# name both: "three small" against "one large" holds the amount of object colour about equal, the
# shortcut that docs/toy-model.md finds behind size), the images generated on the fly by worker processes. Writes the fp16 weights, the training
# summary, and the evaluation with the diagnosis (zero-shot, linear probe, text separation per property)
# to $OUT (or bench/results/toy-v2).
set -euo pipefail
STEPS=${STEPS:-2500}
BATCH=${BATCH:-1024}
LR=${LR:-1e-3}
WARMUP=${WARMUP:-200}
GROUP=${GROUP:-8}
SHARE=${SHARE:-0.5}
N_FREE=${N_FREE:-2}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16}
WORKERS=${WORKERS:-$(( $(nproc) - 1 ))}
EVAL_N=${EVAL_N:-1000}
DIAGNOSE=${DIAGNOSE:-3000}
DEST=${OUT:-bench/results/toy-v2}
RUN=${RUN:-/tmp/toy-v2-train}
PY=${PYTHON:-python3}
mkdir -p "$DEST"
start=$(date +%s)
"$PY" -m clip_interpret toyworld train --model toy-v2 --out "$RUN" --steps "$STEPS" --batch-size "$BATCH" \
    --lr "$LR" --warmup "$WARMUP" --contrast-group "$GROUP" --contrast-share "$SHARE" --contrast-n-free "$N_FREE" \
    --device "$DEVICE" --precision "$PRECISION" --workers "$WORKERS" --checkpoint-every 250 \
    --eval-n "$EVAL_N" 2>&1 | tr '\r' '\n' | grep -v "^training toy CLIP:.*[0-9]%|" | tee "$DEST/train.log" || true
trained=$(date +%s)
[ -f "$RUN/toy.safetensors" ] || { echo "toy v2: training failed, see $DEST/train.log" >&2; exit 1; }
cp "$RUN/toy.safetensors" "$RUN/summary.json" "$DEST/"
"$PY" -m clip_interpret toyworld eval --model "open_clip:toy-v2@$RUN/toy.safetensors" --n "$EVAL_N" \
    --diagnose "$DIAGNOSE" --heads --device "$DEVICE" --precision fp32 --workers "$WORKERS" \
    --json "$DEST/eval.json" 2>&1 | tee "$DEST/eval.log"
end=$(date +%s)
echo "toy v2: trained in $(( trained - start )) s, evaluated in $(( end - trained )) s on $DEVICE ($(nproc) cores); files in $DEST"
