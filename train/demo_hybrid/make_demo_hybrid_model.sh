#!/usr/bin/env bash
# Reproduce the tiny DeepSeek-VL-Hybrid shipped in models/deepseek-vl-hybrid-tiny: fine-detail synthetic data (a small
# digit inside each shape, readable at the SAM tower's 128 px but not at SigLIP's 64 px) -> random hybrid init ->
# SigLIP and LLaMA grafted from the tiny model's stage 3 (run train/demo/make_demo_model.sh first) -> three training
# stages (SAM frozen, then trained) -> export -> evaluation, and the same evaluation with the high-resolution
# tower's contribution removed (the ablation).
#   bash train/demo_hybrid/make_demo_hybrid_model.sh [OUT=models/deepseek-vl-hybrid-tiny]
#   (WORK=runs/demo_hybrid, DONOR=runs/demo/stage3_sft-hf by default)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-models/deepseek-vl-hybrid-tiny}
WORK=${WORK:-runs/demo_hybrid}
DONOR=${DONOR:-runs/demo/stage3_sft-hf}
PYTHON=${PYTHON:-python}
DEMO=train/demo_hybrid
mkdir -p "$WORK"
source train/stages.sh
[ -f "$DONOR/config.json" ] || { echo "error: no donor model at $DONOR; run train/demo/make_demo_model.sh first" >&2; exit 2; }

[ -f "$WORK/data/heldout.jsonl" ] || run deepseek-vl-jax synthetic "$WORK/data" --train 8000 --turns 4 --heldout 300 \
  --pretrain 6000 --image-size 64 --patch-size 16 --high-res-size 128 --details --seed 1 --styles solid,noise \
  --heldout-styles solid,noise,gradient --tokenizer-from "$DONOR"
if [ ! -f "$WORK/init/config.json" ]; then
  run deepseek-vl-jax init "$WORK/init.tmp" --config "$DEMO/model_config.json" --processor "$WORK/data/processor" \
    --seed 0 --force
  run "$PYTHON" "$DEMO/graft.py" "$DONOR" "$WORK/init.tmp"
  mv "$WORK/init.tmp" "$WORK/init"
fi

run_stages "$WORK" "$DEMO" "$WORK/init" stage1_aligner:data/pretrain stage2_pretrain:data/pretrain \
  stage3_sft:data/train
prev=$STAGES_OUT

rm -rf "$OUT.new" && cp -r "$prev" "$OUT.new" && rm -rf "$OUT" && mv "$OUT.new" "$OUT"
for split in heldout heldout_solid heldout_noise heldout_gradient; do
  run deepseek-vl-jax evaluate --model "$OUT" --data "$WORK/data/$split.jsonl" --batch-size 50 --max-new-tokens 6
done
# The ablation: the same held-out rows with alpha and the SAM features zeroed (deepseek_vl_jax/synthetic/ablation.py).
for split in heldout heldout_gradient; do
  run "$PYTHON" -m deepseek_vl_jax.synthetic.ablation --model "$OUT" --data "$WORK/data/$split.jsonl"
done
