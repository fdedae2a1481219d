"""Small building blocks shared by the backbones: dense, norms, attention, activation constraints.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`); `sharding.RULES` maps them to
mesh axes. Kernels are stored `[in, out]` (PyTorch's Linear weight transposed).

Letters used in shapes: B batch (or images), T query length, S key length, D model width, N query heads,
K key/value heads, H head dim, F feed-forward width, V vocabulary, C channels.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_vl_jax import common

Dtype = Any
_MIN = jnp.finfo(jnp.float32).min  # the masked logit (finite: a row with no visible key stays finite)


def dense(features: int, axes: tuple[str, str], use_bias: bool, dtype: Dtype, param_dtype: Dtype, name: str,
          bias_axis: str | None = None) -> nn.Dense:
    """A Linear layer: kernel [in, out] with logical `axes`, bias [out] (sharded like the kernel's output axis)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (bias_axis or axes[1],)),
        name=name,
    )


class RMSNorm(nn.Module):
    """LLaMA RMSNorm, computed in float32 and cast back, then scaled (as HF: weight * x.to(input_dtype))."""

    eps: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (common.NORM,)),
                           (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * xf.astype(x.dtype)


def layer_norm(eps: float, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    """LayerNorm over the last axis, statistics in float32 (torch's LayerNorm semantics)."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (common.NORM,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (common.NORM,)),
        name=name,
    )


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
              bias: jax.Array | None = None, scale: float | None = None) -> jax.Array:
    """Softmax attention: q [B, T, N, H], k/v [B, S, K, H] (N a multiple of K: grouped-query) -> [B, T, N, H].

    mask: bool, broadcastable to [B, N, T, S], True where a query may attend. bias: added to the logits.
    Uses `jax.nn.dot_product_attention`, which picks cuDNN flash attention on GPU where the inputs allow it and
    XLA's fused path on TPU; on CPU `heads_first_attention` (faster there). Logits and softmax run in float32.
    float16 on CPU takes `attention_with_probs` (XLA:CPU has no float16 x float16 -> float32 dot, which jax's
    attention asks for).
    """
    out_dtype = q.dtype
    if q.dtype == jnp.float16 and jax.default_backend() == "cpu":
        return attention_with_probs(q, k, v, mask, scale, bias)[0]
    if jax.default_backend() == "cpu":  # faster there; long sequences (SAM's global attention) in query blocks
        h = q.shape[-1]
        block = cpu_query_block(q.shape[1])
        return heads_first_attention(q, k, v, mask, h**-0.5 if scale is None else scale, bias, block)
    if q.dtype != jnp.float32 and bias is not None:
        bias = bias.astype(q.dtype)
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale)
    return out.astype(out_dtype)


def attention_with_probs(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                         scale: float | None = None, bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`attention` written out, also returning the probabilities (transformers' eager attention, for
    `output_attentions`): q [B, T, N, H], k/v [B, S, K, H], mask bool broadcastable to [B, N, T, S] ->
    ([B, T, N, H], probabilities [B, N, T, S] float32). Logits and softmax in float32."""
    n, kh, h = q.shape[2], k.shape[2], q.shape[3]
    if kh != n:
        k, v = jnp.repeat(k, n // kh, axis=2), jnp.repeat(v, n // kh, axis=2)
    f32 = lambda x: x.astype(jnp.float32)
    logits = jnp.einsum("btnh,bsnh->bnts", f32(q), f32(k)) * (h**-0.5 if scale is None else scale)
    if bias is not None:
        logits = logits + f32(bias)
    if mask is not None:
        logits = jnp.where(mask, logits, _MIN)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bnts,bsnh->btnh", probs, f32(v))
    return out.astype(q.dtype), probs


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float,
                     block: int | None = None) -> jax.Array:
    """Causal self-attention of T tokens: q [B, T, N, H], k/v [B, T, K, H], mask bool broadcastable to [B, 1, T, T]
    (causal: query t may see no key after t; padding masked as well; None: causal alone) -> [B, T, N, H].

    The same math as `attention` (logits in float32, query heads grouped as [K, G]) in tiles of `block` // 2
    queries by `block` keys (default `prefill_block(T)`), flash-attention style: each query tile walks the key tiles
    up to its own end (the tiles above the diagonal are never multiplied) with an online softmax (a running max and
    sum per query, the output rescaled as the max grows), so only one tile's logits [B, K, G, block / 2, block] are
    live at a time and they stay in the caches. One layer's prompt attention at the 0.45B shape (T = 640, one row,
    XLA:CPU) against blocks of queries over all their keys (`heads_first_attention(causal=True)`, the form before)
    and torch's `scaled_dot_product_attention`: benchmarks/prefill_attention.py, results/prefill_attention.json.
    """
    b, t, n, h = q.shape
    kh = k.shape[2]
    block = block or prefill_block(t)
    q_tile, k_tile = max(block // 2, 1), block
    if mask is None:
        mask = jnp.tril(jnp.ones((t, t), bool))
    qg = q.reshape(b, t, kh, n // kh, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
    mask = _grouped(mask, kh, n // kh, t, t)
    outs = []
    for qs in range(0, t, q_tile):
        qe = min(qs + q_tile, t)
        m = total = acc = None  # running max [B, K, G, tq], sum [B, K, G, tq], output [B, K, G, tq, H] (float32)
        for ks in range(0, qe, k_tile):
            ke = min(ks + k_tile, qe)
            logits = jnp.einsum("bkgth,bksh->bkgts", qg[:, :, :, qs:qe], kt[:, :, ks:ke],
                                preferred_element_type=jnp.float32) * scale
            logits = jnp.where(mask[..., qs:qe, ks:ke], logits, _MIN)
            m_new = logits.max(-1) if m is None else jnp.maximum(m, logits.max(-1))
            p = jnp.exp(logits - m_new[..., None])
            pv = jnp.einsum("bkgts,bksh->bkgth", p.astype(v.dtype), vt[:, :, ks:ke],
                            preferred_element_type=jnp.float32)
            if m is None:
                total, acc = p.sum(-1), pv
            else:
                rescale = jnp.exp(m - m_new)
                total, acc = rescale * total + p.sum(-1), rescale[..., None] * acc + pv
            m = m_new
        outs.append(acc / total[..., None])
    out = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)


def _grouped(x: jax.Array, kh: int, g: int, t: int, s: int) -> jax.Array:
    """A mask or bias broadcastable to [B, N, T, S] -> [B or 1, K or 1, G or 1, T, S] (heads kept unbroadcast)."""
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    x = jnp.broadcast_to(x, x.shape[:2] + (t, s))
    return x[:, :, None] if x.shape[1] == 1 else x.reshape(x.shape[0], kh, g, t, s)


def heads_first_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float,
                          bias: jax.Array | None = None, block: int | None = None, causal: bool = False) -> jax.Array:
    """`attention` with the heads moved first ([B, K, G, T, H]), so that both dots are plain batched matrix
    products and XLA:CPU copies no transposed logits; q [B, T, N, H], k/v [B, S, K, H], mask bool / bias
    broadcastable to [B, N, T, S] -> [B, T, N, H]. Queries in blocks of `block` (default all); with `causal`
    (S = T) block i reads only keys [0, end of block i)."""
    b, t, n, h = q.shape
    kh, s = k.shape[2], k.shape[1]
    block = block or t
    g = n // kh
    qg = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
    mask = None if mask is None else _grouped(mask, kh, g, t, s)
    bias = None if bias is None else _grouped(bias, kh, g, t, s)
    gl = "g"
    if g == 1:  # no unit group axis: with it, XLA:CPU copies every block's logits (results/encoder_attention.json)
        qg, gl = qg[:, :, 0], ""
        mask = None if mask is None else mask[:, :, 0]
        bias = None if bias is None else bias[:, :, 0]
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        keys = end if causal else s
        logits = jnp.einsum(f"bk{gl}th,bksh->bk{gl}ts", qg[..., start:end, :], kt[:, :, :keys],
                            preferred_element_type=jnp.float32) * scale
        if bias is not None:
            logits = logits + bias[..., start:end, :keys].astype(jnp.float32)
        if mask is not None:
            logits = jnp.where(mask[..., start:end, :keys], logits, _MIN)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum(f"bk{gl}ts,bksh->bk{gl}th", probs, vt[:, :, :keys],
                               preferred_element_type=jnp.float32))
    out = jnp.concatenate(outs, axis=-2) if len(outs) > 1 else outs[0]
    out = out.reshape(b, kh, g, t, h)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)


PREFILL_BLOCK = 128  # queries per block of a prompt's attention (`causal_attention`, `cached_attention`)
MAX_PREFILL_BLOCKS = 8  # longer prompts take longer blocks (the program's size stays bounded)
LONG_ATTENTION = 1024  # `attention` on CPU splits longer query sequences into blocks ...
LONG_ATTENTION_BLOCK = 128  # ... of this many queries (or more, to make at most MAX_LONG_ATTENTION_BLOCKS blocks)
MAX_LONG_ATTENTION_BLOCKS = 32


def prefill_block(t: int) -> int:
    return max(PREFILL_BLOCK, -(-t // MAX_PREFILL_BLOCKS))


def cpu_query_block(t: int) -> int | None:
    """Queries per block of `attention` on CPU (None: all T at once). Measured on an AVX-512 Xeon
    (benchmarks/encoder_attention.py, results/encoder_attention.json): SigLIP (576 tokens) and SAM's windowed
    layers (196) are fastest in one block inside their towers; one of SAM ViT-B's global layers (4096 tokens)
    takes 1089 ms of attention in 8 blocks of 512 queries, 760 in 32 blocks of 128 (torch's SDPA 708), and the
    whole SAM tower at 1024 px 8.71 s -> 7.37 s (transformers' 7.48)."""
    if t <= LONG_ATTENTION:
        return None
    fewest = -(-t // MAX_LONG_ATTENTION_BLOCKS)
    return max(LONG_ATTENTION_BLOCK, -(-fewest // 16) * 16)


_CACHED_ATTENTION = contextvars.ContextVar("cached_attention", default=None)


@contextlib.contextmanager
def cached_attention_as(fn):
    """Within this context (at trace time), `cached_attention` calls fn with its arguments instead (a provider of
    the same contract, e.g. the serving programs' block attention, `serving/block_attention.py`)."""
    token = _CACHED_ATTENTION.set(fn)
    try:
        yield
    finally:
        _CACHED_ATTENTION.reset(token)


def cached_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     mask: jax.Array, cache_index: jax.Array, scale: float) -> jax.Array:
    """Attention of T new tokens over a KV cache they are being written into, at slots [cache_index, cache_index + T).

    q [B, T, N, H], k_new/v_new [B, T, K, H], k_cache [B, K, S, H], v_cache [B, K, H, S] (the cache as it was before
    this call: its slots for the new tokens are masked out), mask bool [B, 1, T, S] over all S slots -> [B, T, N, H].

    The same math as `attention` (logits and softmax in float32, query heads grouped as [K, G]), with the keys split
    into the old cache and the new tokens. Reading the cache from before the update lets XLA write the new entries
    in place: a dot reading the updated cache makes XLA:CPU duplicate the update into the dot's fusion and copy every
    layer's cache at every decode step. Both cache dots contract its minor dimension (H for k, S for v), the form
    XLA:CPU's batched dots take without transposing the cache.
    A prompt (T > PREFILL_BLOCK) is attended in blocks of queries (`lax.map`): the logits and probabilities
    [B, N, T, S + T] are then never all live at once (one block's, [B, N, PREFILL_BLOCK, S + T], at a time).
    From slot 0 (a static 0: the prefill of a fresh cache) it is `causal_attention` over the new tokens alone, also
    in query blocks.
    """
    if _CACHED_ATTENTION.get() is not None:
        return _CACHED_ATTENTION.get()(q, k_new, v_new, k_cache, v_cache, mask, cache_index, scale)
    b, t, n, h = q.shape
    if isinstance(cache_index, int) and cache_index == 0:
        # From slot 0, query t sees only slots <= t, all of them new tokens: the old cache is masked out whole.
        return causal_attention(q, k_new, v_new, mask[..., :t], scale)
    block = math.gcd(t, PREFILL_BLOCK)
    if t > PREFILL_BLOCK and block >= 32:  # a prompt: blocks of queries (softmax rows are independent)
        nb = t // block
        mask = jnp.broadcast_to(mask, mask.shape[:2] + (t, mask.shape[-1]))
        qs = q.reshape(b, nb, block, n, h).swapaxes(0, 1)
        masks = mask.reshape(b, mask.shape[1], nb, block, mask.shape[-1]).transpose(2, 0, 1, 3, 4)
        out = jax.lax.map(lambda a: _cached_attention(a[0], k_new, v_new, k_cache, v_cache, a[1], cache_index,
                                                      scale), (qs, masks))  # [nb, B, block, N, H]
        return out.swapaxes(0, 1).reshape(b, t, n, h)
    return _cached_attention(q, k_new, v_new, k_cache, v_cache, mask, cache_index, scale)


def _cached_attention(q, k_new, v_new, k_cache, v_cache, mask, cache_index, scale):
    """`cached_attention` for queries q [B, T', N, H] (all T new tokens or a block of them; mask [B, 1, T', S])."""
    b, tq, n, h = q.shape
    t = k_new.shape[1]
    kh, s = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(b, tq, kh, n // kh, h)
    new_slots = jnp.arange(s) - cache_index
    mask_old = mask & ~((new_slots >= 0) & (new_slots < t))
    mask_new = jax.lax.dynamic_slice_in_dim(mask, cache_index, t, axis=-1)
    old = jnp.einsum("btkgh,bksh->bkgts", qg, k_cache, preferred_element_type=jnp.float32)
    new = jnp.einsum("btkgh,bskh->bkgts", qg, k_new, preferred_element_type=jnp.float32)
    logits = jnp.concatenate([old, new], axis=-1) * scale
    logits = jnp.where(jnp.concatenate([mask_old, mask_new], axis=-1)[:, :, None], logits, _MIN)
    probs = jax.nn.softmax(logits, axis=-1)
    p_old, p_new = probs[..., :s].astype(v_cache.dtype), probs[..., s:].astype(v_new.dtype)
    out = (jnp.einsum("bkgts,bkhs->btkgh", p_old, v_cache, preferred_element_type=jnp.float32)
           + jnp.einsum("bkgts,bskh->btkgh", p_new, v_new, preferred_element_type=jnp.float32))
    return out.reshape(b, tq, n, h).astype(q.dtype)


def after(new: jax.Array, out: jax.Array) -> jax.Array:
    """`new` (k or v of the new tokens, [B, T, K, H]), made to depend on the attention output `out` [B, T, N, H].

    XLA orders an in-place update after the reads of the same buffer only through data dependencies (its copy
    insertion does not use the final schedule), and optimization barriers do not survive to that pass on CPU. Without
    this, every layer's cache is copied at every decode step. The added zero comes from the first query head of each
    group, which is sharded like the key/value heads, so it needs no communication; the values are unchanged (unless
    `out` is not finite, in which case the row's output is garbage anyway).
    """
    b, t, kh, h = new.shape
    first = out.reshape(b, t, kh, out.shape[2] // kh, h)[:, :, :, 0]
    return new + (first * 0).astype(new.dtype)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding by logical axes; a no-op outside a mesh / rules context."""
    return nn.with_logical_constraint(x, tuple(axes))


def remat(module_cls, policy: common.RematPolicy, static_argnums: tuple[int, ...] = ()):
    """Wrap a module class in `nn.remat` according to the config's policy (NONE: unchanged)."""
    checkpoint_policy = common.checkpoint_policy(policy)
    if checkpoint_policy is None:
        return module_cls
    return nn.remat(module_cls, policy=checkpoint_policy, prevent_cse=False, static_argnums=static_argnums)
