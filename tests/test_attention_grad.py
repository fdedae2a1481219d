"""`attention_grad.causal_attention` against torch autograd (eager attention written out in torch: grouped-query
heads repeated, causal + padding mask, softmax in float32): output and the gradients of q, k and v, in several
query blocks and with right padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from deepseek_vl_jax import attention_grad, layers


def torch_attention(q, k, v, mask, scale):
    """q [B, T, N, H], k/v [B, T, K, H], mask bool [B, 1, T, T] -> [B, T, N, H] (transformers' eager attention)."""
    n, kh = q.shape[2], k.shape[2]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    k, v = k.repeat_interleave(n // kh, 1), v.repeat_interleave(n // kh, 1)
    logits = (q @ k.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~mask, torch.finfo(torch.float32).min)
    return (torch.softmax(logits, -1) @ v).transpose(1, 2)


@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "keep_probs"])
@pytest.mark.parametrize("block", [8, 64], ids=["three_blocks", "one_block"])
def test_output_and_gradients_equal_torch_autograd(block, keep):
    rng = np.random.default_rng(0)
    b, t, n, kh, h = 2, 20, 4, 2, 16
    q, k, v = (rng.standard_normal((b, t, m, h)).astype(np.float32) for m in (n, kh, kh))
    dout = rng.standard_normal((b, t, n, h)).astype(np.float32)
    valid = np.ones((b, t), bool)
    valid[1, 15:] = False  # right padding: row 1's last keys masked (and its padded queries see only the past)
    mask = np.tril(np.ones((t, t), bool))[None, None] & valid[:, None, None, :]
    scale = h**-0.5

    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    want = torch_attention(tq, tk, tv, torch.tensor(mask), scale)
    want.backward(torch.tensor(dout))

    f = lambda q, k, v: attention_grad.causal_attention(q, k, v, jnp.asarray(mask), scale, block, keep)
    def run(q, k, v, d):
        out_fwd, pullback = jax.vjp(f, q, k, v)  # the forward pass of the differentiated function (`_attention_fwd`)
        return f(q, k, v), out_fwd, pullback(d)

    out, out_fwd, grads = jax.jit(run)(q, k, v, dout)
    err = lambda got, ref: float(np.abs(np.asarray(got) - ref).max() / np.abs(ref).max())
    assert err(out, want.detach().numpy()) <= 1e-6
    assert err(out_fwd, want.detach().numpy()) <= 1e-6
    for got, ref in zip(grads, (tq.grad, tk.grad, tv.grad)):
        assert err(got, ref.numpy()) <= 2e-6
    # undifferentiated, the forward pass is layers.causal_attention's, unchanged
    same = jax.jit(lambda q, k, v: layers.causal_attention(q, k, v, jnp.asarray(mask), scale, block))(q, k, v)
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(q, k, v)), np.asarray(same))


def test_gradient_keeps_no_probabilities():
    """Under a scan over 6 layers the automatic gradient keeps every layer's [B, N, T, T] probabilities twice (12.6
    of its 13.5 MB of temporaries); this one keeps none (4.2 MB: one layer's backward blocks, the residuals), and
    with `keep_probs` each layer's causal blocks once (block 64 of T = 256: 5/8 of [T, T]), give or take one layer's
    [T, T] of backward working set (the peaks fall in different passes: 4.45 vs 8.54 MB)."""
    b, t, n, h, layers_n, block = 1, 256, 4, 16, 6, 64
    x = jnp.ones((b, t, n, h), jnp.float32)
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None]

    def stack(attend):
        def loss(x):
            def body(x, _):
                return jnp.tanh(attend(x, x, x, mask, 0.25, block)) , None
            return jnp.sum(jax.lax.scan(body, x, None, length=layers_n)[0])
        return jax.jit(jax.grad(loss)).lower(x).compile().memory_analysis().temp_size_in_bytes

    probs_per_layer = 4 * b * n * t * t
    blocks_per_layer = 4 * b * n * sum(block * e for e in range(block, t + 1, block))
    ours = stack(lambda *a: attention_grad.causal_attention(*a, keep_probs=False))
    automatic = stack(layers.causal_attention)
    kept = stack(attention_grad.causal_attention)  # the default
    assert automatic >= 2 * layers_n * probs_per_layer, automatic
    assert ours <= automatic - layers_n * probs_per_layer, (ours, automatic)
    assert kept <= ours + layers_n * blocks_per_layer + probs_per_layer, (kept, ours)
    assert kept >= ours + 0.75 * layers_n * blocks_per_layer, (kept, ours)  # (it does keep them)
