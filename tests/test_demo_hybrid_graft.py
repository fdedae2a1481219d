"""The hybrid recipe's graft (train/demo_hybrid/graft.py): the donor's MLP aligner seeds the hybrid aligner's
low-resolution half, checked in transformers (the models that load the grafted files)."""

import os
import shutil
import subprocess
import sys

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "train", "demo_hybrid", "graft.py")


def test_graft_seeds_the_hybrid_aligner_from_the_donors(generation_checkpoints, tmp_path):
    """A donor whose aligner uses only half of its hidden units (the other half's linear2 columns zeroed, so the
    graft's choice of units is forced): transformers' grafted hybrid aligner equals transformers' donor aligner on any
    features, whatever the high-resolution input (its half of `proj` starts at zero), and is not the random one."""
    from transformers import DeepseekVLForConditionalGeneration, DeepseekVLHybridForConditionalGeneration

    *_, donor_dir = generation_checkpoints("vl")
    *_, hybrid_dir = generation_checkpoints("hybrid")
    donor = tmp_path / "donor"
    shutil.copytree(donor_dir, donor)
    tensors = load_file(str(donor / "model.safetensors"))
    w2 = tensors["model.aligner.linear2.weight"]
    half = w2.shape[1] // 2
    unused = np.random.default_rng(0).permutation(w2.shape[1])[:half]
    w2[:, unused] = 0.0
    save_file(tensors, str(donor / "model.safetensors"), metadata={"format": "pt"})
    target = shutil.copytree(hybrid_dir, tmp_path / "hybrid")
    out = subprocess.run([sys.executable, SCRIPT, str(donor), str(target)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr

    theirs = DeepseekVLForConditionalGeneration.from_pretrained(str(donor)).eval().model.aligner
    grafted = DeepseekVLHybridForConditionalGeneration.from_pretrained(str(target)).eval().model.aligner
    random = DeepseekVLHybridForConditionalGeneration.from_pretrained(hybrid_dir).eval().model.aligner
    g = torch.Generator().manual_seed(0)
    low = torch.randn(2, 5, grafted.vision_proj.in_features, generator=g)
    with torch.no_grad():
        expected = theirs(low)
        for high in (torch.randn(2, 5, grafted.high_res_vision_proj.in_features, generator=g), torch.zeros(2, 5, 1)):
            high = high.expand(2, 5, grafted.high_res_vision_proj.in_features)
            np.testing.assert_allclose(grafted(low, high).numpy(), expected.numpy(), atol=1e-6)
        assert (random(low, high) - expected).abs().max() > 1e-2
