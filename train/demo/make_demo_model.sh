#!/usr/bin/env bash
# Reproduce the demo model shipped in models/deepseek-vl-tiny: synthetic data -> tokenizer -> random init ->
# DeepSeek-VL's three training stages -> a fourth stage on pictures drawn in randomised styles -> a fifth, longer one
# on the styled questions with styled captions mixed back in -> a sixth and seventh on pictures of 2-3 shapes mixed
# with the styled set -> an eighth with side-only chats mixed in -> export -> evaluation. Every step is this
# project's own CLI (and cat/sed to mix sets).
#   bash train/demo/make_demo_model.sh [OUT=models/deepseek-vl-tiny]   (WORK=runs/demo by default)
# Stages 1-3 learn the vocabulary on the original 2 x 3 grid pictures ($WORK/data); stage 4 fine-tunes on three style
# families ($WORK/styled: the grid, and free layouts on solid or noisy backgrounds). A fourth family (gradient
# backgrounds on a larger canvas) is never trained on; it has its own held-out split, as has each training family.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-models/deepseek-vl-tiny}
WORK=${WORK:-runs/demo}
DEMO=train/demo
mkdir -p "$WORK"
source train/stages.sh

[ -f "$WORK/data/heldout.jsonl" ] || run deepseek-vl-jax synthetic "$WORK/data" --train 10000 --turns 4 --heldout 300 \
  --pretrain 6000 --image-size 64 --patch-size 16 --seed 0
[ -f "$WORK/styled/heldout.jsonl" ] || run deepseek-vl-jax synthetic "$WORK/styled" --train 20000 --turns 4 \
  --heldout 300 --pretrain 10000 --image-size 64 --patch-size 16 --seed 0 --styles grid,solid,noise \
  --heldout-styles grid,solid,noise,gradient
# Stage 5's data: the styled question chats and the first 4000 styled captions ("Describe the picture."), shuffled
# together by the trainer.
[ -f "$WORK/styled/mixed5.jsonl" ] || { cat "$WORK/styled/train.jsonl"; head -n 4000 "$WORK/styled/pretrain.jsonl"; } \
  > "$WORK/styled/mixed5.jsonl"
[ -f "$WORK/init/config.json" ] || run deepseek-vl-jax init "$WORK/init" --config "$DEMO/model_config.json" \
  --processor "$WORK/data/processor" --seed 0

run_stages "$WORK" "$DEMO" "$WORK/init" stage1_aligner:data/pretrain stage2_pretrain:data/pretrain \
  stage3_sft:data/train stage4_styles_sft:styled/train stage5_mixed_sft:styled/mixed5
# Stages 6-7's data: chats and captions of 2-3 shapes, and the first 8000 styled chats and 2000 styled captions
# (their pictures hard-linked in, since a data file's images live under its directory).
if [ ! -f "$WORK/multi/mixed6.jsonl" ]; then
  [ -f "$WORK/multi/heldout.jsonl" ] || run deepseek-vl-jax synthetic "$WORK/multi" --train 20000 --turns 4 \
    --heldout 300 --pretrain 4000 --image-size 64 --patch-size 16 --seed 5 --styles grid,solid,noise --min-shapes 2 \
    --tokenizer-from "$STAGES_OUT"
  for split in train pretrain; do
    [ -d "$WORK/multi/images/styled_$split" ] || cp -al "$WORK/styled/images/$split" "$WORK/multi/images/styled_$split"
  done
  { cat "$WORK/multi/train.jsonl" "$WORK/multi/pretrain.jsonl"
    head -n 8000 "$WORK/styled/train.jsonl" | sed 's#"images/train/#"images/styled_train/#'
    head -n 2000 "$WORK/styled/pretrain.jsonl" | sed 's#"images/pretrain/#"images/styled_pretrain/#'; } \
    > "$WORK/multi/mixed6.jsonl.tmp" && mv "$WORK/multi/mixed6.jsonl.tmp" "$WORK/multi/mixed6.jsonl"
fi
# Stage 8's data: 10000 pictures of 2-3 shapes whose every turn asks a shape's side (the image features must carry
# where each shape is), styled chats 8001-20000 and styled captions 4001-7000.
[ -f "$WORK/styled/side/train.jsonl" ] || run deepseek-vl-jax synthetic "$WORK/styled/side" --train 10000 --turns 3 \
  --heldout 0 --min-shapes 2 --styles grid,solid,noise --train-kind side --image-size 64 --patch-size 16 --seed 6 \
  --tokenizer-from "$STAGES_OUT"
[ -f "$WORK/styled/mixed8.jsonl" ] || { sed 's#"images/train/#"side/images/train/#' "$WORK/styled/side/train.jsonl"
  sed -n '8001,20000p' "$WORK/styled/train.jsonl"; sed -n '4001,7000p' "$WORK/styled/pretrain.jsonl"; } \
  > "$WORK/styled/mixed8.jsonl.tmp" && mv "$WORK/styled/mixed8.jsonl.tmp" "$WORK/styled/mixed8.jsonl"
run_stages "$WORK" "$DEMO" "$STAGES_OUT" stage6_multi_sft:multi/mixed6 stage7_multi_low_lr:multi/mixed6 \
  stage8_side_sft:styled/mixed8
prev=$STAGES_OUT

rm -rf "$OUT.new" && cp -r "$prev" "$OUT.new" && rm -rf "$OUT" && mv "$OUT.new" "$OUT"
run deepseek-vl-jax evaluate --model "$OUT" --data "$WORK/data/heldout.jsonl" --batch-size 50 --max-new-tokens 6
for split in heldout heldout_grid heldout_solid heldout_noise heldout_gradient; do
  run deepseek-vl-jax evaluate --model "$OUT" --data "$WORK/styled/$split.jsonl" --batch-size 50 --max-new-tokens 6
done
