"""Causal self-attention with a memory-efficient gradient (flash-attention style), for training.

Undifferentiated, the forward pass is `layers.causal_attention` (tiled, online softmax); differentiated, blocks of
queries, each reading only the keys up to its end. Differentiated as written, blocked attention keeps every block's
probabilities [B, K, G, block, S_i] for the backward pass,
in a scanned decoder for all layers at once (1.2 GB of the 0.45B benchmark's LoRA step, twice over), and its
softmax backward reduces over them. Here the forward pass keeps only the output and each query's logsumexp
[B, K, G, T], and the backward pass recomputes each block's probabilities from them:

    P = exp(Q K^T * scale - lse),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),
    dQ = dS K * scale,  dK = dS^T Q * scale

(rowsum(dO * O) equals rowsum(dP * P) but costs [T, H], not [T, S]). By default (`keep_probs`) the forward pass
keeps each block's exp(logits - max) once instead (0.33 GB more temporaries at the benchmark's LoRA step, 1.72 ->
2.06 GB) and the backward pass recomputes nothing: the LoRA step 1.13x faster in an interleaved A/B
(`benchmarks/train_ab.py`, results/train_ab_attention.json, load 3-4). The backward pass accumulates dK and dV
transposed (`_attention_bwd`): the LoRA step 1.035x and 1.032x faster
(results/train_ab_lora_attention_transposed*.json).
Letters as in `layers`: B batch, T queries, S keys (= T), N query heads, K key/value heads, G = N / K, H head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from deepseek_vl_jax import layers

_F32 = jnp.float32
_MIN = jnp.finfo(jnp.float32).min


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                     block: int | None = None, keep_probs: bool = True) -> jax.Array:
    """`layers.causal_attention` (q [B, T, N, H], k/v [B, T, K, H], mask bool broadcastable to [B, 1, T, T] ->
    [B, T, N, H]), whose gradient keeps each block's exp(logits - max) [B, K, G, block, S_i] once and recomputes
    nothing (`keep_probs`; False: keeps no probabilities and recomputes them from the logsumexp)."""
    return _attention(q, k, v, mask, scale, block or layers.prefill_block(q.shape[1]), keep_probs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, mask, scale, block, keep):
    return layers.causal_attention(q, k, v, mask, scale, block)


def _grouped(q, k, v, mask):
    """q -> [B, K, G, T, H]; k, v -> [B, K, S, H]; mask -> [B or 1, 1 or K, 1 or G, T, S]."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h).transpose(0, 2, 3, 1, 4)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    mask = jnp.broadcast_to(mask, mask.shape[:2] + (t, t))
    mask = mask[:, :, None] if mask.shape[1] == 1 else mask.reshape(mask.shape[0], kh, n // kh, t, t)
    return qg, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask


def _blocks(t, block):
    return [(s, min(s + block, t)) for s in range(0, t, block)]


def _logits(qs, kt, mask, s, e):
    """Block [s, e) of the (pre-scaled) queries over keys [0, e): masked float32 logits [B, K, G, e - s, e]."""
    logits = jnp.einsum("bkgth,bksh->bkgts", qs[:, :, :, s:e], kt[:, :, :e], preferred_element_type=_F32)
    return jnp.where(mask[..., s:e, :e], logits, _MIN)


# Under differentiation both passes below run instead of `layers.causal_attention` (the same math, ordered to touch
# each block's [.., T_i, S_i] logits as few times as possible: the scale goes on the queries [T, H] and the softmax
# normaliser on the output [T, H]; in the backward pass exp(masked - lse) is already 0 where the mask is off, so dS
# needs no second mask).
def _attention_fwd(q, k, v, mask, scale, block, keep):
    b, t, n, h = q.shape
    # q, k, v materialised as they come ([B, T, ., H], rope applied): otherwise XLA:CPU fuses rope into the heads-first
    # transposes and writes k as [B, K, H, S] from a loop with strided stores; after the barrier the transposes are
    # plain copies
    q, k, v = jax.lax.optimization_barrier((q, k, v))
    qg, kt, vt, mg = _grouped(q, k, v, mask)
    qs = qg * jnp.asarray(scale, qg.dtype)
    outs, lses, ps = [], [], []
    for s, e in _blocks(t, block):
        logits = _logits(qs, kt, mg, s, e)
        top = jnp.max(logits, axis=-1, keepdims=True)
        p = jnp.exp(logits - top)
        total = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bkgts,bksh->bkgth", p.astype(v.dtype), vt[:, :, :e], preferred_element_type=_F32)
        outs.append(o / total)
        if keep:
            ps.append(p)
            lses.append(1 / total[..., 0])
        else:
            lses.append((top + jnp.log(total))[..., 0])
    og = jnp.concatenate(outs, axis=3)  # [B, K, G, T, H] float32
    out = og.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)
    return out, (q, k, v, mask, og, jnp.concatenate(lses, axis=3), ps)


def _attention_bwd(scale, block, keep, res, dout):
    q, k, v, mask, og, lse, ps = res
    b, t, n, h = q.shape
    qg, kt, _, mg = _grouped(q, k, v, mask)
    qs = qg * jnp.asarray(scale, qg.dtype)
    dog = dout.reshape(b, t, k.shape[2], n // k.shape[2], h).transpose(0, 2, 3, 1, 4).astype(_F32)
    delta = jnp.sum(dog * og, axis=-1)  # [B, K, G, T]
    # dK and dV are accumulated transposed, [B, K, H, S]: as dK^T = Q^T dS and dV^T = dO^T P, the dots read each
    # block's [T_i, S_i] dS and P as they are (contracting their major axis T) and transpose only the [T_i, H]
    # operands; dK = dS^T Q and dV = P^T dO made XLA:CPU copy dS and P transposed, block by block
    vh = v.transpose(0, 2, 3, 1)  # [B, K, H, S]
    dkh = jnp.zeros(vh.shape, _F32)
    dvh = jnp.zeros(vh.shape, _F32)
    dqs = []
    for i, (s, e) in enumerate(_blocks(t, block)):
        do = dog[:, :, :, s:e]
        if keep:  # p = exp(logits - max), 1 / its row sum in `lse`: P = p * inv, dV = p^T (dO * inv), dS = p * ..
            p, inv = ps[i], lse[..., s:e, None]
            dvh = dvh.at[..., :e].add(jnp.einsum("bkgth,bkgts->bkhs", do * inv, p))
        else:
            p = jnp.exp(_logits(qs, kt, mg, s, e) - lse[..., s:e, None])  # 0 where masked (a query seeing no key)
            dvh = dvh.at[..., :e].add(jnp.einsum("bkgth,bkgts->bkhs", do, p))
        dp = jnp.einsum("bkgth,bkhs->bkgts", do, vh[..., :e], preferred_element_type=_F32)
        ds = p * ((dp - delta[..., s:e, None]) * inv) if keep else p * (dp - delta[..., s:e, None])
        dqs.append(jnp.einsum("bkgts,bksh->bkgth", ds, kt[:, :, :e], preferred_element_type=_F32))
        dkh = dkh.at[..., :e].add(jnp.einsum("bkgth,bkgts->bkhs", qs[:, :, :, s:e], ds, preferred_element_type=_F32))
    dq = (jnp.concatenate(dqs, axis=3) * scale).transpose(0, 3, 1, 2, 4).reshape(q.shape).astype(q.dtype)
    return dq, dkh.transpose(0, 3, 1, 2).astype(k.dtype), dvh.transpose(0, 3, 1, 2).astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)
