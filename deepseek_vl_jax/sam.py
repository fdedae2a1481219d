"""SAM ViT image encoder (the hybrid model's high-resolution tower, 1024 px -> 64x64 features).

Matches transformers' `SamVisionEncoder` (`models/sam/modeling_sam.py`): patch convolution, learned absolute
positions, pre-norm blocks whose attention is windowed (with zero padding when the grid is not a multiple of the
window) except at `global_attn_indexes`, decomposed relative position biases (MViTv2), and the convolutional neck.

Layout: everything is NHWC (`[B, h, w, D]`), the layout HF's blocks use internally; only the pixel input is
channels-first (as the processor gives). HF's neck returns NCHW; ours returns NHWC (a transpose apart).

Parameter names mirror HF's state-dict keys below `vision_encoder.`, so a name-based converter can load them:

    patch_embed/projection/{kernel,bias}        <- patch_embed.projection.{weight,bias}   (OIHW -> HWIO)
    pos_embed [1, h, w, D]                      <- pos_embed
    layers_{i}/layer_norm{1,2}/{scale,bias}     <- layers.{i}.layer_norm{1,2}.{weight,bias}
    layers_{i}/attn/qkv/{kernel,bias}           <- layers.{i}.attn.qkv.{weight,bias}      (transposed)
    layers_{i}/attn/proj/{kernel,bias}          <- layers.{i}.attn.proj.{weight,bias}
    layers_{i}/attn/rel_pos_{h,w}               <- layers.{i}.attn.rel_pos_{h,w}          ([2*size-1, head_dim])
    layers_{i}/mlp/lin{1,2}/{kernel,bias}       <- layers.{i}.mlp.lin{1,2}.{weight,bias}
    neck/conv{1,2}/kernel, neck/layer_norm{1,2}/{scale,bias}  <- neck.conv{1,2}.weight, neck.layer_norm{1,2}.*

The layers are not scanned: windowed and global layers have relative-position tables of different shapes.

Letters: B batch, h/w token grid, D width, N heads, H head dim, T query tokens, S key tokens, C channels.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_vl_jax import common, layers
from deepseek_vl_jax.config import SamConfig

# HF's SamLayerNorm (the neck's channels-first norm) is built with its default eps, not config.layer_norm_eps.
NECK_LAYER_NORM_EPS = 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Windows


def window_partition(x: jax.Array, window_size: int) -> tuple[jax.Array, tuple[int, int]]:
    """[B, h, w, C] -> (windows [B * nh * nw, ws, ws, C], (padded h, padded w)).

    Pads the bottom/right with zeros to a multiple of the window (the padded tokens then take part in attention,
    exactly as in HF / the original SAM). Windows are ordered row-major over (batch, window row, window column).
    """
    b, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    hp, wp = h + pad_h, w + pad_w
    x = x.reshape(b, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(windows: jax.Array, window_size: int, padded_hw: tuple[int, int],
                       hw: tuple[int, int]) -> jax.Array:
    """Inverse of `window_partition`: windows [B * nh * nw, ws, ws, C] -> [B, h, w, C] (padding dropped)."""
    hp, wp = padded_hw
    h, w = hw
    b = windows.shape[0] // ((hp // window_size) * (wp // window_size))
    x = windows.reshape(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :]


# ----------------------------------------------------------------------------------------------------------------
# Relative positions


def linear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] float32 matrix M with M @ x == torch's 1-D `F.interpolate(x, out_size, mode="linear",
    align_corners=False)` along that axis (no antialiasing; half-pixel centres, negative source coords clamped to 0).

    The weights are computed like torch's CPU kernel, bit for bit: scale = float32(in / out), and
    src = scale * (dst + 0.5) - 0.5 rounded once to float32 (torch's build contracts it into a fused multiply-add;
    the float32 product is exact in float64, so float64 arithmetic then one rounding reproduces it).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    src = (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = src.astype(np.int64)  # truncation == floor (src >= 0)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    lam0 = (np.float32(1.0) - lam1).astype(np.float32)
    m = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), lam0)
    np.add.at(m, (rows, i1), lam1)
    return m


def rel_pos_index(q_size: int, k_size: int) -> np.ndarray:
    """[q, k] int indices into the (resized) table, exactly HF's `get_rel_pos` arithmetic (float32, truncated)."""
    q_coords = np.arange(q_size, dtype=np.float32)[:, None] * np.float32(max(k_size / q_size, 1.0))
    k_coords = np.arange(k_size, dtype=np.float32)[None, :] * np.float32(max(q_size / k_size, 1.0))
    rel = (q_coords - k_coords) + np.float32(k_size - 1) * np.float32(max(q_size / k_size, 1.0))
    return rel.astype(np.int64)


def get_rel_pos(q_size: int, k_size: int, rel_pos: jax.Array) -> jax.Array:
    """Relative position embeddings [q, k, H] for one axis from a table [L, H].

    As HF, the table is linearly resized (torch `F.interpolate(mode="linear")`, align_corners=False) to
    2 * max(q, k) - 1 rows when its length differs (a same-size linear resize is the identity, so it is skipped).
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    table = rel_pos.astype(jnp.float32)
    if table.shape[0] != max_rel_dist:
        m = jnp.asarray(linear_resize_matrix(table.shape[0], max_rel_dist))
        table = jnp.einsum("ol,lc->oc", m, table, precision=jax.lax.Precision.HIGHEST)
    return table[rel_pos_index(q_size, k_size)]


def decomposed_rel_pos_bias(q: jax.Array, rel_pos_h: jax.Array, rel_pos_w: jax.Array, q_hw: tuple[int, int],
                            k_hw: tuple[int, int]) -> jax.Array:
    """Additive attention bias [B, N, T, S] of decomposed relative positions (HF `get_decomposed_rel_pos`).

    q: the unscaled queries [B, T, N, H] with T = qh * qw (row-major). Computed in float32.
    bias[b, n, (i, j), (k, l)] = q[b, (i, j), n] . Rh[i, k] + q[b, (i, j), n] . Rw[j, l].
    """
    qh, qw = q_hw
    kh, kw = k_hw
    r_h = get_rel_pos(qh, kh, rel_pos_h)  # [qh, kh, H]
    r_w = get_rel_pos(qw, kw, rel_pos_w)  # [qw, kw, H]
    b, _, n, hd = q.shape
    qf = q.astype(jnp.float32).reshape(b, qh, qw, n, hd)
    hi = jax.lax.Precision.HIGHEST
    rel_h = jnp.einsum("bhwnc,hkc->bnhwk", qf, r_h, precision=hi)
    rel_w = jnp.einsum("bhwnc,wkc->bnhwk", qf, r_w, precision=hi)
    bias = rel_h[:, :, :, :, :, None] + rel_w[:, :, :, :, None, :]  # [B, N, qh, qw, kh, kw]
    return bias.reshape(b, n, qh * qw, kh * kw)


# ----------------------------------------------------------------------------------------------------------------
# Modules


def conv2d(features: int, kernel: int, stride: int, padding, use_bias: bool, dtype, param_dtype, name: str,
           out_axis: str = common.CONV_OUT) -> nn.Conv:
    """A torch-equivalent Conv2d on NHWC: kernel HWIO with logical axes; explicit torch-style padding."""
    return nn.Conv(
        features, (kernel, kernel), strides=(stride, stride), padding=padding, use_bias=use_bias,
        dtype=dtype, param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (common.CONV_SPATIAL, common.CONV_SPATIAL, common.CONV_IN, out_axis)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (common.NORM,)),
        name=name,
    )


class SamPatchEmbeddings(nn.Module):
    """Patch convolution: pixel_values [B, C, H, W] -> [B, h, w, D]. Params `projection/{kernel,bias}`."""

    config: SamConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        c = self.config
        x = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype)
        return conv2d(c.hidden_size, c.patch_size, c.patch_size, "VALID", True, self.dtype, self.param_dtype,
                      "projection", out_axis=common.EMBED)(x)


class SamVisionAttention(nn.Module):
    """Multi-head self-attention over a [B, h, w, D] grid with decomposed relative position biases.

    input_size: the grid the relative-position tables were made for (HF: (window, window) for windowed layers,
    (image // patch,) * 2 for global ones); tables have 2 * size - 1 rows and are resized when the grid differs.
    """

    config: SamConfig
    input_size: tuple[int, int]
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        n = c.num_attention_heads
        hd = c.hidden_size // n
        b, h, w, d = x.shape
        qkv = layers.dense(3 * c.hidden_size, (common.EMBED, common.HEADS), c.qkv_bias, self.dtype, self.param_dtype,
                           "qkv")(x)
        qkv = qkv.reshape(b, h * w, 3, n, hd)  # HF: reshape(B, hw, 3, N, H)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        bias = None
        if c.use_rel_pos:
            table = lambda name, size: self.param(
                name, nn.with_logical_partitioning(nn.initializers.zeros_init(), (common.REL_POS, None)),
                (2 * size - 1, hd), self.param_dtype)
            rel_pos_h = table("rel_pos_h", self.input_size[0])
            rel_pos_w = table("rel_pos_w", self.input_size[1])
            bias = decomposed_rel_pos_bias(q, rel_pos_h, rel_pos_w, (h, w), (h, w))
        out = layers.attention(q, k, v, bias=bias, scale=hd**-0.5).reshape(b, h, w, n * hd)
        return layers.dense(c.hidden_size, (common.HEADS, common.EMBED), True, self.dtype, self.param_dtype, "proj",
                            bias_axis=common.NORM)(out)


class SamMLP(nn.Module):
    config: SamConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        x = layers.dense(c.mlp_dim, (common.EMBED, common.MLP), True, self.dtype, self.param_dtype, "lin1")(x)
        x = common.ACTIVATIONS[c.hidden_act](x)
        return layers.dense(c.hidden_size, (common.MLP, common.EMBED), True, self.dtype, self.param_dtype, "lin2",
                            bias_axis=common.NORM)(x)


class SamVisionLayer(nn.Module):
    """Pre-norm block; window_size 0 means global attention. x [B, h, w, D] -> [B, h, w, D]."""

    config: SamConfig
    window_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        x = layers.constrain(x, (common.BATCH, None, None, common.EMBED))
        grid = c.image_size // c.patch_size
        input_size = (grid, grid) if self.window_size == 0 else (self.window_size, self.window_size)
        y = layers.layer_norm(c.layer_norm_eps, self.param_dtype, "layer_norm1")(x).astype(x.dtype)
        h, w = y.shape[1], y.shape[2]
        if self.window_size > 0:
            y, padded = window_partition(y, self.window_size)
        y = SamVisionAttention(c, input_size, self.dtype, self.param_dtype, name="attn")(y)
        if self.window_size > 0:
            y = window_unpartition(y, self.window_size, padded, (h, w))
        x = x + y
        y = layers.layer_norm(c.layer_norm_eps, self.param_dtype, "layer_norm2")(x).astype(x.dtype)
        return x + SamMLP(c, self.dtype, self.param_dtype, name="mlp")(y)


class SamNeck(nn.Module):
    """conv1 (1x1, no bias) -> LayerNorm -> conv2 (3x3, padding 1, no bias) -> LayerNorm: [B, h, w, D] -> [B, h, w, C].

    HF's channels-first LayerNorm2d is a last-axis LayerNorm on NHWC; its eps is 1e-6 (SamLayerNorm's default, not
    config.layer_norm_eps). Used for the encoder's `neck` and for the hybrid model's `high_res_vision_neck`
    (HF `DeepseekVLSamVisionNeck`, same parameter names).
    """

    config: SamConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        ch = c.output_channels
        x = x.astype(self.dtype)
        x = conv2d(ch, 1, 1, "VALID", False, self.dtype, self.param_dtype, "conv1")(x)
        x = layers.layer_norm(NECK_LAYER_NORM_EPS, self.param_dtype, "layer_norm1")(x).astype(self.dtype)
        x = conv2d(ch, 3, 1, ((1, 1), (1, 1)), False, self.dtype, self.param_dtype, "conv2")(x)
        return layers.layer_norm(NECK_LAYER_NORM_EPS, self.param_dtype, "layer_norm2")(x).astype(self.dtype)


class SamVisionEncoder(nn.Module):
    """pixel_values [B, C, H, W] (channels-first) -> (neck_out [B, h, w, output_channels], hidden_states).

    hidden_states is a tuple of [B, h, w, D] (NHWC) arrays equal to HF's `output_hidden_states`: index 0 is the
    embeddings (patch conv + pos_embed, i.e. the input of layer 0), index k + 1 the output of layer k
    (num_hidden_layers + 1 in all; the last is the un-necked final state).

    keep_hidden (static, a tuple of ints or None): which of those indices to return, in the given order (negative
    indices count from the end). None returns all. Under `jax.jit`, hidden states the caller drops are dead code
    anyway; keep_hidden matters when the encoder's outputs cross a jit boundary (e.g. the hybrid model keeps only
    `(global_attn_indexes[0] + 1,)`), and keeps the returned pytree small. Pass it as a Python tuple (static).

    remat_policy: `jax.checkpoint` policy applied per layer (see `common.RematPolicy`); NONE keeps everything.
    Memory note: like HF, each global layer materialises its float32 relative-position bias [B, N, T, T]
    (T = (image_size // patch_size)^2; 12 x 4096^2 x 4 bytes = 805 MB per image at 1024 px / 16).

    As HF, the input must be `image_size` square: `pos_embed` is added as is (HF does not interpolate it) and the
    global layers' relative-position tables are sized for image_size // patch_size.
    """

    config: SamConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: common.RematPolicy = common.RematPolicy.NONE

    @nn.compact
    def __call__(self, pixel_values: jax.Array, keep_hidden: Sequence[int] | None = None):
        c = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[1] != c.num_channels:
            raise ValueError(f"pixel_values must be [B, {c.num_channels}, H, W]; got {pixel_values.shape}")
        if pixel_values.shape[2:] != (c.image_size, c.image_size):
            raise ValueError(f"input image size {pixel_values.shape[2:]} doesn't match the model's "
                             f"({c.image_size}, {c.image_size})")
        n_states = c.num_hidden_layers + 1
        if keep_hidden is None:
            keep = tuple(range(n_states))
        else:
            keep = tuple(int(i) for i in keep_hidden)
            bad = [i for i in keep if not -n_states <= i < n_states]
            if bad:
                raise ValueError(f"keep_hidden {bad} outside [-{n_states}, {n_states})")
            keep = tuple(i % n_states for i in keep)
        wanted = set(keep)

        grid = c.image_size // c.patch_size
        x = SamPatchEmbeddings(c, self.dtype, self.param_dtype, name="patch_embed")(pixel_values)  # [B, h, w, D]
        if c.use_abs_pos:
            pos = self.param("pos_embed", nn.with_logical_partitioning(
                nn.initializers.zeros_init(), (None, common.POSITIONS, None, common.EMBED)),
                (1, grid, grid, c.hidden_size), self.param_dtype)
            x = x + pos.astype(x.dtype)
        states = {}
        if 0 in wanted:
            states[0] = x
        block = layers.remat(SamVisionLayer, self.remat_policy)
        for i in range(c.num_hidden_layers):
            window = 0 if i in c.global_attn_indexes else c.window_size
            x = block(c, window, self.dtype, self.param_dtype, name=f"layers_{i}")(x)
            if i + 1 in wanted:
                states[i + 1] = x
        neck_out = SamNeck(c, self.dtype, self.param_dtype, name="neck")(x)
        return neck_out, tuple(states[i] for i in keep)
