"""SigLIP vision tower parity with transformers' SiglipVisionModel (float32; max rel error <= 1e-6)."""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax.core import meta

from deepseek_vl_jax.config import SiglipConfig
from deepseek_vl_jax.hf_mapping import hf_to_flax
from deepseek_vl_jax.siglip import SiglipVisionModel

import hf_fixtures as F

# measured 3.4e-7 .. 3.8e-7; a LayerNorm eps of 1e-5 instead of 1e-6 moves the output by ~5e-6, so 1e-5 would not
# see it (the large-eps case below also checks that eps is read at all)
TOL = 1e-6


def _pair(use_head: bool, seed=0, **extra):
    kw = {**F.VISION, "vision_use_head": use_head, **extra}
    torch.manual_seed(seed)
    ref = F.perturb(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**kw)).eval(), seed)
    cfg = SiglipConfig.from_hf(kw)
    module = SiglipVisionModel(cfg)
    x = jax.ShapeDtypeStruct((1, 3, cfg.image_size, cfg.image_size), np.float32)
    template = meta.unbox(jax.eval_shape(module.init, jax.random.key(0), x)["params"])
    tensors = {"model.vision_model." + k: v.numpy() for k, v in ref.state_dict().items()}
    params = hf_to_flax(tensors, {"vision_model": template})["vision_model"]
    return ref, module, params


@pytest.mark.parametrize("seed,eps", [(0, None), (2, 0.3)], ids=["default-eps", "large-eps"])
def test_siglip_matches_transformers_with_head(seed, eps):
    """With the head; a large eps (0.3) changes every LayerNorm visibly, so the config's value must be the one
    used."""
    ref, module, params = _pair(use_head=True, seed=seed, **({} if eps is None else {"layer_norm_eps": eps}))
    pixels = np.random.default_rng(seed).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        out = ref(torch.from_numpy(pixels))
    last, pooled = module.apply({"params": params}, pixels)
    assert F.max_rel_err(last, out.last_hidden_state.numpy()) <= TOL
    assert F.max_rel_err(pooled, out.pooler_output.numpy()) <= TOL
    assert last.shape == (3, 16, 48) and pooled.shape == (3, 48)


def test_siglip_without_head_has_no_head_params():
    ref, module, params = _pair(use_head=False, seed=1)
    assert "head" not in params
    pixels = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        out = ref(torch.from_numpy(pixels)).last_hidden_state.numpy()
    last, pooled = module.apply({"params": params}, pixels)
    assert pooled is None
    assert F.max_rel_err(last, out) <= TOL
