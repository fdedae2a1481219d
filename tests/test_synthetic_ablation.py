"""The high-resolution ablation (synthetic/ablation.py) and the hybrid recipe's graft step
(train/demo_hybrid/graft.py), on tiny random checkpoints built with transformers."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from deepseek_vl_jax.synthetic.ablation import without_high_res

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pixels(cfg, seed):
    rng = np.random.default_rng(seed)
    v, h = cfg.vision_config, cfg.high_res_vision_config
    return (rng.normal(size=(2, 3, v.image_size, v.image_size)).astype(np.float32),
            rng.normal(size=(2, 3, h.image_size, h.image_size)).astype(np.float32))


def test_ablation_removes_the_high_res_features_as_transformers_would(generation_checkpoints):
    """Ablated: the image features no longer depend on the high-resolution pixels, and equal transformers' model
    with the same two weights zeroed (alpha, the projection's last convolution); the unablated model's do depend."""
    cfg, ref, model, _ = generation_checkpoints("hybrid")
    low, high = _pixels(cfg, 0)
    _, other_high = _pixels(cfg, 1)
    ablated = without_high_res(model)
    full = np.asarray(model.get_image_features(low, high))
    assert np.abs(full - np.asarray(model.get_image_features(low, other_high))).max() > 1e-3
    ours = np.asarray(ablated.get_image_features(low, high))
    np.testing.assert_array_equal(ours, np.asarray(ablated.get_image_features(low, other_high)))
    assert np.abs(ours - full).max() > 1e-3
    import copy
    twin = copy.deepcopy(ref)
    with torch.no_grad():
        twin.model.high_res_vision_alpha.zero_()
        twin.model.high_res_vision_proj.conv2.weight.zero_()
        theirs = twin.model.get_image_features(torch.from_numpy(low), torch.from_numpy(high)).pooler_output.numpy()
    np.testing.assert_allclose(ours.reshape(theirs.shape), theirs, atol=4e-6)  # measured 2.6e-6
    assert np.asarray(model.params["high_res_vision_alpha"]).any()  # the original model is left as it was


def test_ablation_needs_a_hybrid_model(generation_checkpoints):
    with pytest.raises(ValueError, match="not a hybrid"):
        without_high_res(generation_checkpoints("vl")[2])


def test_graft_copies_siglip_and_llama_and_keeps_the_rest(generation_checkpoints, tmp_path):
    """Donor: a DeepSeek-VL with the hybrid's SigLIP and LLaMA configs. Its towers land in the hybrid bit for bit;
    SAM, neck, projection and alpha keep their own weights (the aligner is seeded from the donor's:
    tests/test_demo_hybrid_graft.py); a donor whose towers do not fit is refused in one line and the target is left
    untouched."""
    *_, donor = generation_checkpoints("vl")
    *_, hybrid = generation_checkpoints("hybrid")
    target = shutil.copytree(hybrid, tmp_path / "hybrid")
    before = load_file(os.path.join(target, "model.safetensors"))
    script = os.path.join(REPO, "train", "demo_hybrid", "graft.py")
    out = subprocess.run([sys.executable, script, donor, str(target)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    after, source = load_file(os.path.join(target, "model.safetensors")), load_file(os.path.join(donor,
                                                                                                 "model.safetensors"))
    towers = [k for k in source if k.startswith(("model.vision_model.", "model.language_model."))]
    assert towers and all(np.array_equal(after[k], source[k]) for k in towers)
    assert any(not np.array_equal(before[k], source[k]) for k in towers)  # the copy changed something
    rest = [k for k in after if k not in towers and not k.startswith("model.aligner.")]
    assert any("high_res" in k for k in rest) and all(np.array_equal(after[k], before[k]) for k in rest)

    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(os.path.join(donor, "config.json"), bad)
    tensors = dict(source)
    tensors[towers[0]] = np.zeros((3, 3), np.float32)
    from safetensors.numpy import save_file
    save_file(tensors, str(bad / "model.safetensors"))
    kept = (tmp_path / "hybrid" / "model.safetensors").read_bytes()
    out = subprocess.run([sys.executable, script, str(bad), str(target)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "no twin of that shape" in out.stderr, out.stderr
    assert (tmp_path / "hybrid" / "model.safetensors").read_bytes() == kept
