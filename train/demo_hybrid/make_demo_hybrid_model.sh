#!/usr/bin/env bash
# The recipe of the tiny DeepSeek-VL-Hybrid in models/deepseek-vl-hybrid-tiny: striped fine-detail data (1-px
# stripes filling the shapes of half the pictures, shown at the SAM tower's 128 px and averaged away at SigLIP's
# 64 px) -> random hybrid init -> SigLIP, LLaMA and half the aligner grafted from the tiny DeepSeek-VL (SAM half
# amplified) -> three stages (the stripes question alone, then twice chats mixing it with the ordinary questions),
# SigLIP frozen -> export -> evaluation, and the same evaluation with the high-resolution tower's contribution
# removed (the ablation). Deterministic: two runs from scratch give the same model.safetensors bit for bit, the one
# shipped (results/recipe_run.json: its evaluations, its time on this machine, and the probes' model it replaced).
#   bash train/demo_hybrid/make_demo_hybrid_model.sh [OUT=models/deepseek-vl-hybrid-tiny]
#   (WORK=runs/demo_hybrid_stripes by default)
# The donor is pinned by the sha256 of its model.safetensors (DONOR_SHA256: the tiny model's stage-5 export, shipped
# in models/deepseek-vl-tiny at commit DONOR_COMMIT, which the shipped hybrid was grafted from). If
# models/deepseek-vl-tiny is another model (it has been retrained since), the recipe takes the pinned one from git
# history into $WORK/donor; DONOR=<dir> gives it from elsewhere (checked the same way).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-models/deepseek-vl-hybrid-tiny}
WORK=${WORK:-runs/demo_hybrid_stripes}
PYTHON=${PYTHON:-python}
DEMO=train/demo_hybrid
DONOR_SHA256=fdc64306b016b72d28218cf8ed66a337bb289a43820050ba933f938ae82325eb
DONOR_COMMIT=38320d48d0c6495708c6887e9c3292b8ed15aa28
mkdir -p "$WORK"
source train/stages.sh
sha256() { "$PYTHON" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"; }
is_donor() { [ -f "$1/config.json" ] && [ -f "$1/model.safetensors" ] && [ "$(sha256 "$1/model.safetensors")" = \
  "$DONOR_SHA256" ]; }
if [ -z "${DONOR:-}" ]; then
  DONOR=models/deepseek-vl-tiny
  if ! is_donor "$DONOR" && ! is_donor "$WORK/donor" && git cat-file -e "$DONOR_COMMIT" 2>/dev/null; then
    echo "+ models/deepseek-vl-tiny is not the pinned donor: taking it from commit $DONOR_COMMIT into $WORK/donor" >&2
    rm -rf "$WORK/donor.tmp" && mkdir -p "$WORK/donor.tmp"
    git archive "$DONOR_COMMIT" models/deepseek-vl-tiny | tar -x -C "$WORK/donor.tmp" --strip-components=2
    rm -rf "$WORK/donor" && mv "$WORK/donor.tmp" "$WORK/donor"
  fi
  is_donor "$DONOR" || DONOR=$WORK/donor
fi
is_donor "$DONOR" || { echo "error: $DONOR is not the donor the shipped hybrid was grafted from (model.safetensors" \
  "sha256 $DONOR_SHA256); give DONOR=DIR after mkdir DIR && git archive $DONOR_COMMIT models/deepseek-vl-tiny |" \
  "tar -x -C DIR --strip-components=2" >&2; exit 2; }

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
