"""The attention forms of `layers` against transformers' eager attention (`eager_attention_forward`, the reference
LLaMA's attention), float32: the tiled causal prefill form (online softmax) and the cached form from slot 0, over
several tiles, grouped-query heads and left padding."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import eager_attention_forward

from deepseek_vl_jax import layers, multimodal

B, T, N, K, H = 2, 300, 4, 2, 16
TOL = 1e-6  # measured max abs error 6.0e-7 for the tiled causal form, 3.6e-7 for the blocks (outputs of order 1)
# With SAM's additive bias (a standard normal here) the logits spread wider: measured 7.2e-7 on an AVX-512 host and
# 1.07e-6 on an AVX2 one (a native AMD EPYC in CI, and the same bits under `qemu-x86_64 -cpu EPYC-Rome`)
TOL_BIAS = 1.5e-6


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, T, n, H)).astype(np.float32) for n in (N, K, K))
    mask = np.ones((B, T), np.int64)
    mask[1, :37] = 0  # left padding
    return q, k, v, mask


def _reference(q, k, v, mask, t=T):
    """transformers' eager attention with its additive causal + padding mask: [B, T, N, H]."""
    allowed = np.tril(np.ones((t, t), bool))[None, None] & mask.astype(bool)[:, None, None, :]
    additive = torch.from_numpy(np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32))
    module = types.SimpleNamespace(num_key_value_groups=N // K, training=False)
    t = lambda x: torch.from_numpy(x).transpose(1, 2)  # [B, heads, T, H]
    out, _ = eager_attention_forward(module, t(q), t(k), t(v), additive, scaling=H**-0.5, dropout=0.0)
    return out.numpy()


def _real(x, mask):
    """The rows' real query positions (a padded query sees no key at all: its output is unused garbage)."""
    return x[mask.astype(bool)]


@pytest.mark.parametrize("block", [64, 128, None])
def test_causal_attention_matches_eager_attention(block):
    q, k, v, mask = _inputs()
    out = layers.causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                  multimodal.causal_mask(jnp.asarray(mask)), H**-0.5, block)
    np.testing.assert_allclose(_real(np.asarray(out), mask), _real(_reference(q, k, v, mask), mask), atol=TOL,
                               rtol=0)


def test_causal_attention_of_a_long_prompt_matches_eager_attention():
    """T > LONG_ATTENTION: the tiles grow with T (prefill_block), none of them a power of two here."""
    t = 1100
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((1, t, n, H)).astype(np.float32) for n in (N, K, K))
    mask = np.ones((1, t), np.int64)
    mask[0, :5] = 0
    out = layers.causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                  multimodal.causal_mask(jnp.asarray(mask)), H**-0.5)
    np.testing.assert_allclose(_real(np.asarray(out), mask), _real(_reference(q, k, v, mask, t), mask), atol=TOL,
                               rtol=0)


def test_causal_attention_multiplies_no_tile_above_the_diagonal():
    """Query tile [s, e) multiplies the key tiles up to e only: two dots per (query tile, key tile) pair."""
    q, k, v, mask = _inputs()
    block = 64
    jaxpr = jax.make_jaxpr(lambda q, k, v: layers.causal_attention(q, k, v, None, H**-0.5, block))(q, k, v)
    dots = sum(eqn.primitive.name == "dot_general" for eqn in jaxpr.jaxpr.eqns)
    pairs = sum(-(-min(s + block // 2, T) // block) for s in range(0, T, block // 2))
    assert dots == 2 * pairs < 2 * (T // (block // 2) + 1) * (T // block + 1)


def test_cached_attention_from_slot_zero_reads_only_the_new_tokens():
    """Prefill into a fresh cache of S > T slots whose contents would change the result if they were read."""
    q, k, v, mask = _inputs(1)
    s = T + 64
    key_valid = jnp.zeros((B, s), bool).at[:, :T].set(jnp.asarray(mask, bool))
    garbage = np.random.default_rng(2).standard_normal((B, K, s, H)).astype(np.float32) * 100
    out = layers.cached_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(garbage),
                                  jnp.asarray(garbage.transpose(0, 1, 3, 2)), multimodal.cache_mask(key_valid, 0, T),
                                  0, H**-0.5)
    np.testing.assert_allclose(_real(np.asarray(out), mask), _real(_reference(q, k, v, mask), mask), atol=TOL,
                               rtol=0)


def test_prefill_blocks_stay_few():
    assert layers.prefill_block(640) == 128
    assert -(-4096 // layers.prefill_block(4096)) == layers.MAX_PREFILL_BLOCKS


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("block", [None, 64])
def test_heads_first_attention_with_a_bias_matches_torch(block, grouped):
    """Bidirectional attention with an additive bias (SAM's relative positions) in query blocks or not, one key
    head per query head (the towers: no group axis) or grouped, against torch's scaled_dot_product_attention with
    the same float mask."""
    q, k, v, _ = _inputs(3)  # K key heads for N query heads
    if not grouped:
        k, v = np.repeat(k, N // K, axis=2), np.repeat(v, N // K, axis=2)
    bias = np.random.default_rng(4).standard_normal((B, N, T, T)).astype(np.float32)
    out = layers.heads_first_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), None, H**-0.5,
                                       jnp.asarray(bias), block)
    t = lambda x: torch.from_numpy(np.repeat(x, N // x.shape[2], axis=2)).transpose(1, 2)
    ref = torch.nn.functional.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=torch.from_numpy(bias),
                                                           scale=H**-0.5).transpose(1, 2).numpy()
    np.testing.assert_allclose(np.asarray(out), ref, atol=TOL_BIAS, rtol=0)


def test_cpu_attention_blocks_only_long_sequences():
    """The towers' attention on CPU: one block up to LONG_ATTENTION queries (SigLIP, SAM's windows), blocks of
    LONG_ATTENTION_BLOCK beyond (SAM's global layers), never more than MAX_LONG_ATTENTION_BLOCKS of them."""
    assert layers.cpu_query_block(576) is None and layers.cpu_query_block(layers.LONG_ATTENTION) is None
    assert layers.cpu_query_block(4096) == layers.LONG_ATTENTION_BLOCK
    for t in (1100, 4096, 20000, 70000):
        block = layers.cpu_query_block(t)
        assert block % 16 == 0 and -(-t // block) <= layers.MAX_LONG_ATTENTION_BLOCKS


def test_attention_of_a_long_sequence_with_a_bias_matches_torch():
    """`layers.attention` past LONG_ATTENTION queries (in blocks on CPU, a short last one here), with a bias."""
    t, n, h = 1100, 2, 16
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((1, t, n, h)).astype(np.float32) for _ in range(3))
    bias = rng.standard_normal((1, n, t, t)).astype(np.float32)
    assert t % layers.cpu_query_block(t)
    out = layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), bias=jnp.asarray(bias), scale=h**-0.5)
    tt = lambda x: torch.from_numpy(x).transpose(1, 2)
    ref = torch.nn.functional.scaled_dot_product_attention(tt(q), tt(k), tt(v), attn_mask=torch.from_numpy(bias),
                                                           scale=h**-0.5).transpose(1, 2).numpy()
    np.testing.assert_allclose(np.asarray(out), ref, atol=TOL_BIAS, rtol=0)
