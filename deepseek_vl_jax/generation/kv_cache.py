"""The preallocated KV cache pytree, its sharding, and the length buckets that keep compilations few.

The cache is what `llama.apply_layers` takes and returns: one (k, v) per layer, k [B, K, S, H] and v [B, K, H, S]
(batch, kv heads, cache slots / head dim: the layouts XLA's attention dots read without a transpose); or, for the
decoder scanned over stacked weights (TPU/GPU), the same stacked along a leading layer axis. Each decode step writes
its new slot in place. A prompt is left-padded to a bucket length T; slots [0, T) hold the prompt and slot T + i the
i-th generated token, so S = T + G with G the generated-token buffer (max_new_tokens rounded up).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deepseek_vl_jax import common, sharding
from deepseek_vl_jax.config import TextConfig

# Prompt buckets: multiples of 64 up to 1024, then multiples of 1/16 of the next power of two (waste < 12.5%).
MIN_BUCKET = 64
GEN_MULTIPLE = 64  # the generated-token buffer is max_new_tokens rounded up to this
K_AXES = (common.BATCH, common.KV_HEADS, common.LENGTH, None)
V_AXES = (common.BATCH, common.KV_HEADS, None, common.LENGTH)

KVCache = tuple  # ((k [B, K, S, H], v [B, K, H, S]) per layer)


def bucket_length(n: int) -> int:
    """The padded prompt length for a prompt of n tokens: 64, 128, ..., 1024 (step 64), 1152, ..., 2048 (step 128),
    2304, ... (a one-image DeepSeek-VL prompt of ~600 tokens pads to 640)."""
    step = max(MIN_BUCKET, (1 << (max(n, 1) - 1).bit_length()) // 16)
    return max(MIN_BUCKET, -(-n // step) * step)


def gen_buffer_length(max_new_tokens: int) -> int:
    """Length G of the generated-token buffer (max_new_tokens rounded up, so nearby values share a compilation)."""
    return max(GEN_MULTIPLE, math.ceil(max_new_tokens / GEN_MULTIPLE) * GEN_MULTIPLE)


def cache_shapes(config: TextConfig, batch: int, length: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    k, h = config.num_key_value_heads, config.head_dim
    return (batch, k, length, h), (batch, k, h, length)


def init_cache(config: TextConfig, batch: int, length: int, dtype, stacked: bool = False) -> KVCache:
    """Zeros: one (k [B, K, S, H], v [B, K, H, S]) per layer, or stacked: (k [L, B, K, S, H], v [L, B, K, H, S])
    (for the decoder scanned over its stacked weights)."""
    ks, vs = cache_shapes(config, batch, length)
    if stacked:
        return jnp.zeros((config.num_hidden_layers,) + ks, dtype), jnp.zeros((config.num_hidden_layers,) + vs, dtype)
    return tuple((jnp.zeros(ks, dtype), jnp.zeros(vs, dtype)) for _ in range(config.num_hidden_layers))


def is_stacked(cache: KVCache) -> bool:
    return not isinstance(cache[0], tuple)


def cache_sharding(mesh: Mesh, config: TextConfig, batch: int, length: int) -> tuple[NamedSharding, NamedSharding]:
    """(keys, values) shardings: batch over (data, fsdp) and kv heads over tensor, each only where the mesh divides
    it; the rest replicated."""
    ks, vs = cache_shapes(config, batch, length)
    return (NamedSharding(mesh, sharding.spec_for(K_AXES, ks, mesh)),
            NamedSharding(mesh, sharding.spec_for(V_AXES, vs, mesh)))


def constrain_cache(cache: KVCache, mesh: Mesh | None, config: TextConfig) -> KVCache:
    """Pin the cache's sharding inside jit (no-op without a mesh)."""
    if mesh is None:
        return cache
    if is_stacked(cache):
        _, b, _, s, _ = cache[0].shape
        kt, vt = (NamedSharding(mesh, PartitionSpec(None, *t.spec)) for t in cache_sharding(mesh, config, b, s))
        return jax.lax.with_sharding_constraint(cache[0], kt), jax.lax.with_sharding_constraint(cache[1], vt)
    b, _, s, _ = cache[0][0].shape
    kt, vt = cache_sharding(mesh, config, b, s)
    return tuple((jax.lax.with_sharding_constraint(k, kt), jax.lax.with_sharding_constraint(v, vt)) for k, v in cache)
