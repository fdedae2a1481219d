"""The hybrid model's high-resolution path after the SAM encoder: bilinear resize, the two stride-2 convolutions,
and the alpha-weighted fusion of the first global layer's features.

How the joined model wires these (transformers `DeepseekVLHybridModel.get_high_res_image_features`):

    g = config.high_res.global_attn_indexes[0]
    neck_out, (hidden,) = SamVisionEncoder(name="high_res_vision_model/vision_encoder")(high_res_pixels,
                                                                                         keep_hidden=(g + 1,))
    #   hidden: the output of layer g (index 0 of HF's hidden_states is the embeddings, hence g + 1)
    proj = HighResProjection(cfg, output_size=siglip.image_size // siglip.patch_size, name="high_res_vision_proj")
    last = proj(neck_out)                                                  # [B, 24, 24, 4C]
    glob = proj(SamNeck(cfg, name="high_res_vision_neck")(hidden))         # the SAME proj module, applied twice
    features = fuse_high_res(last, glob, alpha)                            # [B, 576, 4C]
    #   alpha: a [1] parameter `high_res_vision_alpha` (logical axis SCALAR), zero-initialised

HF reuses `high_res_vision_proj` for both paths. This matches the original DeepSeek-VL code
(`deepseek_vl/models/sam.py`, `ImageEncoderViT` with `sam_hd=True`): it has one `downsamples` Sequential used for both
the main path and the HD path (a separate `downsamples_hd` is commented out there), a deep-copied `neck_hd`, and the
scalar `hd_alpha_downsamples`; the HD path takes the first block with `window_size == 0` (= global_attn_indexes[0]).
transformers' conversion script (`convert_deepseek_vl_hybrid_weights_to_hf.py`) maps
`vision_tower_high.vision_tower.downsamples.{0,1}.weight -> model.high_res_vision_proj.conv{1,2}.weight`,
`...neck_hd.{0,1,2,3} -> model.high_res_vision_neck.{conv1,layer_norm1,conv2,layer_norm2}`,
`...hd_alpha_downsamples -> model.high_res_vision_alpha`. There is no second projection to load.

The original resizes in float32 (`F.interpolate(x.float(), ...).to(dtype)`); `resize_bilinear` always computes in
float32 and casts back, so a bfloat16 model follows the original (HF interpolates in the input dtype).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_vl_jax.config import SamConfig
from deepseek_vl_jax.sam import conv2d, linear_resize_matrix


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """[B, h, w, C] -> [B, H, W, C], equal to torch `F.interpolate(mode="bilinear", align_corners=False)` on NCHW.

    No antialiasing (unlike `jax.image.resize`, which antialiases when downsampling): two taps per axis at
    half-pixel centres, negative source coordinates clamped to 0. Separable, as two small [out, in] interpolation
    matrices (float32 weights computed like torch's CPU kernel) applied with einsum in float32.
    """
    out_h, out_w = int(size[0]), int(size[1])
    _, h, w, _ = x.shape
    if (out_h, out_w) == (h, w):
        return x  # a same-size bilinear resize with align_corners=False is the identity
    xf = x.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    mh = jnp.asarray(linear_resize_matrix(h, out_h))
    mw = jnp.asarray(linear_resize_matrix(w, out_w))
    y = jnp.einsum("Hh,bhwc->bHwc", mh, xf, precision=hi)
    y = jnp.einsum("Ww,bHwc->bHWc", mw, y, precision=hi)
    return y.astype(x.dtype)


class HighResProjection(nn.Module):
    """HF `DeepseekVLSamVisionProj` on NHWC: [B, h, w, C] -> [B, output_size, output_size, 4C].

    Resize to (4 * output_size)^2, then conv1 (C -> 2C, 3x3, stride 2, padding 1, no bias) and conv2 (2C -> 4C, same).
    Padding is torch's explicit (1, 1) on both sides (not "SAME", which pads (0, 1) for stride 2 on even sizes).
    """

    config: SamConfig
    output_size: int = 24
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ch = self.config.output_channels
        s = 4 * self.output_size
        x = resize_bilinear(x.astype(self.dtype), (s, s))
        pad = ((1, 1), (1, 1))
        x = conv2d(2 * ch, 3, 2, pad, False, self.dtype, self.param_dtype, "conv1")(x)
        return conv2d(4 * ch, 3, 2, pad, False, self.dtype, self.param_dtype, "conv2")(x)


def fuse_high_res(last: jax.Array, global_: jax.Array, alpha: jax.Array) -> jax.Array:
    """last + global_ * alpha, flattened row-major: [B, h, w, C] x2, alpha [1] -> [B, h * w, C].

    HF: `output = last + global * alpha`, then permute NCHW -> NHWC and reshape(B, -1, C).
    """
    out = last + global_ * alpha.astype(last.dtype)
    b, h, w, c = out.shape
    return out.reshape(b, h * w, c)

