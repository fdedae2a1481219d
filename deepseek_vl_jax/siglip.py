"""SigLIP vision transformer (the low-resolution tower, 384 px -> 576 patch features).

Patch convolution, learned positions, a scanned stack of pre-norm blocks (tanh-GELU MLP), post-layernorm and the
optional attention-pooling head. Matches transformers' `SiglipVisionModel`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_vl_jax import common, layers
from deepseek_vl_jax.config import SiglipConfig


class SiglipAttention(nn.Module):
    config: SiglipConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> [B, T, D]; full bidirectional attention."""
        c = self.config
        n, h = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        proj = lambda name, axes: layers.dense(c.hidden_size, axes, True, self.dtype, self.param_dtype, name)
        b, t, _ = x.shape
        q = proj("q_proj", (common.EMBED, common.HEADS))(x).reshape(b, t, n, h)
        k = proj("k_proj", (common.EMBED, common.HEADS))(x).reshape(b, t, n, h)
        v = proj("v_proj", (common.EMBED, common.HEADS))(x).reshape(b, t, n, h)
        out = layers.attention(q, k, v, scale=h**-0.5).reshape(b, t, n * h)
        return layers.dense(c.hidden_size, (common.HEADS, common.EMBED), True, self.dtype, self.param_dtype,
                            "out_proj", bias_axis=common.NORM)(out)


class SiglipMLP(nn.Module):
    config: SiglipConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        x = layers.dense(c.intermediate_size, (common.EMBED, common.MLP), True, self.dtype, self.param_dtype, "fc1")(x)
        x = common.ACTIVATIONS[c.hidden_act](x)
        return layers.dense(c.hidden_size, (common.MLP, common.EMBED), True, self.dtype, self.param_dtype, "fc2",
                            bias_axis=common.NORM)(x)


class SiglipBlock(nn.Module):
    """Pre-norm encoder block; the scan carry is the hidden state."""

    config: SiglipConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, _: None = None):
        c = self.config
        x = layers.constrain(x, (common.BATCH, common.LENGTH, common.EMBED))
        y = layers.layer_norm(c.layer_norm_eps, self.param_dtype, "layer_norm1")(x).astype(x.dtype)
        x = x + SiglipAttention(c, self.dtype, self.param_dtype, name="self_attn")(y)
        y = layers.layer_norm(c.layer_norm_eps, self.param_dtype, "layer_norm2")(x).astype(x.dtype)
        x = x + SiglipMLP(c, self.dtype, self.param_dtype, name="mlp")(y)
        return x, None


class SiglipPoolingHead(nn.Module):
    """Multi-head attention pooling with a learned probe (torch.nn.MultiheadAttention semantics)."""

    config: SiglipConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> pooled [B, D]."""
        c = self.config
        d, n = c.hidden_size, c.num_attention_heads
        h = d // n
        probe = self.param("probe", nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, None, common.EMBED)),
                           (1, 1, d), self.param_dtype)
        # in_proj packs q, k, v along the output axis, like torch's in_proj_weight [3D, D] (transposed here).
        kernel = self.param("in_proj_kernel", nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (common.EMBED, common.HEADS)), (d, 3 * d), self.param_dtype)
        bias = self.param("in_proj_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (common.HEADS,)),
                          (3 * d,), self.param_dtype)
        kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
        b = x.shape[0]
        x = x.astype(self.dtype)
        q = (probe.astype(self.dtype) @ kernel[:, :d] + bias[:d]).reshape(1, 1, n, h)
        q = jnp.broadcast_to(q, (b, 1, n, h))
        k = (x @ kernel[:, d:2 * d] + bias[d:2 * d]).reshape(b, -1, n, h)
        v = (x @ kernel[:, 2 * d:] + bias[2 * d:]).reshape(b, -1, n, h)
        out = layers.attention(q, k, v, scale=h**-0.5).reshape(b, 1, d)
        out = layers.dense(d, (common.HEADS, common.EMBED), True, self.dtype, self.param_dtype, "out_proj",
                           bias_axis=common.NORM)(out)
        y = layers.layer_norm(c.layer_norm_eps, self.param_dtype, "layernorm")(out).astype(out.dtype)
        out = out + SiglipMLP(c, self.dtype, self.param_dtype, name="mlp")(y)
        return out[:, 0]


class SiglipVisionModel(nn.Module):
    """pixel_values [B, C, H, W] (channels-first, as the processor gives) -> (last_hidden_state [B, P, D], pooled)."""

    config: SiglipConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: common.RematPolicy = common.RematPolicy.NONE

    @nn.compact
    def __call__(self, pixel_values: jax.Array, layers_params=None):
        """layers_params: None (the blocks scanned over the stacked `layers` params) or one param tree per block
        (`generation.weights.split_layers`: views of the stacked arrays; the params given to `apply` then need no
        `layers`). On CPU XLA copies each block's weights out of the stacked arrays in a scan (the dynamic slice
        is not fused into the dots): SigLIP at the 0.45B benchmark's size, 648 -> 620 ms."""
        c = self.config
        x = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype)  # [B, H, W, C]
        x = nn.Conv(
            c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size), padding="VALID",
            dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (common.CONV_SPATIAL, common.CONV_SPATIAL, common.CONV_IN, common.EMBED)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (common.NORM,)),
            name="patch_embedding",
        )(x)
        b = x.shape[0]
        x = x.reshape(b, -1, c.hidden_size)  # row-major over (h, w), like torch's flatten(2)
        pos = self.param("position_embedding",
                         nn.with_logical_partitioning(nn.initializers.normal(0.02), (common.POSITIONS, common.EMBED)),
                         (c.num_patches, c.hidden_size), self.param_dtype)
        x = x + pos.astype(x.dtype)[None]
        if layers_params is not None:
            unbound = SiglipBlock(c, self.dtype, self.param_dtype, parent=None)
            for p in layers_params:
                x, _ = unbound.apply({"params": p}, x)
        else:
            block = layers.remat(SiglipBlock, self.remat_policy)
            x, _ = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                length=c.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: common.LAYERS},
            )(c, self.dtype, self.param_dtype, name="layers")(x, None)
        x = layers.layer_norm(c.layer_norm_eps, self.param_dtype, "post_layernorm")(x).astype(self.dtype)
        pooled = SiglipPoolingHead(c, self.dtype, self.param_dtype, name="head")(x) if c.vision_use_head else None
        return x, pooled
