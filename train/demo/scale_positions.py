"""Scale the SigLIP position embeddings of an exported model (a weight edit; the architecture is unchanged).

The demo model's patch embeddings reach an RMS of ~3.6 while its position embeddings, initialised at 0.02 and moved
by Adam at most ~learning rate per step, stay at ~0.08: a 40x gap, so SigLIP's output no longer tells a token's
column (train/demo/results/position_probe_stage8.json) and the language model must recover where a shape is
from causal attention alone. Scaling the table by FACTOR makes SigLIP's output tell the column again (x25: 1.0).
Tried as a stage 9 (train/demo/trial_stage9_positions_sft.json, not in the recipe): the trained aligner dropped most
of it and the model came out worse than stage 8 (train/demo/results/heldout_exact_match.json, "not shipped: stage 9").

    python train/demo/scale_positions.py MODEL_DIR OUT_DIR FACTOR
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import numpy as np
from safetensors.numpy import load_file, save_file

KEY = "model.vision_model.embeddings.position_embedding.weight"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("factor", type=float)
    args = p.parse_args()
    src = os.path.join(args.model, "model.safetensors")
    if not os.path.isfile(src):
        sys.exit(f"error: {src} not found; pass an exported model directory (deepseek-vl-jax export)")
    weights = load_file(src)
    if KEY not in weights:
        sys.exit(f"error: {src} has no {KEY}; pass a DeepSeek-VL export with a SigLIP tower")
    before = float(np.sqrt(np.mean(weights[KEY] ** 2)))
    weights[KEY] = (weights[KEY] * np.float32(args.factor)).astype(weights[KEY].dtype)
    tmp = args.out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(args.model, tmp)
    save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(args.out, ignore_errors=True)
    os.rename(tmp, args.out)
    print(f"{KEY}: RMS {before:.4f} -> {before * args.factor:.4f} ({args.out})")


if __name__ == "__main__":
    main()
