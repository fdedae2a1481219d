# Sourced by the demo recipes: `run` echoes and runs a command; `run_stages WORK CONFIGS PREV NAME:DATA...` trains
# each stage NAME (config CONFIGS/NAME.json) on WORK/DATA.jsonl from the previous stage's export (PREV first), with
# WORK/<DATA's directory>/heldout.jsonl as its evaluation set, and exports it to WORK/NAME-hf. Re-running resumes an
# interrupted stage; a finished stage's export is reused. Sets STAGES_OUT to the last stage's export.
run() { echo "+ $*" >&2; "$@"; }

run_stages() {
  local work=$1 configs=$2 prev=$3 stage name data
  shift 3
  for stage in "$@"; do
    name=${stage%%:*}; data=${stage##*:}
    if [ ! -f "$work/$name-hf/config.json" ]; then
      run deepseek-vl-jax train --model "$prev" --data "$work/$data.jsonl" --output "$work/$name" \
        --config "$configs/$name.json" --eval-data "$work/${data%/*}/heldout.jsonl"
      run deepseek-vl-jax export "$work/$name" "$work/$name-hf"
    fi
    prev="$work/$name-hf"
  done
  STAGES_OUT=$prev
}
