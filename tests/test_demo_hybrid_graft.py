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


def test_graft_options_amplify_the_sam_half(generation_checkpoints, tmp_path):
    """--sam-gain K, --sam-feature-gain C, --alternating-filters N: in transformers the grafted aligner's response
    to a change of the high-resolution features is K times the random model's; the last SAM projection conv is C
    times the random one; the first N patch filters keep their magnitudes with signs alternating row by row, the
    others are unchanged. An N above SAM's filter count is a one-line error that leaves the model untouched."""
    from transformers import DeepseekVLHybridForConditionalGeneration

    *_, donor_dir = generation_checkpoints("vl")
    *_, hybrid_dir = generation_checkpoints("hybrid")
    target = shutil.copytree(hybrid_dir, tmp_path / "hybrid")
    n, k, c = 3, 2.5, 4.0
    cmd = [sys.executable, SCRIPT, donor_dir, str(target), "--sam-gain", str(k), "--sam-feature-gain", str(c)]
    out = subprocess.run(cmd + ["--alternating-filters", str(n)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr

    grafted = DeepseekVLHybridForConditionalGeneration.from_pretrained(str(target)).eval().model
    random = DeepseekVLHybridForConditionalGeneration.from_pretrained(hybrid_dir).eval().model
    g = torch.Generator().manual_seed(0)
    ch = grafted.aligner.high_res_vision_proj.in_features
    low = torch.randn(2, 5, grafted.aligner.vision_proj.in_features, generator=g)
    high, high2 = torch.randn(2, 5, ch, generator=g), torch.randn(2, 5, ch, generator=g)
    with torch.no_grad():
        np.testing.assert_allclose((grafted.aligner(low, high) - grafted.aligner(low, high2)).numpy(),
                                   k * (random.aligner(low, high) - random.aligner(low, high2)).numpy(), atol=1e-5)
        np.testing.assert_allclose(grafted.high_res_vision_proj.conv2.weight.numpy(),
                                   c * random.high_res_vision_proj.conv2.weight.numpy(), rtol=1e-6)
        ours = grafted.high_res_vision_model.vision_encoder.patch_embed.projection.weight.numpy()
        theirs = random.high_res_vision_model.vision_encoder.patch_embed.projection.weight.numpy()
    np.testing.assert_array_equal(np.abs(ours), np.abs(theirs))
    np.testing.assert_array_equal(ours[n:], theirs[n:])
    signs = np.sign(ours[:n])
    assert (signs[:, :, 1:, :] == -signs[:, :, :-1, :]).all() and not np.array_equal(ours[:n], theirs[:n])

    before = (target / "model.safetensors").read_bytes()
    out = subprocess.run(cmd + ["--alternating-filters", str(ours.shape[0] + 1)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and out.stderr.strip().startswith("error: --alternating-filters")
    assert len(out.stderr.strip().splitlines()) == 1 and (target / "model.safetensors").read_bytes() == before


def test_the_recipe_refuses_another_donor(generation_checkpoints, tmp_path):
    """make_demo_hybrid_model.sh grafts only the donor the shipped hybrid came from (pinned by the sha256 of its
    model.safetensors): another tiny DeepSeek-VL is a one-line error that says how to get the pinned one, before
    any data is drawn."""
    *_, donor_dir = generation_checkpoints("vl")
    recipe = os.path.join(REPO, "train", "demo_hybrid", "make_demo_hybrid_model.sh")
    env = dict(os.environ, WORK=str(tmp_path / "work"), DONOR=donor_dir, PYTHON=sys.executable)
    out = subprocess.run(["bash", recipe, str(tmp_path / "out")], capture_output=True, text=True, timeout=60, env=env)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: {donor_dir} is not the donor") and "git archive" in lines[0], lines[0]
    assert os.listdir(tmp_path / "work") == [] and not (tmp_path / "out").exists()
