#!/usr/bin/env bash
# Set up (.venv), then answer a question about a picture with the small model shipped in models/deepseek-vl-tiny.
#   bash scripts/demo.sh [IMAGE] [QUESTION]     (MODEL=models/deepseek-vl-hybrid-tiny for the tiny hybrid)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
IMAGE=${1:-examples/shapes.png}
QUESTION=${2:-What color is the circle?}
MODEL=${MODEL:-models/deepseek-vl-tiny}
echo "Q: $QUESTION  (image: $IMAGE)"
exec deepseek-vl-jax generate --model "$MODEL" --image "$IMAGE" --prompt "$QUESTION" --max-new-tokens 16
