"""Attention over a KV cache in fixed blocks of key slots with an online softmax: the serving programs' attention.

`layers.cached_attention` attends over all S cache slots of a row, masked; a serving row uses only its first
positions, so a chunk or a decode step multiplies (and reads) mostly unused slots. Here the old cache is read in
blocks of `BLOCK` slots, 0, 1, 2, ... in that order, up to a block count `blocks` given at run time (a
`lax.fori_loop` with a dynamic trip count), after the new tokens' own keys, keeping a running maximum m, sum l and
accumulator per query (flash attention's recurrence).

Why the count may be the batch's and not the row's: a block wholly past a row's used slots is masked out, its
logits -inf, so its maximum does not move m (the correction is exp(0) = 1 exactly), its probabilities are exactly 0
and it adds exactly 0 to l and to the accumulator. A row's bits therefore do not depend on how many blocks its
neighbours need (tests/test_serving_block_attention.py checks this bitwise): the programs pass the count their
furthest row needs, as one unbatched value, so under `vmap` each block is a plain slice of every row and the loop
runs the same steps for all rows.

Where it pays (benchmarks/serve_block_attention.py, CPU, 117M shape, 16 rows): a 64-token prefill chunk, whose 64
queries per block amortize slicing the block out of the cache (~0.8x the masked full-cache attention's call time).
Not a decode step: its one query per row and head makes each block a copied slice for a tiny product, and the
call took ~1.2x as long, so `Programs` keeps decode on the full-cache attention (`Programs(blocked=...)`).

Letters: B batch, T new tokens, S cache slots, N query heads, K key/value heads, G = N / K, H head dim.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

from deepseek_vl_jax import layers

BLOCK = 64  # key slots per block


def block_count(cache_index: jax.Array, block: int = BLOCK) -> jax.Array:
    """The old-cache blocks a row whose new tokens start at slot `cache_index` reads: ceil(cache_index / block)."""
    return (cache_index + block - 1) // block


def _update(carry, logits, valid, vb):
    """One block of the online softmax: carry (m, l, acc) [B, K, G, T] x2 and [B, K, G, T, H]; logits
    [B, K, G, T, s] float32, valid broadcastable to it; the block's values vb [B, K, H, s]."""
    m, l, acc = carry
    logits = jnp.where(valid, logits, -jnp.inf)
    m_new = jnp.maximum(m, logits.max(-1))
    p = jnp.exp(logits - m_new[..., None])
    corr = jnp.exp(m - m_new)
    pv = jnp.einsum("bkgts,bkhs->bkgth", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
    return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv


def _logits(qg, kb, scale):
    """qg [B, K, G, T, H] (heads first: the dot is a plain batched matrix product, no transposed copy of the
    queries at every block; 0.91x the time of a [B, T, K, G, H] operand, same bits) x keys kb [B, K, s, H] ->
    [B, K, G, T, s] float32."""
    return jnp.einsum("bkgth,bksh->bkgts", qg, kb, preferred_element_type=jnp.float32) * scale


def block_cached_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array, k_cache: jax.Array,
                           v_cache: jax.Array, mask: jax.Array, cache_index: jax.Array, scale: float,
                           blocks: jax.Array | None = None, block: int = BLOCK) -> jax.Array:
    """`layers.cached_attention`'s contract in blocks: T new tokens written at slots [cache_index, cache_index + T)
    attend over the cache's slots before cache_index and over each other.

    q [B, T, N, H], k_new/v_new [B, T, K, H], k_cache [B, K, S, H], v_cache [B, K, H, S] (the cache before this call),
    mask bool [B, 1, T, S] over all slots (as `multimodal.cache_mask`: causal, so no query sees an old slot at or past
    cache_index, which are ignored here), cache_index int32 scalar, S a multiple of `block`. blocks: how many old
    blocks to read (default `block_count(cache_index)`; more reads masked blocks, which change no bit). A query
    that may see no key gets 0 (the plain softmax would spread it evenly). Logits and softmax in float32; returns
    [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    kh, s = k_cache.shape[1], k_cache.shape[2]
    g = n // kh
    if s % block:
        raise ValueError(f"the cache's {s} slots are not a multiple of the {block}-slot block")
    qg = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    dtype = k_cache.dtype
    shape = (b, kh, g, t)
    carry = (jnp.full(shape, jnp.finfo(jnp.float32).min), jnp.zeros(shape, jnp.float32),
             jnp.zeros(shape + (h,), jnp.float32))
    # the new tokens first: query t sees new token u where the mask allows it at slot cache_index + u
    new_valid = jax.lax.dynamic_slice_in_dim(mask, cache_index, t, axis=-1)[:, :, None]
    kn, vn = k_new.astype(dtype).transpose(0, 2, 1, 3), v_new.astype(dtype).transpose(0, 2, 3, 1)
    carry = _update(carry, _logits(qg, kn, scale), new_valid, vn)
    # The cache as [B * K, S, H] / [B * K, H, S]: with a size-1 B (a vmapped row) XLA may otherwise give the loop's
    # operand a layout that differs only in where that dimension sits, and copy the whole cache to change it.
    kc, vc = k_cache.reshape(b * kh, s, h), v_cache.reshape(b * kh, h, s)

    def body(lo, carry):
        kb = jax.lax.dynamic_slice_in_dim(kc, lo, block, axis=1).reshape(b, kh, block, h)
        vb = jax.lax.dynamic_slice_in_dim(vc, lo, block, axis=2).reshape(b, kh, h, block)
        valid = jax.lax.dynamic_slice_in_dim(mask, lo, block, axis=-1) & (lo + jnp.arange(block) < cache_index)
        return _update(carry, _logits(qg, kb, scale), valid[:, :, None], vb)

    blocks = block_count(cache_index, block) if blocks is None else blocks
    _, l, acc = jax.lax.fori_loop(0, jnp.minimum(blocks, s // block), lambda j, c: body(j * block, c), carry)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # [B, K, G, T, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)


def blocked(blocks: jax.Array, block: int = BLOCK) -> contextlib.AbstractContextManager:
    """Within this context (at trace time), the model's cached attention is `block_cached_attention` reading
    `blocks` old blocks (an unbatched int32: the furthest row's `block_count`)."""
    return layers.cached_attention_as(
        lambda q, kn, vn, kc, vc, mask, index, scale: block_cached_attention(q, kn, vn, kc, vc, mask, index, scale,
                                                                             blocks, block))
