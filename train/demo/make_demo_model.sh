#!/usr/bin/env bash
# Reproduce the demo model shipped in models/deepseek-vl-tiny: synthetic data -> tokenizer -> random init ->
# DeepSeek-VL's three training stages -> export -> evaluation. Every step is this project's own CLI.
#   bash train/demo/make_demo_model.sh [OUT=models/deepseek-vl-tiny]   (WORK=runs/demo by default)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-models/deepseek-vl-tiny}
WORK=${WORK:-runs/demo}
DEMO=train/demo
mkdir -p "$WORK"
run() { echo "+ $*" >&2; "$@"; }

[ -f "$WORK/data/heldout.jsonl" ] || run deepseek-vl-jax synthetic "$WORK/data" --train 10000 --turns 4 --heldout 300 \
  --pretrain 6000 --image-size 64 --patch-size 16 --seed 0
[ -f "$WORK/init/config.json" ] || run deepseek-vl-jax init "$WORK/init" --config "$DEMO/model_config.json" \
  --processor "$WORK/data/processor" --seed 0

prev="$WORK/init"
for stage in stage1_aligner:pretrain stage2_pretrain:pretrain stage3_sft:train; do
  name=${stage%%:*}; data=${stage##*:}
  # Re-running resumes an interrupted stage; a finished stage's export is reused.
  if [ ! -f "$WORK/$name-hf/config.json" ]; then
    run deepseek-vl-jax train --model "$prev" --data "$WORK/data/$data.jsonl" --output "$WORK/$name" \
      --config "$DEMO/$name.json" --eval-data "$WORK/data/heldout.jsonl"
    run deepseek-vl-jax export "$WORK/$name" "$WORK/$name-hf"
  fi
  prev="$WORK/$name-hf"
done

rm -rf "$OUT.new" && cp -r "$prev" "$OUT.new" && rm -rf "$OUT" && mv "$OUT.new" "$OUT"
run deepseek-vl-jax evaluate --model "$OUT" --data "$WORK/data/heldout.jsonl"
