#!/usr/bin/env bash
# Reproduce the tiny DeepSeek-VL-Hybrid shipped in models/deepseek-vl-hybrid-tiny: striped fine-detail data (1-px
# stripes filling the shapes of half the pictures, shown at the SAM tower's 128 px and averaged away at SigLIP's
# 64 px) -> random hybrid init -> SigLIP, LLaMA and half the aligner grafted from the shipped tiny model (SAM half
# amplified) -> two stages (the stripes question alone, then chats mixing it
# with the ordinary questions), SigLIP frozen -> export ->
# evaluation, and the same evaluation with the high-resolution tower's contribution removed (the ablation).
#   bash train/demo_hybrid/make_demo_hybrid_model.sh [OUT=models/deepseek-vl-hybrid-tiny]
#   (WORK=runs/demo_hybrid_stripes, DONOR=models/deepseek-vl-tiny by default)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-models/deepseek-vl-hybrid-tiny}
WORK=${WORK:-runs/demo_hybrid_stripes}
DONOR=${DONOR:-models/deepseek-vl-tiny}
PYTHON=${PYTHON:-python}
DEMO=train/demo_hybrid
mkdir -p "$WORK"
source train/stages.sh
[ -f "$DONOR/config.json" ] || { echo "error: no donor model at $DONOR; give DONOR=<a tiny DeepSeek-VL directory>" >&2; exit 2; }

[ -f "$WORK/data/heldout.jsonl" ] || run "$PYTHON" "$DEMO/make_data.py" "$WORK/data" "$DONOR" --train 4000 --seed 1
if [ ! -f "$WORK/init/config.json" ]; then
  run deepseek-vl-jax init "$WORK/init.tmp" --config "$DEMO/model_config.json" --processor "$WORK/data/processor" \
    --seed 0 --force
  # the SAM half made as loud as SigLIP's, its patch filters row-alternating (graft.py; probe.py reads the stripes
  # from the embeddings at 0.89 after this graft, 0.51 without)
  run "$PYTHON" "$DEMO/graft.py" "$DONOR" "$WORK/init.tmp" --sam-gain 1.4 --sam-feature-gain 4 --alternating-filters 64
  mv "$WORK/init.tmp" "$WORK/init"
fi

# stage 1: the stripes question alone (LLaMA learns to read the SAM half); stage 2: mixed chats bring the ordinary
# answers back (results/probes.json, probes H and I)
run_stages "$WORK" "$DEMO" "$WORK/init" stage1_stripes_only:data/stripes stage2_mixed:data/train stage3_mixed:data/train
prev=$STAGES_OUT

rm -rf "$OUT.new" && cp -r "$prev" "$OUT.new" && rm -rf "$OUT" && mv "$OUT.new" "$OUT"
for split in heldout heldout_plain heldout_gradient; do
  run deepseek-vl-jax evaluate --model "$OUT" --data "$WORK/data/$split.jsonl" --batch-size 50 --max-new-tokens 6
done
# The ablation: the stripes questions with alpha and the SAM features zeroed (deepseek_vl_jax/synthetic/ablation.py).
for split in heldout_stripes heldout; do
  run "$PYTHON" -m deepseek_vl_jax.synthetic.ablation --model "$OUT" --data "$WORK/data/$split.jsonl"
done
