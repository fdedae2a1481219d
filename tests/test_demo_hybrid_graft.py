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
    graft's choice of units is forced). In transformers, the grafted hybrid aligner's response to a change of the
    low-resolution features equals the donor aligner's exactly, whatever the high-resolution features; its
    high-resolution half is the hybrid's own initialisation (the response to a change of those is the random
    model's)."""
    from transformers import DeepseekVLForConditionalGeneration, DeepseekVLHybridForConditionalGeneration

    *_, donor_dir = generation_checkpoints("vl")
    *_, hybrid_dir = generation_checkpoints("hybrid")
    donor = tmp_path / "donor"
    shutil.copytree(donor_dir, donor)
    tensors = load_file(str(donor / "model.safetensors"))
    w2 = tensors["model.aligner.linear2.weight"]
    unused = np.random.default_rng(0).permutation(w2.shape[1])[:w2.shape[1] // 2]
    w2[:, unused] = 0.0
    save_file(tensors, str(donor / "model.safetensors"), metadata={"format": "pt"})
    target = shutil.copytree(hybrid_dir, tmp_path / "hybrid")
    out = subprocess.run([sys.executable, SCRIPT, str(donor), str(target)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr

    theirs = DeepseekVLForConditionalGeneration.from_pretrained(str(donor)).eval().model.aligner
    grafted = DeepseekVLHybridForConditionalGeneration.from_pretrained(str(target)).eval().model.aligner
    random = DeepseekVLHybridForConditionalGeneration.from_pretrained(hybrid_dir).eval().model.aligner
    g = torch.Generator().manual_seed(0)
    dv, ch = grafted.vision_proj.in_features, grafted.high_res_vision_proj.in_features
    low, low2 = torch.randn(2, 5, dv, generator=g), torch.randn(2, 5, dv, generator=g)
    high, high2 = torch.randn(2, 5, ch, generator=g), torch.randn(2, 5, ch, generator=g)
    with torch.no_grad():
        expected = (theirs(low) - theirs(low2)).numpy()
        for h in (high, high2):
            # float32 sums: measured up to 1.5e-6
            np.testing.assert_allclose((grafted(low, h) - grafted(low2, h)).numpy(), expected, atol=5e-6)
        assert np.abs((random(low, high) - random(low2, high)).numpy() - expected).max() > 1e-2
        np.testing.assert_allclose((grafted(low, high) - grafted(low, high2)).numpy(),
                                   (random(low, high) - random(low, high2)).numpy(), atol=5e-6)
