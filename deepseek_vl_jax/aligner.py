"""The aligners that project vision features into the language model's width.

- `MlpAligner` (DeepSeek-VL): linear1 -> GELU -> linear2.
- `HybridAligner` (DeepSeek-VL-Hybrid): separate low/high-resolution projections to D/2 each, concatenated
  high-then-low, GELU, then a D -> D projection.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_vl_jax import common, layers

_gelu = common.ACTIVATIONS["gelu"]  # torch nn.GELU(): the exact erf form


class MlpAligner(nn.Module):
    out_features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, P, Dv] -> [B, P, D]."""
        d = self.out_features
        x = layers.dense(d, (None, common.EMBED), True, self.dtype, self.param_dtype, "linear1")(x)
        return layers.dense(d, (common.MLP, common.EMBED), True, self.dtype, self.param_dtype, "linear2")(_gelu(x))


class HybridAligner(nn.Module):
    out_features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, low: jax.Array, high: jax.Array) -> jax.Array:
        """low [B, P, Dv] (SigLIP), high [B, P, Ch] (SAM path) -> [B, P, D]."""
        d = self.out_features
        low = layers.dense(d // 2, (None, common.EMBED), True, self.dtype, self.param_dtype, "vision_proj")(low)
        high = layers.dense(d // 2, (None, common.EMBED), True, self.dtype, self.param_dtype,
                            "high_res_vision_proj")(high)
        x = _gelu(jnp.concatenate([high, low], axis=-1))
        return layers.dense(d, (common.MLP, common.EMBED), True, self.dtype, self.param_dtype, "proj")(x)
