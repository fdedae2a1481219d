"""The serving programs' block attention (`serving/block_attention.py`): equal to a plain masked softmax over the
whole cache (float64 numpy, and the model's own `layers.cached_attention`) within float32 noise, for a chunk of
queries and a one-query decode step at starts inside, on and past block edges; and bitwise the same however many
wholly masked blocks it is told to read, so that a vmapped row gives the same bits alone as beside a row that needs
more blocks."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_vl_jax import layers, multimodal
from deepseek_vl_jax.serving import block_attention as BA

N, K, H, S, BLOCK = 8, 4, 16, 128, 16  # 8 query heads over 4 kv heads; 8 blocks of 16 slots
SCALE = H**-0.5
attend = jax.jit(BA.block_cached_attention, static_argnames=("scale", "block"))


def inputs(rng, t, start, n_valid):
    """One row (B = 1): queries and new keys/values of t tokens written at slot `start` (the first n_valid real),
    a cache holding random values in every slot (the slots from `start` on must not be read), and its mask."""
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    mask = multimodal.cache_mask((jnp.arange(S) < start + n_valid)[None], start, t)
    return f(1, t, N, H), f(1, t, K, H), f(1, t, K, H), f(1, K, S, H) * 2, f(1, K, H, S), mask


def reference(q, k_new, v_new, k_cache, v_cache, mask, start):
    """Masked softmax over all S slots in float64: the old cache's slots before `start`, then the new tokens."""
    q, kn, vn, kc, vc, mask = (np.asarray(x, np.float64) if x.dtype != bool else np.asarray(x)
                               for x in (q, k_new, v_new, k_cache, v_cache, mask))
    t = q.shape[1]
    keys = kc[0].copy()  # [K, S, H]
    values = vc[0].transpose(0, 2, 1).copy()  # [K, S, H]
    keys[:, start:start + t], values[:, start:start + t] = kn[0].transpose(1, 0, 2), vn[0].transpose(1, 0, 2)
    qg = q[0].reshape(t, K, N // K, H)
    logits = np.einsum("tkgh,ksh->kgts", qg, keys) * SCALE
    logits = np.where(mask[0, 0][None, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("kgts,ksh->tkgh", p, values).reshape(1, t, N, H)


CASES = [(t, start) for t in (16, 1) for start in (0, 1, 15, 16, 17, 48, 100, S - t)]


@pytest.mark.parametrize("t,start", CASES)
def test_equals_the_plain_masked_softmax(t, start):
    rng = np.random.default_rng(t * 1000 + start)
    n_valid = max(1, t - 3)  # a chunk's last tokens may be padding (their outputs are not used)
    q, kn, vn, kc, vc, mask = inputs(rng, t, start, n_valid)
    got = np.asarray(attend(q, kn, vn, kc, vc, mask, jnp.int32(start), scale=SCALE, block=BLOCK))[:, :n_valid]
    want = reference(q, kn, vn, kc, vc, mask, start)[:, :n_valid]
    plain = np.asarray(layers._cached_attention(q, kn, vn, kc, vc, mask, jnp.int32(start), SCALE))[:, :n_valid]
    # measured: at most 8.8e-7 from float64 (outputs up to 3.8), the model's float32 path 1.1e-6 (and 1.1e-6 apart)
    np.testing.assert_allclose(got, want, atol=3e-6, rtol=0)
    np.testing.assert_allclose(got, plain, atol=3e-6, rtol=0)


@pytest.mark.parametrize("t", [16, 1])
def test_masked_blocks_change_no_bit(t):
    rng = np.random.default_rng(t)
    for start in (0, 5, 16, 40, 64):
        q, kn, vn, kc, vc, mask = inputs(rng, t, start, t)
        need = -(-start // BLOCK)
        runs = [np.asarray(attend(q, kn, vn, kc, vc, mask, jnp.int32(start), scale=SCALE, block=BLOCK,
                                  blocks=jnp.int32(n))) for n in (need, need + 1, S // BLOCK, 10 * S)]
        assert np.isfinite(runs[0]).all()
        for other in runs[1:]:
            np.testing.assert_array_equal(runs[0], other)  # bitwise
        if need:  # and it does read the blocks it needs
            short = attend(q, kn, vn, kc, vc, mask, jnp.int32(start), scale=SCALE, block=BLOCK,
                           blocks=jnp.int32(need - 1))
            assert not np.array_equal(runs[0], np.asarray(short))


def test_a_vmapped_row_alone_or_beside_a_longer_row():
    """As the chunk program runs it: rows vmapped, the block count the furthest row's (one unbatched value)."""
    rng = np.random.default_rng(3)
    t = 16
    rows = [inputs(rng, t, start, t) for start in (32, 112)]
    batch = [jnp.concatenate(xs) for xs in zip(*rows)]
    starts = jnp.array([32, 112], jnp.int32)

    @jax.jit
    def run(q, kn, vn, kc, vc, mask, starts):
        one = lambda *a: BA.block_cached_attention(*(x[None] for x in a[:6]), a[6], SCALE,
                                                   BA.block_count(starts, BLOCK).max(), BLOCK)[0]
        return jax.vmap(one)(q, kn, vn, kc, vc, mask, starts)

    together = np.asarray(run(*batch, starts))
    alone = np.asarray(run(*(jnp.concatenate([x[:1], x[:1]]) for x in batch), starts[:1].repeat(2)))
    np.testing.assert_array_equal(together[0], alone[0])  # row 0 needs 2 blocks, its neighbour 7
    np.testing.assert_allclose(together[1], reference(*rows[1], 112)[0], atol=3e-6, rtol=0)


def test_the_hook_and_a_cache_off_the_block_grid():
    rng = np.random.default_rng(5)
    q, kn, vn, kc, vc, mask = inputs(rng, 16, 40, 16)
    plain = layers.cached_attention(q, kn, vn, kc, vc, mask, jnp.int32(40), SCALE)
    with BA.blocked(jnp.int32(3), BLOCK):  # what the chunk program traces under
        got = layers.cached_attention(q, kn, vn, kc, vc, mask, jnp.int32(40), SCALE)
    want = attend(q, kn, vn, kc, vc, mask, jnp.int32(40), scale=SCALE, block=BLOCK)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not np.array_equal(np.asarray(got), np.asarray(plain))  # a different computation, not the same path
    with pytest.raises(ValueError, match="not a multiple of the 48-slot block"):
        BA.block_cached_attention(q, kn, vn, kc, vc, mask, jnp.int32(40), SCALE, block=48)
