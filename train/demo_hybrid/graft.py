"""Start the tiny hybrid from the tiny DeepSeek-VL: copy its SigLIP and LLaMA weights into a freshly initialised
hybrid model (as DeepSeek-VL-Hybrid starts from pretrained towers); SAM, its neck, projection and alpha, and the
hybrid aligner keep their random initialisation.

    python train/demo_hybrid/graft.py DONOR_DIR MODEL_DIR    (rewrites MODEL_DIR/model.safetensors in place)

Every donor tensor of `model.vision_model.*` and `model.language_model.*` must have its twin, of the same shape, in
the hybrid (the configs of those towers must match); anything else is an error, never a silent partial copy."""

import os
import sys

from safetensors import safe_open
from safetensors.numpy import save_file

TOWERS = ("model.vision_model.", "model.language_model.")


def graft(donor: str, model: str) -> int:
    path = os.path.join(model, "model.safetensors")
    with safe_open(os.path.join(donor, "model.safetensors"), "np") as d, safe_open(path, "np") as m:
        tensors = {k: m.get_tensor(k) for k in m.keys()}
        metadata = m.metadata()
        copied = 0
        for k in d.keys():
            if not k.startswith(TOWERS):
                continue
            v = d.get_tensor(k)
            if k not in tensors or tensors[k].shape != v.shape:
                sys.exit(f"error: {k} {v.shape} has no twin of that shape in {model}; make the hybrid's "
                         "vision_config and text_config equal the donor's")
            tensors[k] = v
            copied += 1
    save_file(tensors, path + ".partial", metadata=metadata)
    os.replace(path + ".partial", path)
    print(f"copied {copied} SigLIP and LLaMA tensors from {donor} into {model}; "
          f"{len(tensors) - copied} tensors keep their initialisation")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(graft(sys.argv[1], sys.argv[2]))
