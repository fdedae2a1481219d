"""Parity of deepseek_vl_jax.high_res (and the hybrid high-resolution path) with transformers 5.23.0 (float32, CPU).

Tolerances: `resize_bilinear` max abs error <= 1e-6 vs torch `F.interpolate(mode="bilinear", align_corners=False)`;
modules and the full path: max relative error max|ours - HF| / max|HF| <= 1e-5 (RTOL).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import DeepseekVLHybridConfig, DeepseekVLHybridModel, SamVisionConfig
from transformers.models.deepseek_vl_hybrid.modeling_deepseek_vl_hybrid import (DeepseekVLSamVisionNeck,
                                                                                 DeepseekVLSamVisionProj)

from deepseek_vl_jax.config import SamConfig
from deepseek_vl_jax.hf_mapping import hf_to_flax
from deepseek_vl_jax.high_res import HighResProjection, fuse_high_res, resize_bilinear
from deepseek_vl_jax.sam import SamNeck, SamVisionEncoder
from test_sam import hf_to_flax_params, perturb_, rel_err, sam_configs

RTOL = 1e-5
ATOL_RESIZE = 1e-6


# ---------------------------------------------------------------------------------------------------------------
# resize


@pytest.mark.parametrize("in_hw,out_hw", [((64, 64), (96, 96)),  # up, the real model's 64 -> 96
                                          ((96, 96), (40, 40)),  # down (no antialiasing)
                                          ((30, 50), (45, 20)),  # non-square, up in h and down in w
                                          ((7, 5), (16, 3)),
                                          ((12, 12), (12, 12))])  # same size: identity
def test_resize_bilinear_matches_torch(in_hw, out_hw):
    """max abs err <= 1e-6 vs torch F.interpolate(bilinear, align_corners=False)."""
    x = np.random.default_rng(sum(in_hw) + sum(out_hw)).standard_normal((2, 3, *in_hw)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x), size=out_hw, mode="bilinear", align_corners=False).numpy()
    ours = np.asarray(jax.jit(resize_bilinear, static_argnums=1)(jnp.asarray(x.transpose(0, 2, 3, 1)), out_hw))
    assert ours.shape == (2, *out_hw, 3)
    err = float(np.max(np.abs(ours.transpose(0, 3, 1, 2) - ref)))
    print(f"resize {in_hw}->{out_hw} max abs err {err:.2e}")
    assert err <= ATOL_RESIZE, f"max abs err {err:.2e}"


def test_resize_bilinear_differs_from_antialiased_jax_resize():
    """The reason for our own resize: jax.image.resize antialiases when downsampling, torch does not."""
    x = np.random.default_rng(0).standard_normal((1, 96, 96, 2)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(40, 40), mode="bilinear",
                        align_corners=False).numpy().transpose(0, 2, 3, 1)
    jax_aa = np.asarray(jax.image.resize(jnp.asarray(x), (1, 40, 40, 2), "bilinear"))
    assert np.max(np.abs(jax_aa - ref)) > 1e-2
    assert np.max(np.abs(np.asarray(resize_bilinear(jnp.asarray(x), (40, 40))) - ref)) <= ATOL_RESIZE


# ---------------------------------------------------------------------------------------------------------------
# projection and neck


def _tiny_sam() -> tuple[SamVisionConfig, SamConfig]:
    return sam_configs()  # hidden 32, output_channels 16, 8x8 tokens


def test_projection_matches_hf():
    """HighResProjection vs DeepseekVLSamVisionProj (resize 8 -> 24, two stride-2 convs -> 6x6x64); rel err <= 1e-5."""
    hf_cfg, cfg = _tiny_sam()
    torch.manual_seed(0)
    hf = DeepseekVLSamVisionProj(hf_cfg, output_size=6).eval()
    perturb_(hf, seed=5)
    x = np.random.default_rng(3).standard_normal((2, 16, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(x)).numpy()
    assert ref.shape == (2, 64, 6, 6)
    model = HighResProjection(cfg, output_size=6)
    xn = jnp.asarray(x.transpose(0, 2, 3, 1))
    template = jax.eval_shape(model.init, jax.random.key(0), xn)["params"]
    params = hf_to_flax_params(hf.state_dict(), template)
    ours = jax.jit(model.apply)({"params": params}, xn)
    err = rel_err(ours, ref.transpose(0, 2, 3, 1))
    print(f"projection rel err {err:.2e}")
    assert err <= RTOL


def test_projection_padding_is_torch_not_same():
    """A stride-2 "SAME" conv on an even size pads (0, 1); torch's padding=1 pads (1, 1). Check we differ from SAME."""
    hf_cfg, cfg = _tiny_sam()
    torch.manual_seed(0)
    hf = DeepseekVLSamVisionProj(hf_cfg, output_size=6).eval()
    perturb_(hf, seed=5)
    x = np.random.default_rng(3).standard_normal((1, 24, 24, 16)).astype(np.float32)
    w = jnp.asarray(hf.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
    conv = lambda pad: jax.lax.conv_general_dilated(jnp.asarray(x), w, (2, 2), pad,
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
    with torch.no_grad():
        ref = hf.conv1(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    assert rel_err(conv(((1, 1), (1, 1))), ref) <= RTOL
    assert rel_err(conv("SAME"), ref) > 1e-2


def test_neck_matches_hf():
    """SamNeck vs DeepseekVLSamVisionNeck (1x1 conv, LN2d, 3x3 conv, LN2d); rel err <= 1e-5."""
    hf_cfg, cfg = _tiny_sam()
    torch.manual_seed(0)
    hf = DeepseekVLSamVisionNeck(hf_cfg).eval()
    perturb_(hf, seed=6)
    x = np.random.default_rng(4).standard_normal((2, 8, 8, 32)).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(x)).numpy()  # NHWC in, NCHW out
    model = SamNeck(cfg)
    template = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(x))["params"]
    params = hf_to_flax_params(hf.state_dict(), template)
    ours = jax.jit(model.apply)({"params": params}, jnp.asarray(x))
    assert ours.shape == (2, 8, 8, 16)
    err = rel_err(ours, ref.transpose(0, 2, 3, 1))
    print(f"neck rel err {err:.2e}")
    assert err <= RTOL


def test_fuse_high_res():
    """last + global * alpha, flattened row-major like HF's permute(0, 2, 3, 1).reshape(B, -1, C) of NCHW."""
    rng = np.random.default_rng(7)
    last, glob = (rng.standard_normal((2, 64, 3, 5)).astype(np.float32) for _ in range(2))  # NCHW
    alpha = np.array([0.3], np.float32)
    ref = torch.from_numpy(last) + torch.from_numpy(glob) * torch.from_numpy(alpha)
    ref = ref.permute(0, 2, 3, 1).reshape(2, -1, 64).numpy()
    ours = fuse_high_res(jnp.asarray(last.transpose(0, 2, 3, 1)), jnp.asarray(glob.transpose(0, 2, 3, 1)),
                         jnp.asarray(alpha))
    assert ours.shape == (2, 15, 64)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# the full high-resolution path of the hybrid model


def test_high_res_path_matches_hf_hybrid():
    """get_high_res_image_features of a tiny DeepseekVLHybridModel (alpha 0.7) vs encoder -> neck -> proj -> fuse
    wired as documented in high_res.py; rel err <= 1e-5."""
    hf_sam, cfg = sam_configs(global_attn_indexes=(1, 3))
    config = DeepseekVLHybridConfig(
        text_config=dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=24, patch_size=4),  # 6x6 tokens
        high_res_vision_config=hf_sam.to_dict(),
    )
    torch.manual_seed(0)
    hf = DeepseekVLHybridModel(config).eval()
    assert hf.output_size == 6 and hf.global_attn_index == 1
    perturb_(hf, seed=8, overrides={"high_res_vision_alpha": 0.7})
    assert float(hf.high_res_vision_alpha.detach()) == pytest.approx(0.7)
    pixels = np.random.default_rng(9).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ref = hf.get_high_res_image_features(torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert ref.shape == (2, 36, 64)

    # Load with the library converter under the joined model's real names (model.py / HF keys):
    # high_res_vision_model <- model.high_res_vision_model.vision_encoder.*, high_res_vision_neck, _proj, _alpha.
    tensors = {f"model.{k}": v.numpy() for k, v in hf.state_dict().items() if k.startswith("high_res_vision_")}
    g = cfg.global_attn_indexes[0]
    encoder = SamVisionEncoder(cfg)
    neck = SamNeck(cfg)
    proj = HighResProjection(cfg, output_size=6)
    init = lambda m, shape: nn.unbox(jax.eval_shape(m.init, jax.random.key(0), jnp.zeros(shape))["params"])
    template = {"high_res_vision_model": init(encoder, (1, 3, 64, 64)),
                "high_res_vision_neck": init(neck, (1, 8, 8, 32)),
                "high_res_vision_proj": init(proj, (1, 8, 8, 16)),
                "high_res_vision_alpha": jax.ShapeDtypeStruct((1,), jnp.float32)}
    params = hf_to_flax(tensors, template)  # raises unless every key is used and every leaf filled
    p_enc, p_neck, p_proj = (params[k] for k in ("high_res_vision_model", "high_res_vision_neck",
                                                 "high_res_vision_proj"))
    alpha = jnp.asarray(params["high_res_vision_alpha"])
    assert float(alpha[0]) == pytest.approx(0.7)

    @jax.jit
    def high_res(pixel_values):
        neck_out, (hidden,) = encoder.apply({"params": p_enc}, pixel_values, keep_hidden=(g + 1,))
        last = proj.apply({"params": p_proj}, neck_out)
        glob = proj.apply({"params": p_proj}, neck.apply({"params": p_neck}, hidden))  # the same proj, twice
        return fuse_high_res(last, glob, alpha), glob

    ours, glob = high_res(jnp.asarray(pixels))
    err = rel_err(ours, ref)
    print(f"high-res path rel err {err:.2e}")
    assert err <= RTOL
    # the global branch contributes visibly (so a wrong hidden-state index, neck or alpha would fail above)
    assert float(jnp.max(jnp.abs(glob * alpha))) > 0.05 * float(np.max(np.abs(ref)))


def test_model_high_res_features_method_matches_hf(tmp_path):
    """The joined model's own `DeepseekVL.high_res_features` (not the modules wired by hand, as above) vs
    transformers' `get_high_res_image_features`, through save_pretrained -> load_pretrained."""
    import deepseek_vl_jax as D
    import hf_fixtures as HF

    hf = HF.make_model(HF.make_config(hybrid=True), seed=4)
    with torch.no_grad():
        hf.model.high_res_vision_alpha.fill_(0.7)
    model = D.load_pretrained(HF.save(hf, tmp_path / "hf"), dtype="float32", progress=False)
    size = HF.SAM["image_size"]
    pixels = np.random.default_rng(5).standard_normal((2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        ref = hf.model.get_high_res_image_features(torch.from_numpy(pixels)).last_hidden_state.numpy()
    ours = model.module.apply({"params": model.params}, pixels, method="high_res_features")
    assert ours.shape == ref.shape and rel_err(ours, ref) <= RTOL
